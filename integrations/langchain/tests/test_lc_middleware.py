"""``AgentGuardMiddleware`` driving real ``langchain.agents.create_agent`` agents.

The agents run on :class:`ScriptedChatModel` — a real ``BaseChatModel`` that reports usage
consistent with what it was sent, honours ``max_tokens`` and ``tool_choice`` and, by default,
calls a tool on every answer: the runaway loop a budget has to end. The tools are real
``@tool`` functions run by the agent's ``ToolNode``. Every test asserts on spend, decisions
and traces, in sync and async runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool, tool

import agentguard as ag
from agentguard_langchain import AgentGuardMiddleware
from agentguard_langchain.testing import ScriptedChatModel

D = Decimal
ASK: Any = {"messages": [{"role": "user", "content": "Where is my parcel for order 1182?"}]}
RESULT = "Carrier event: parcel scanned at the depot, awaiting transfer to the courier. " * 40


@tool
def search(query: str) -> str:
    """Search the order system and the carrier's tracking events."""
    return RESULT


@tool
def lookup(query: str) -> str:
    """Look an order up by its number."""
    return "order 1182: paid, shipped 3 days late"


def scripted(model_name: str, **kw: Any) -> ScriptedChatModel:
    """A scripted model whose tool-call ids cannot collide with another instance's.

    ``ScriptedChatModel`` numbers its tool calls ``call_<n>_<i>`` per instance; a second model
    taking over a conversation would reuse ids the history already answered, and
    ``create_agent`` would skip its tool calls as done. Real providers give unique ids.
    """
    m = ScriptedChatModel(model_name=model_name, **kw)
    m._calls = {"gpt-4o": 0, "gpt-4o-mini": 10_000}.get(model_name, 20_000)
    return m


def make_guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


def spans(g: ag.Guard) -> list[ag.Span]:
    return g.sink.spans  # type: ignore[attr-defined, no-any-return]


def records(g: ag.Guard) -> list[ag.TaskRecord]:
    return g.sink.tasks  # type: ignore[attr-defined, no-any-return]


def model_spans(g: ag.Guard) -> list[ag.Span]:
    return [s for s in spans(g) if s.kind == "model"]


def reserved(g: ag.Guard, task_id: str) -> dict[str, Any]:
    (balance,) = g.store.snapshot([f"task:{task_id}"]).values()
    return {k: v for k, v in balance.reserved.items() if v}


def agent_with(
    model: BaseChatModel,
    middleware: AgentGuardMiddleware,
    tools: list[BaseTool] | None = None,
) -> Any:
    return create_agent(model=model, tools=tools or [search], middleware=[middleware])


