"""Under ``ainvoke`` every budget-store operation of ``AgentGuardMiddleware`` is awaited: on a
networked store (Redis) a sync operation would block the event loop for a round trip. Checked
with ``LoopCheckingStore``, which notes sync operations made while a loop runs on their thread,
on real ``create_agent`` agents driven by scripted models — and the async run must decide and
charge exactly as the sync one."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.outputs import ChatResult
from langchain_core.tools import BaseTool, tool
from test_lc_middleware import ASK, lookup, scripted, search

import agentguard as ag
from agentguard.testing import LoopCheckingStore
from agentguard_langchain import AgentGuardMiddleware
from agentguard_langchain.testing import ScriptedChatModel


def guard_on(store: LoopCheckingStore, **policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), store=store, traces="memory")


def build(
    g: ag.Guard, tools: list[BaseTool], **mw: Any
) -> tuple[Any, ScriptedChatModel, ScriptedChatModel]:
    big, cheap = scripted("gpt-4o"), scripted("gpt-4o-mini")
    middleware = AgentGuardMiddleware(g, models={"gpt-4o-mini": cheap}, task_id="run", **mw)
    return create_agent(model=big, tools=tools, middleware=[middleware]), big, cheap


def outcome(g: ag.Guard, out: dict[str, Any], *models: ScriptedChatModel) -> dict[str, Any]:
    """What a run decided and charged, as far as the caller and the trace can tell."""
    (record,) = g.sink.tasks  # type: ignore[attr-defined]
    final = out["messages"][-1]
    return {
        "decisions": [
            (s.attrs.get("decision"), s.kind, s.model, s.status)
            for s in g.sink.spans  # type: ignore[attr-defined]
        ],
        "record": (
            record.status,
            record.limit_hit,
            record.cost_usd,
            record.model_calls,
            record.tool_calls,
            record.decisions,
        ),
        "sent": [m.seen for m in models],
        "final": (final.text, final.tool_calls, final.response_metadata.get("agentguard")),
    }


POLICIES = pytest.mark.parametrize(
    ("policy", "tools", "mw"),
    [
        (  # a money ceiling: a downgrade down the ladder, then the graceful final answer
            {
                "max_cost_usd": "0.05",
                "max_output_tokens": 400,
                "downgrade": [ag.Downgrade(at=0.6, to="gpt-4o-mini")],
                "on_limit": "finish",
            },
            [search],
            {},
        ),
        ({"max_model_calls": 3, "on_limit": "finish"}, [lookup], {}),  # the last call kept
        ({"max_steps": 3, "on_limit": "finish"}, [lookup], {}),  # a step cap: the final call
        ({"max_tool_calls": 2, "on_limit": "finish"}, [lookup], {}),  # a blocked tool call
        ({"max_cost_usd": "0.01", "max_output_tokens": 400}, [search], {"exit_behavior": "end"}),
    ],
    ids=["money", "model-calls", "steps", "tools", "stop-end"],
)


@POLICIES
async def test_an_async_agent_run_never_blocks_its_loop_on_the_store(
    policy: dict[str, Any], tools: list[BaseTool], mw: dict[str, Any]
) -> None:
    sync_g = guard_on(LoopCheckingStore(), **policy)
    agent, big, cheap = build(sync_g, tools, **mw)
    sync = outcome(sync_g, agent.invoke(ASK), big, cheap)

    store = LoopCheckingStore()
    g = guard_on(store, **policy)
    agent, big, cheap = build(g, tools, **mw)
    out = await agent.ainvoke(ASK)

    assert store.blocking == []
    # the store was really used, through its async methods
    (record,) = g.sink.tasks  # type: ignore[attr-defined]
    assert store.ops.get("asnapshot", 0) >= 1  # the run's task opened with aopen_task
    assert store.ops.get("areserve", 0) == record.model_calls > 0
    assert store.ops.get("acommit", 0) == record.model_calls
    assert store.ops.get("acharge", 0) >= record.tool_calls > 0
    # and the async run decided, sent and charged exactly as the sync one
    assert outcome(g, out, big, cheap) == sync


async def test_the_callers_task_is_charged_with_the_async_api() -> None:
    store = LoopCheckingStore()
    g = guard_on(store, max_model_calls=3, on_limit="finish")
    agent, _, _ = build(g, [lookup])
    async with g.task("caller") as task:
        await agent.ainvoke(ASK)
        await agent.ainvoke(ASK)  # the same task: no call left but the final answer's
    assert store.blocking == []
    assert (task.model_calls, task.status) == (3, "finished")
    assert store.ops["areserve"] == 3


async def test_a_stop_under_raise_is_awaited_and_closes_the_task() -> None:
    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="0.01", max_output_tokens=400)
    agent, _, _ = build(g, [search])
    with pytest.raises(ag.BudgetExceeded) as err:
        await agent.ainvoke(ASK)
    assert err.value.limit == "max_cost_usd"
    assert store.blocking == []
    (record,) = g.sink.tasks  # type: ignore[attr-defined]
    assert (record.status, record.limit_hit) == ("stopped", "max_cost_usd")
    balance = (await store.asnapshot([f"task:{record.task_id}"]))[f"task:{record.task_id}"]
    assert not any(balance.reserved.values())


class FailingChatModel(ScriptedChatModel):
    async def _agenerate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise ConnectionError("provider unreachable")


async def test_failures_release_through_the_async_api() -> None:
    # a model call the provider fails: its reservation released, the run's task closed
    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="0.05")
    mw = AgentGuardMiddleware(g)
    agent = create_agent(
        model=FailingChatModel(model_name="gpt-4o"), tools=[search], middleware=[mw]
    )
    with pytest.raises(ConnectionError):
        await agent.ainvoke(ASK)
    assert store.blocking == []
    assert store.ops["arelease"] == 1
    (record,) = g.sink.tasks  # type: ignore[attr-defined]
    assert (record.status, record.model_calls, record.cost_usd) == ("error", 0, Decimal(0))

    # a failing tool: its span closed as failed, the run's task closed with the error
    @tool
    def broken(query: str) -> str:
        """Always fails."""
        raise RuntimeError("carrier API down")

    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="0.05")
    agent = create_agent(
        model=scripted("gpt-4o-mini"), tools=[broken], middleware=[AgentGuardMiddleware(g)]
    )
    with pytest.raises(RuntimeError, match="carrier API down"):
        await agent.ainvoke(ASK)
    assert store.blocking == []
    (record,) = g.sink.tasks  # type: ignore[attr-defined]
    assert (record.status, record.model_calls, record.tool_calls) == ("error", 1, 1)

    # a rung whose model cannot hold the request: refused, its reservation released
    store = LoopCheckingStore()
    g = guard_on(
        store,
        max_cost_usd="0.01",
        max_output_tokens=400,
        downgrade=[ag.Downgrade(at=0.3, to="gpt-4o-mini")],
    )
    small = scripted("gpt-4o-mini", profile={"max_input_tokens": 1000})
    mw = AgentGuardMiddleware(g, models={"gpt-4o-mini": small})
    agent = create_agent(model=scripted("gpt-4o"), tools=[search], middleware=[mw])
    with pytest.raises(ag.PolicyError, match="context window of 1000 tokens"):
        await agent.ainvoke(ASK)
    assert small.seen == []
    assert store.blocking == []
    assert store.ops["arelease"] == 1