def run(agent: Any, mode: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    if mode == "async":
        return asyncio.run(agent.ainvoke(ASK, config=config))
    return agent.invoke(ASK, config=config)  # type: ignore[no-any-return]


MODES = pytest.mark.parametrize("mode", ["sync", "async"])


# -- 1. the runaway loop: downgrade, then a graceful finish --------------------------------------


@MODES
def test_runaway_loop_downgrades_then_finishes_within_budget(mode: str) -> None:
    g = make_guard(
        max_cost_usd="0.05",
        max_output_tokens=400,
        downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        on_limit="finish",
    )
    big, cheap = scripted("gpt-4o"), scripted("gpt-4o-mini")
    agent = agent_with(big, AgentGuardMiddleware(g, models={"gpt-4o-mini": cheap}))

    out = run(agent, mode)  # ends by itself: no exception, no GraphRecursionError

    final = out["messages"][-1]
    assert isinstance(final, AIMessage)
    assert final.tool_calls == []
    assert "budget ended the run" in final.text
    meta = final.response_metadata["agentguard"]
    assert meta["ended_by"] == "finish"
    assert meta["limit"] == "max_cost_usd"

    (record,) = records(g)  # the middleware opened the run's task and closed it
    assert record.task_id == meta["task_id"]
    assert record.status == "finished"
    assert record.cost_usd is not None
    assert record.cost_usd <= D("0.05")
    assert record.decisions == {"downgrade": 1, "finish": 1}

    # the trace: gpt-4o calls, the downgrade, gpt-4o-mini calls, the finish, the final call
    calls = model_spans(g)
    assert sum(s.cost_usd or 0 for s in calls) == record.cost_usd
    assert not any(s.attrs.get("over_reservation") for s in calls)
    decisions = [s.decision for s in spans(g) if s.decision in ("downgrade", "finish")]
    assert decisions.index("downgrade") < decisions.index("finish")
    finish_at = next(i for i, s in enumerate(spans(g)) if s.decision == "finish")
    models = [s.model for s in calls]
    first_cheap = models.index("gpt-4o-mini")
    assert set(models[:first_cheap]) == {"gpt-4o"}
    assert set(models[first_cheap:]) == {"gpt-4o-mini"}  # never back to the expensive model
    assert spans(g).index(calls[-1]) > finish_at  # the final call follows the finish decision

    # what the models were really sent: the cheap one after the downgrade, a cap on every call,
    # tools on, and tool_choice="none" on the final answer only
    assert len(big.seen) == first_cheap
    assert len(cheap.seen) == len(models) - first_cheap
    assert all(s["model"] == "gpt-4o" for s in big.seen)
    assert all(s["max_tokens"] is not None for s in big.seen + cheap.seen)
    assert cheap.seen[-1]["tool_choice"] == "none"
    assert cheap.seen[-1]["max_tokens"] <= g.policy.finish_output_tokens
    assert [s["tool_choice"] for s in big.seen + cheap.seen[:-1]] == [None] * (len(models) - 1)
    assert all(s["tools"] == 1 for s in big.seen + cheap.seen)


def test_without_the_middleware_the_same_agent_never_stops() -> None:
    """The baseline the first test is measured against: the loop runs to the recursion limit."""
    from langgraph.errors import GraphRecursionError

    agent = create_agent(model=scripted("gpt-4o", reply_tokens=5), tools=[lookup])
    with pytest.raises(GraphRecursionError):
        agent.invoke(ASK, config={"recursion_limit": 41})


# -- 2. on_limit="raise" -------------------------------------------------------------------------


@MODES
def test_raise_lets_budget_exceeded_out_of_invoke_with_the_numbers(mode: str) -> None:
    g = make_guard(max_cost_usd="0.01", max_output_tokens=400)
    model = scripted("gpt-4o")
    agent = agent_with(model, AgentGuardMiddleware(g))

    with pytest.raises(ag.BudgetExceeded) as info:
        run(agent, mode)

    err = info.value
    assert err.limit == "max_cost_usd"
    assert err.limit_value == D("0.01")
    assert isinstance(err.actual, Decimal)
    assert "max_cost_usd" in str(err)
    assert "0.01" in str(err)
    (record,) = records(g)
    assert record.task_id == err.task_id
    assert record.status == "stopped"
    assert record.limit_hit == "max_cost_usd"
    assert record.cost_usd is not None
    assert record.cost_usd <= D("0.01")
    assert record.model_calls == len(model.seen) > 1
    assert reserved(g, record.task_id) == {}


@MODES
def test_exit_behavior_end_turns_a_stop_into_a_final_message(mode: str) -> None:
    g = make_guard(max_cost_usd="0.01", max_output_tokens=400)  # on_limit="raise"
    model = scripted("gpt-4o")
    agent = agent_with(model, AgentGuardMiddleware(g, exit_behavior="end"))

    out = run(agent, mode)

    final = out["messages"][-1]
    assert isinstance(final, AIMessage)
    assert final.tool_calls == []
    assert "stopped the run" in final.text
    assert "max_cost_usd" in final.text
    assert final.response_metadata["agentguard"]["ended_by"] == "stop"
    assert final.usage_metadata is None  # no model call was made for it
    (record,) = records(g)
    assert record.status == "ok"  # the run ended normally, with the stop recorded
    assert record.limit_hit == "max_cost_usd"
    assert record.decisions == {"stop": 1}


# -- 3. model and tool caps, parallel tool calls -------------------------------------------------


@MODES
def test_max_model_calls_keeps_the_last_call_for_the_final_answer(mode: str) -> None:
    g = make_guard(max_model_calls=3, on_limit="finish")
    model = scripted("gpt-4o-mini", reply_tokens=40)
    agent = agent_with(model, AgentGuardMiddleware(g), tools=[lookup])

    out = run(agent, mode)

    assert [s["tool_choice"] for s in model.seen] == [None, None, "none"]
    final = out["messages"][-1]
    assert final.tool_calls == []
    assert "model calls" in final.text
    (record,) = records(g)
    assert (record.model_calls, record.tool_calls, record.status) == (3, 2, "finished")


@MODES
def test_tool_caps_block_parallel_calls_and_the_run_finishes(mode: str) -> None:
    g = make_guard(max_tool_calls=4, tool_limits={"lookup": 1}, on_limit="finish")
    ran: list[str] = []

    @tool
    def search_orders(query: str) -> str:
        """Search orders."""
        ran.append("search_orders")
        return "3 orders"

    @tool
    def lookup(query: str) -> str:
        """Look an order up."""
        ran.append("lookup")
        return "order 1182: shipped late"

    # three calls per answer, alternating over the two tools: search, lookup, search
    model = scripted("gpt-4o-mini", parallel_tool_calls=3, reply_tokens=40)
    agent = agent_with(model, AgentGuardMiddleware(g), tools=[search_orders, lookup])

    out = run(agent, mode)

    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    blocked = [m for m in tool_msgs if m.status == "error"]
    # answer 1: search, lookup, search run; answer 2: search runs (4 of 4), lookup is over its
    # own cap and the total, the last search is over the total
    assert sorted(ran) == ["lookup", "search_orders", "search_orders", "search_orders"]
    assert len(tool_msgs) == 6
    assert len(blocked) == 2
    assert all("blocked by the budget" in str(m.content) for m in blocked)
    assert {m.name for m in blocked} == {"lookup", "search_orders"}
    assert any("'lookup' was called 1 of 1 times" in str(m.content) for m in blocked)
    # then the next model call is the final answer
    assert [s["tool_choice"] for s in model.seen] == [None, None, "none"]
    final = out["messages"][-1]
    assert isinstance(final, AIMessage)
    assert final.tool_calls == []
    (record,) = records(g)
    assert (record.tool_calls, record.status, record.decisions) == (
        4,
        "finished",
        {"block": 2, "finish": 1},
    )


def test_parallel_tool_calls_in_flight_together_are_each_counted() -> None:
    """Eight tool calls of one answer run at once on ToolNode's threads: exactly five pass."""
    g = make_guard(max_tool_calls=5, on_limit="finish")
    lock = threading.Lock()
    state = {"running": 0, "peak": 0, "ran": 0}

    @tool
    def slow_lookup(query: str) -> str:
        """Look an order up (slowly)."""
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            state["ran"] += 1
        time.sleep(0.05)
        with lock:
            state["running"] -= 1
        return "order 1182"

    model = scripted("gpt-4o-mini", parallel_tool_calls=8, reply_tokens=20)
    out = agent_with(model, AgentGuardMiddleware(g), tools=[slow_lookup]).invoke(ASK)

    assert state["peak"] > 1  # the calls really overlapped
    assert state["ran"] == 5
    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert sum(m.status == "error" for m in tool_msgs) == 3
    (record,) = records(g)
    assert record.tool_calls == 5
    assert out["messages"][-1].tool_calls == []


async def test_async_parallel_tool_calls_are_each_counted() -> None:
    g = make_guard(max_tool_calls=5, on_limit="finish")
    ran: list[int] = []

    @tool
    async def slow_lookup(query: str) -> str:
        """Look an order up (slowly)."""
        ran.append(1)
        await asyncio.sleep(0.02)
        return "order 1182"

    model = scripted("gpt-4o-mini", parallel_tool_calls=8, reply_tokens=20)
    agent = agent_with(model, AgentGuardMiddleware(g), tools=[slow_lookup])
    out = await agent.ainvoke(ASK)

    assert len(ran) == 5
    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert sum(m.status == "error" for m in tool_msgs) == 3
    assert records(g)[0].tool_calls == 5


def test_a_tool_stop_under_raise_propagates() -> None:
    g = make_guard(tool_limits={"lookup": 2})
    model = scripted("gpt-4o-mini", reply_tokens=20)
    with pytest.raises(ag.BudgetExceeded) as info:
        agent_with(model, AgentGuardMiddleware(g), tools=[lookup]).invoke(ASK)
    assert info.value.limit == "tool_limits.lookup"
    (record,) = records(g)
    assert (record.status, record.tool_calls) == ("stopped", 2)


def test_a_tool_stop_with_exit_end_ends_the_run_at_the_next_model_call() -> None:
    g = make_guard(tool_limits={"lookup": 2})
    model = scripted("gpt-4o-mini", reply_tokens=20)
    mw = AgentGuardMiddleware(g, exit_behavior="end")
    out = agent_with(model, mw, tools=[lookup]).invoke(ASK)

    assert len(model.seen) == 3  # no model call after the stop
    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert [m.status for m in tool_msgs] == ["success", "success", "error"]
    final = out["messages"][-1]
    assert final.tool_calls == []
    assert "tool_limits.lookup" in final.text


# -- 4. middleware and callback handler together -------------------------------------------------


@MODES
def test_middleware_and_callback_handler_charge_each_call_once(mode: str) -> None:
    from agentguard_langchain import _callbacks as callbacks

    g = make_guard(max_cost_usd="0.05", max_output_tokens=400, on_limit="finish")
    model = scripted("gpt-4o")
    agent = agent_with(model, AgentGuardMiddleware(g))
    handler = callbacks.AgentGuardCallbackHandler(g)

    with g.task("both") as task:
        run(agent, mode, config={"callbacks": [handler]})

    assert task.model_calls == len(model.seen)
    assert task.tool_calls == len([s for s in spans(g) if s.kind == "tool"]) == task.model_calls - 1
    calls = model_spans(g)
    assert len(calls) == len(model.seen)
    assert task.cost_usd == sum(s.cost_usd or 0 for s in calls)
    assert task.cost_usd is not None
    assert task.cost_usd <= D("0.05")


# -- 5. the ladder is checked --------------------------------------------------------------------


class NoToolsChatModel(BaseChatModel):
    """A chat model that cannot call tools (no ``bind_tools``)."""

    model_name: str = "gpt-4o-mini"

    @property
    def _llm_type(self) -> str:
        return "no-tools"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage("ok"))])


LADDER = {"downgrade": [ag.Downgrade(at=0.5, to="gpt-4o-mini")], "max_cost_usd": "1"}


def test_a_rung_without_a_model_is_refused_before_any_spend() -> None:
    g = make_guard(**LADDER)
    model = scripted("gpt-4o")
    agent = agent_with(model, AgentGuardMiddleware(g))
    with pytest.raises(ag.PolicyError, match=r"downgrade\[0\]\.to='gpt-4o-mini'.*no chat model"):
        agent.invoke(ASK)
    assert model.seen == []
    (record,) = records(g)
    assert (record.status, record.model_calls, record.cost_usd) == ("error", 0, D(0))


def test_a_rung_that_is_the_agents_own_model_needs_no_mapping() -> None:
    g = make_guard(**LADDER, max_model_calls=2, on_limit="finish")
    model = scripted("gpt-4o-mini", reply_tokens=20)
    out = agent_with(model, AgentGuardMiddleware(g)).invoke(ASK)
    assert out["messages"][-1].tool_calls == []


def test_a_mapped_model_without_tool_calling_is_refused() -> None:
    g = make_guard(**LADDER)
    with pytest.raises(ag.PolicyError, match=r"downgrade\[0\]\.to=.*cannot call tools"):
        AgentGuardMiddleware(g, models={"gpt-4o-mini": NoToolsChatModel()})
    no_tools = scripted("gpt-4o-mini", profile={"tool_calling": False})
    with pytest.raises(ag.PolicyError, match="tool_calling=False"):
        AgentGuardMiddleware(g, models={"gpt-4o-mini": no_tools})


def test_a_bound_model_is_refused() -> None:
    g = make_guard(**LADDER)
    bound = scripted("gpt-4o-mini").bind_tools([search])
    with pytest.raises(ag.PolicyError, match="unbound chat model"):
        AgentGuardMiddleware(g, models={"gpt-4o-mini": bound})  # type: ignore[dict-item]


def test_a_mapped_model_too_small_for_the_request_is_not_called() -> None:
    g = make_guard(
        max_cost_usd="0.01",
        max_output_tokens=400,
        downgrade=[ag.Downgrade(at=0.3, to="gpt-4o-mini")],
    )
    small = scripted("gpt-4o-mini", profile={"max_input_tokens": 1000})
    agent = agent_with(scripted("gpt-4o"), AgentGuardMiddleware(g, models={"gpt-4o-mini": small}))
    with pytest.raises(ag.PolicyError, match="context window of 1000 tokens"):
        agent.invoke(ASK)
    assert small.seen == []
    (record,) = records(g)
    assert reserved(g, record.task_id) == {}


def test_bad_options_are_refused() -> None:
    with pytest.raises(ag.PolicyError, match="exit_behavior"):
        AgentGuardMiddleware(make_guard(), exit_behavior="explode")  # type: ignore[arg-type]


# -- 6. the caller's own task --------------------------------------------------------------------


@MODES
def test_the_callers_task_is_charged(mode: str) -> None:
    g = make_guard(max_model_calls=4, on_limit="finish")
    model = scripted("gpt-4o-mini", reply_tokens=40)
    agent = agent_with(model, AgentGuardMiddleware(g), tools=[lookup])

    async def in_async_task() -> ag.Task:
        async with g.task("t1", team="cx") as task:
            await agent.ainvoke(ASK)
        return task

    if mode == "async":
        task = asyncio.run(in_async_task())
    else:
        with g.task("t1", team="cx") as task:
            agent.invoke(ASK)

    assert task.model_calls == len(model.seen) == 4
    assert task.tool_calls == 3
    assert [d.action for d in task.decisions] == ["finish"]
    assert task.status == "finished"
    assert task.cost_usd == sum(s.cost_usd or 0 for s in model_spans(g))
    assert [r.task_id for r in records(g)] == ["t1"]  # no task of the middleware's own
    assert {s.task_id for s in spans(g)} == {"t1"}


# -- run lifecycle -------------------------------------------------------------------------------


def test_each_run_gets_its_own_task_with_ids_and_tags() -> None:
    g = make_guard(max_model_calls=2, on_limit="finish")
    ids = iter(["run-a", "run-b"])
    mw = AgentGuardMiddleware(g, task_id=lambda state, runtime: next(ids), tags={"team": "cx"})
    agent = agent_with(scripted("gpt-4o-mini", reply_tokens=20), mw, tools=[lookup])
    agent.invoke(ASK)
    agent.invoke(ASK)
    assert [(r.task_id, r.tags, r.model_calls) for r in records(g)] == [
        ("run-a", {"team": "cx"}, 2),
        ("run-b", {"team": "cx"}, 2),
    ]


def test_a_failing_tool_closes_the_run_task_and_frees_its_budget() -> None:
    g = make_guard(max_cost_usd="0.05")

    @tool
    def broken(query: str) -> str:
        """Always fails."""
        raise RuntimeError("carrier API down")

    with pytest.raises(RuntimeError, match="carrier API down"):
        agent_with(scripted("gpt-4o-mini"), AgentGuardMiddleware(g), tools=[broken]).invoke(ASK)
    (record,) = records(g)
    assert record.status == "error"
    assert record.model_calls == 1
    assert reserved(g, record.task_id) == {}
    tool_span = next(s for s in spans(g) if s.kind == "tool")
    assert tool_span.status == "error"


class FailingChatModel(ScriptedChatModel):
    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise ConnectionError("provider unreachable")


def test_a_failing_model_call_releases_its_reservation() -> None:
    g = make_guard(max_cost_usd="0.05")
    with pytest.raises(ConnectionError):
        agent_with(FailingChatModel(model_name="gpt-4o"), AgentGuardMiddleware(g)).invoke(ASK)
    (record,) = records(g)
    assert (record.status, record.model_calls, record.cost_usd) == ("error", 0, D(0))
    assert reserved(g, record.task_id) == {}
    (call,) = model_spans(g)
    assert call.status == "error"


def test_a_run_with_a_checkpointer_is_keyed_by_its_thread() -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    g = make_guard(max_model_calls=2, on_limit="finish")
    agent = create_agent(
        model=scripted("gpt-4o-mini", reply_tokens=20),
        tools=[lookup],
        middleware=[AgentGuardMiddleware(g)],
        checkpointer=InMemorySaver(),
    )
    config: Any = {"configurable": {"thread_id": "conversation-7"}}
    agent.invoke(ASK, config=config)
    agent.invoke(ASK, config=config)  # a second run on the thread: a second task
    assert [(r.status, r.model_calls) for r in records(g)] == [("finished", 2), ("finished", 2)]


def test_missing_usage_is_estimated_and_labelled() -> None:
    g = make_guard(max_model_calls=2, on_limit="finish")
    answer = "A refund of the shipping fee is due; the parcel arrives on Friday."
    model = scripted("gpt-4o-mini", replies=[answer], report_usage=False)
    agent_with(model, AgentGuardMiddleware(g), tools=[lookup]).invoke(ASK)
    calls = model_spans(g)
    assert len(calls) == 2
    assert all(s.attrs.get("estimated") for s in calls)
    assert calls[-1].usage is not None
    assert calls[-1].usage.output_tokens == ag.counter_for("gpt-4o-mini").count(answer)
    assert calls[-1].usage.input_tokens > 0


def test_a_cap_below_one_is_read_as_no_cap() -> None:
    # -1 is "as many as the model may" for some LangChain models: the guard's cap is bound
    g = make_guard(max_cost_usd="1", max_output_tokens=90)
    model = scripted("gpt-4o-mini", replies=["Refund due."], max_tokens=-1, tool_calls=0)
    agent_with(model, AgentGuardMiddleware(g)).invoke(ASK)
    assert [s["max_tokens"] for s in model.seen] == [90]
    assert [s.attrs["max_tokens"] for s in model_spans(g)] == [90]


def test_finish_message_can_be_turned_off_and_metadata_stays() -> None:
    g = make_guard(max_model_calls=1, on_limit="finish")
    model = scripted("gpt-4o-mini", replies=["Refund due."])
    out = agent_with(model, AgentGuardMiddleware(g, finish_message=None)).invoke(ASK)
    final = out["messages"][-1]
    assert final.content == "Refund due."
    assert final.response_metadata["agentguard"]["ended_by"] == "finish"


def test_stream_is_metered_like_invoke() -> None:
    g = make_guard(max_model_calls=3, on_limit="finish")
    model = scripted("gpt-4o-mini", reply_tokens=20)
    agent = agent_with(model, AgentGuardMiddleware(g), tools=[lookup])
    chunks = list(agent.stream(ASK, stream_mode="updates"))
    assert chunks
    (record,) = records(g)
    assert (record.model_calls, record.status) == (3, "finished")


@pytest.fixture(autouse=True)
def _no_leaked_current_task() -> Iterator[None]:
    yield
    assert ag.current_task() is None


@MODES
def test_when_not_even_the_final_answer_fits_the_run_ends_with_a_message(mode: str) -> None:
    g = make_guard(max_cost_usd="0.0001", on_limit="finish")  # less than the prompt costs
    model = scripted("gpt-4o")
    out = run(agent_with(model, AgentGuardMiddleware(g)), mode)
    assert model.seen == []  # no call could be paid for
    final = out["messages"][-1]
    assert isinstance(final, AIMessage)
    assert final.tool_calls == []
    assert "stopped the run" in final.text
    assert "max_cost_usd" in final.text
    (record,) = records(g)
    assert (record.model_calls, record.cost_usd, record.limit_hit) == (0, D(0), "max_cost_usd")


def test_a_mapped_model_without_structured_output_is_refused_for_provider_strategy() -> None:
    from langchain.agents.structured_output import ProviderStrategy
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    g = make_guard(**LADDER)
    plain = scripted("gpt-4o-mini", profile={"structured_output": False})
    model = scripted("gpt-4o")
    agent = create_agent(
        model=model,
        tools=[lookup],
        response_format=ProviderStrategy(Answer),
        middleware=[AgentGuardMiddleware(g, models={"gpt-4o-mini": plain})],
    )
    with pytest.raises(ag.PolicyError, match="structured_output=False"):
        agent.invoke(ASK)
    assert model.seen == []


def test_a_failing_run_in_the_callers_task_leaves_the_task_to_the_caller() -> None:
    g = make_guard(max_cost_usd="0.05")
    mw = AgentGuardMiddleware(g)
    with pytest.raises(ConnectionError), g.task("t1") as task:
        agent_with(FailingChatModel(model_name="gpt-4o"), mw).invoke(ASK)
    assert task.status == "error"  # closed by the caller's with block, once
    assert [r.task_id for r in records(g)] == ["t1"]
    assert mw._runs == {}  # nothing of the failed run is left behind


class FlakyChatModel(ScriptedChatModel):
    """Fails its first call, then answers."""

    failures: int = 1

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("provider hiccup")
        return super()._generate(*args, **kwargs)


def test_retries_inside_the_middleware_are_one_run_one_task() -> None:
    from langchain.agents.middleware import ModelRetryMiddleware

    g = make_guard(max_model_calls=2, on_limit="finish")
    retry = ModelRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)
    agent = create_agent(
        model=FlakyChatModel(model_name="gpt-4o-mini", reply_tokens=20),
        tools=[lookup],
        middleware=[AgentGuardMiddleware(g), retry],  # the guard outermost, as documented
    )
    out = agent.invoke(ASK)
    assert out["messages"][-1].tool_calls == []
    (record,) = records(g)
    assert (record.status, record.model_calls) == ("finished", 2)


def test_a_retry_outside_the_middleware_keeps_charging_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from langchain.agents.middleware import ModelRetryMiddleware

    g = make_guard(max_model_calls=3, on_limit="finish")
    retry = ModelRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)
    model = FlakyChatModel(model_name="gpt-4o-mini", reply_tokens=20)
    agent = create_agent(model=model, tools=[lookup], middleware=[retry, AgentGuardMiddleware(g)])
    with caplog.at_level("WARNING", logger="agentguard"):
        out = agent.invoke(ASK)
    assert "Put AgentGuardMiddleware before retry and fallback middleware" in caplog.text
    assert out["messages"][-1].tool_calls == []
    (record,) = records(g)  # written when the error passed through, not again
    assert record.status == "error"
    calls = model_spans(g)
    assert calls[0].status == "error"
    assert len([s for s in calls if s.usage is not None]) == 3  # the limits still held


@MODES
def test_tool_results_are_trimmed_to_the_context_budget(mode: str) -> None:
    g = make_guard(context_budget_tokens=120, max_model_calls=3, on_limit="finish")

    @tool
    def fetch(query: str) -> str:
        """Fetch the carrier's tracking page."""
        events = [f"Event {i}: the parcel was scanned at depot {i} at 0{i}:00." for i in range(9)]
        return "\n\n".join(events * 4)  # 36 paragraphs, the last 27 repeat the first 9

    model = scripted("gpt-4o-mini", reply_tokens=20)
    agent = agent_with(model, AgentGuardMiddleware(g, trim_tool_results=True), tools=[fetch])
    out = run(agent, mode)

    tool_msgs = [m for m in out["messages"] if isinstance(m, ToolMessage)]
    assert len(tool_msgs) == 2
    counter = ag.counter_for("gpt-4o-mini")
    for m in tool_msgs:
        body, note = str(m.content).rsplit("\n\n", 1)
        assert counter.count(body) <= 120
        assert note.startswith("[agentguard: tool result trimmed to")
        assert body.startswith("Event 0:")  # in order
        assert body.count("Event 0:") == 1  # the repeats are gone
        meta = m.response_metadata["agentguard"]
        assert meta["tokens_kept"] <= 120 < meta["tokens_in"]
    (record,) = records(g)
    assert record.tokens_saved > 0
    assert record.saved_usd > 0
    assert len([s for s in spans(g) if s.kind == "trim"]) == 2


def test_trim_tool_results_needs_a_context_budget() -> None:
    with pytest.raises(ag.PolicyError, match="context_budget_tokens"):
        AgentGuardMiddleware(make_guard(), trim_tool_results=True)
