"""A hand-written ReAct StateGraph whose scripted model calls tools forever, kept inside its
budget by a GraphGuard: step caps, money ceilings, downgrades, sync and async."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import tools_condition
from langgraph.types import RetryPolicy
from lg_support import Scripted, State, react_graph, search, user

import agentguard as ag
from agentguard_langgraph import GraphGuard


def kinds(task: ag.Task) -> list[str]:
    return [f"{d.kind}:{d.action}" for d in task.decisions if d.kind != "soft_limit"]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_step_cap_routes_to_the_finishing_node(mode: str) -> None:
    sink = ag.MemorySink()
    guard = ag.Guard(ag.Policy(max_steps=4, on_limit="finish"), traces=sink)
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o")
    graph = gg.bind(react_graph(gg, model))
    if mode == "sync":
        out = graph.invoke(user())  # default recursion_limit: only the guard stops the loop
    else:
        out = await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    final = out["messages"][-1]
    assert isinstance(final, AIMessage)
    assert final.tool_calls == []
    assert final.response_metadata["agentguard"]["limit"] == "max_steps"
    assert "budget ended the run" in final.text
    # 3 tool-calling steps, then the 4th (last allowed) step is the final answer
    assert task.status == "finished"
    assert task.steps == 4
    assert task.model_calls == 4
    assert task.tool_calls == 3
    assert model.seen[-1]["tool_choice"] == "none"
    assert model.seen[-1]["max_tokens"] == 256  # finish_output_tokens
    # the spend is in the state, exactly
    assert out["agentguard"]["cost_usd"] == task.cost_usd
    assert out["agentguard"]["model_calls"] == 4
    assert out["agentguard"]["tool_calls"] == 3
    assert out["agentguard"]["steps"] == 4
    assert out["agentguard"]["tokens"] == task.usage.total_tokens
    assert out["agentguard"]["input_tokens"] == task.usage.input_tokens
    assert out["agentguard"]["output_tokens"] == task.usage.output_tokens
    assert out["agentguard"]["tool_calls_by_name"] == {"search": 3}
    # the step cap's finish is a decision like the others: in the task, the state, the trace
    assert kinds(task) == ["step:finish"]
    assert out["agentguard"]["decisions"] == ["step:finish"]
    # the trace: 4 steps and the cap's finish decision, 4 model spans, 3 tool spans
    spans = [s for s in sink.spans if s.task_id == task.id]
    steps = [s for s in spans if s.kind == "step"]
    assert [s.decision for s in steps] == ["allow"] * 4 + ["finish"]
    assert steps[-1].reason == "4 of 4 steps used"
    assert sum(s.kind == "model" for s in spans) == 4
    assert sum(s.kind == "tool" for s in spans) == 3
    assert sink.tasks[-1].status == "finished"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_money_ceiling_downgrades_then_finishes_in_the_agent_node(mode: str) -> None:
    guard = ag.Guard(
        ag.Policy(
            max_cost_usd="0.02",
            on_limit="finish",
            downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")],
        ),
        traces="memory",
    )
    mini = Scripted(model_name="gpt-4o-mini")
    gg = GraphGuard(guard, models={"gpt-4o-mini": mini})
    big = Scripted(model_name="gpt-4o", reply_tokens=400)
    graph = gg.bind(react_graph(gg, big))
    out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    assert task.cost_usd is not None
    assert task.cost_usd <= Decimal("0.02")
    assert kinds(task) == ["model:downgrade", "model:finish"]
    assert out["agentguard"]["decisions"] == ["model:downgrade", "model:finish"]
    assert out["agentguard"]["cost_usd"] == task.cost_usd
    final = out["messages"][-1]
    assert final.tool_calls == []
    assert final.response_metadata["agentguard_final"] is True
    # the remaining steps ran on the cheaper model, never back up
    assert {s["model"] for s in mini.seen} == {"gpt-4o-mini"}
    assert len(mini.seen) >= 2
    assert task.status == "finished"


async def run(graph: Any, mode: str, payload: Any) -> Any:
    return graph.invoke(payload) if mode == "sync" else await graph.ainvoke(payload)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_hard_stop_raises_out_of_invoke(mode: str) -> None:
    guard = ag.Guard(ag.Policy(max_steps=3), traces=False)  # on_limit="raise"
    gg = GraphGuard(guard)
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o")))
    with pytest.raises(ag.BudgetExceeded, match="max_steps"):
        await run(graph, mode, user())
    assert graph.last_task is not None
    assert graph.last_task.status == "stopped"
    # the third step is taken, and its model call is refused: the cap is reached
    assert graph.last_task.steps == 3
    assert graph.last_task.model_calls == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_hard_stop_ends_the_run_with_exit_behavior_end(mode: str) -> None:
    guard = ag.Guard(ag.Policy(max_steps=2), traces=False)
    gg = GraphGuard(guard, exit_behavior="end")
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o")))
    out = await run(graph, mode, user())
    # the agent node's refused call ends the run with a message saying why
    last = out["messages"][-1]
    assert last.type == "ai"
    assert last.tool_calls == []
    assert last.response_metadata["agentguard"]["ended_by"] == "stop"
    assert last.response_metadata["agentguard"]["limit"] == "max_steps"
    assert graph.last_task is not None
    assert graph.last_task.decisions[-1].action == "stop"
    assert graph.last_task.status == "ok"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_tool_cap_blocks_the_tool_and_the_next_call_is_final(mode: str) -> None:
    guard = ag.Guard(ag.Policy(max_tool_calls=2, max_steps=20, on_limit="finish"), traces=False)
    gg = GraphGuard(guard)
    # three parallel tool calls in one answer: two run, the third is blocked
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o", parallel_tool_calls=3)))
    out = await run(graph, mode, user())
    task = graph.last_task
    assert task is not None
    assert task.tool_calls == 2
    blocked = [m for m in out["messages"] if m.type == "tool" and m.status == "error"]
    assert len(blocked) == 1
    assert "blocked by the budget" in blocked[0].text
    assert out["messages"][-1].tool_calls == []
    assert kinds(task) == ["tool:block", "model:finish"]
    # the state: two tool calls ran (the per-tool dict too), the block and the finish
    assert out["agentguard"]["tool_calls"] == 2
    assert out["agentguard"]["tool_calls_by_name"] == {"search": 2}
    assert out["agentguard"]["decisions"] == ["tool:block", "model:finish"]


def test_graph_without_a_task_says_how_to_run_it() -> None:
    gg = GraphGuard(ag.Guard(traces=False))
    graph = react_graph(gg, Scripted(model_name="gpt-4o"))
    with pytest.raises(RuntimeError, match=r"gg\.bind"):
        graph.invoke(user())


def test_callers_task_is_the_parent_of_the_run() -> None:
    guard = ag.Guard(ag.Policy(max_cost_usd="0.01", on_limit="finish"), traces=False)
    gg = GraphGuard(guard)
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o", reply_tokens=200)))
    with guard.task(
        "request-1", policy=ag.Policy(max_cost_usd="0.004", on_limit="finish")
    ) as outer:
        graph.invoke(user())
        graph.invoke(user())
    run = graph.last_task
    assert run is not None
    assert run.parent is outer
    assert outer.spent.cost_usd <= Decimal("0.004")


def test_unmapped_rung_is_refused_before_any_spend() -> None:
    guard = ag.Guard(
        ag.Policy(max_cost_usd="1", downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")]),
        traces=False,
    )
    with pytest.raises(ag.PolicyError, match=r"downgrade\[0\]\.to"):
        GraphGuard(guard).chat_model(Scripted(model_name="gpt-4o"))
    with pytest.raises(ag.PolicyError, match="bind_tools"):
        GraphGuard(guard, models={"gpt-4o-mini": object()})  # type: ignore[dict-item]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_steps_counted_in_the_node_wrapper_end_in_the_agents_own_final_call(
    mode: str,
) -> None:
    """The bare graph's shape (plain edges, no finishing node): ``gg.node(agent, step=True)``
    counts the steps, and the cap's last step is the model's own final answer."""
    sink = ag.MemorySink()
    guard = ag.Guard(ag.Policy(max_steps=4, on_limit="finish"), traces=sink)
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o")
    graph = gg.bind(react_graph(gg, model, steps_in="node"))
    out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    final = out["messages"][-1]
    assert final.tool_calls == []
    assert final.response_metadata["agentguard_final"] is True
    assert model.seen[-1]["tool_choice"] == "none"
    assert model.seen[-1]["max_tokens"] == 256  # finish_output_tokens
    assert (task.steps, task.model_calls, task.tool_calls) == (4, 4, 3)
    assert kinds(task) == ["model:finish"]
    assert task.decisions[-1].limit == "max_steps"
    assert task.status == "finished"
    assert out["agentguard"]["steps"] == 4
    assert out["agentguard"]["tool_calls"] == 3
    assert out["agentguard"]["decisions"] == ["model:finish"]
    assert out["agentguard"]["cost_usd"] == task.cost_usd
    spans = [s for s in sink.spans if s.task_id == task.id]
    assert [s.decision for s in spans if s.kind == "step"] == ["allow"] * 4


def test_a_node_counting_steps_stops_a_graph_that_comes_back_after_the_final_answer() -> None:
    """A plain model (not ``gg.chat_model``) ignores the finish: past the cap the node stops
    the run instead of looping."""
    guard = ag.Guard(ag.Policy(max_steps=2, on_limit="finish"), traces=False)
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o")
    llm = model.bind_tools([search])

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    b = StateGraph(State)
    b.add_node("agent", gg.node(agent, step=True))
    b.add_node("tools", gg.tool_node([search]))
    b.add_edge(START, "agent")
    b.add_conditional_edges("agent", tools_condition)
    b.add_edge("tools", "agent")
    out = gg.bind(b.compile()).invoke(user())
    last = out["messages"][-1]
    assert last.response_metadata["agentguard"]["ended_by"] == "stop"
    assert last.response_metadata["agentguard"]["limit"] == "max_steps"
    assert len(model.seen) == 2
    assert out["agentguard"]["steps"] == 2


class FlakyError(Exception):
    """The provider's transient error."""


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_node_retries_ask_the_guard_first(mode: str) -> None:
    """A node whose ``RetryPolicy`` runs it again: every attempt after the first is a retry,
    counted against ``max_retries`` before it runs; past it the run ends."""
    guard = ag.Guard(ag.Policy(max_retries=2, on_limit="finish"), traces="memory")
    gg = GraphGuard(guard)
    attempts: list[int] = []

    def fetch(state: State) -> dict[str, Any]:
        attempts.append(1)
        raise FlakyError("upstream timed out")

    async def afetch(state: State) -> dict[str, Any]:
        return fetch(state)

    b = StateGraph(State)
    node = gg.node(fetch) if mode == "sync" else gg.node(afetch)
    b.add_node(
        "fetch",
        node,
        retry_policy=RetryPolicy(
            max_attempts=10, initial_interval=0.0, jitter=False, retry_on=FlakyError
        ),
    )
    b.add_edge(START, "fetch")
    graph = gg.bind(b.compile())
    out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    # attempt 1, then two retries the policy allows; the third retry is refused before it runs
    assert len(attempts) == 3
    assert task.retries == 2
    assert out["agentguard"]["retries"] == 2
    last = out["messages"][-1]
    assert last.response_metadata["agentguard"]["ended_by"] == "stop"
    assert last.response_metadata["agentguard"]["limit"] == "max_retries"
    assert kinds(task) == ["retry:stop"]
    assert [s.kind for s in guard.sink.spans if s.task_id == task.id].count("retry") == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_route_sends_a_downgraded_run_to_the_users_own_node(mode: str) -> None:
    """``route`` answers ``"downgrade"`` once the ladder moved the run to the cheaper model:
    mapped with ``downgrade_to``, the graph goes through the user's node on every later step
    (here it notes the switch), and the remaining calls run on the cheaper rung."""
    guard = ag.Guard(
        ag.Policy(
            max_cost_usd="0.005",
            max_steps=8,
            on_limit="finish",
            downgrade=[ag.Downgrade(at=0.3, to="gpt-4o-mini")],
        ),
        traces=False,
    )
    mini = Scripted(model_name="gpt-4o-mini")
    gg = GraphGuard(guard, models={"gpt-4o-mini": mini})
    big = Scripted(model_name="gpt-4o", reply_tokens=400)
    llm = gg.chat_model(big).bind_tools([search])
    visits: list[str] = []

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: State) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    def cheaper(state: State) -> dict[str, Any]:
        visits.append("cheaper")
        return {}

    paths = gg.path_map(continue_to="agent", finish_to="finish", downgrade_to="cheaper")
    b = StateGraph(State)
    b.add_node("agent", RunnableLambda(gg.node(agent), afunc=gg.node(aagent)))
    b.add_node("cheaper", cheaper)
    b.add_node("tools", gg.tool_node([search]))
    b.add_node("finish", gg.finish_node(big, tools=[search]))
    b.add_conditional_edges(START, gg.route, paths)
    b.add_conditional_edges("agent", tools_condition)
    b.add_conditional_edges("tools", gg.route, paths)
    b.add_edge("cheaper", "agent")
    b.add_edge("finish", END)
    graph = gg.bind(b.compile())
    out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    assert kinds(task)[0] == "model:downgrade"
    # the call that crossed the rung's threshold ran on it; every later step went through the
    # user's node first, and stayed on the rung (the final answer included)
    assert big.seen and all(s["model"] == "gpt-4o" for s in big.seen)
    assert all(s["model"] == "gpt-4o-mini" for s in mini.seen)
    assert mini.seen[-1]["tool_choice"] == "none"
    assert len(visits) >= 2
    assert len(visits) in (len(mini.seen) - 1, len(mini.seen) - 2)
    assert out["agentguard"]["decisions"][0] == "model:downgrade"
    assert out["messages"][-1].tool_calls == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_route_edge_reads_no_channel_a_node_writes(mode: str) -> None:
    """LangGraph reads a conditional edge's input fresh (the step's writes applied to copies of
    the channels it reads): the route asks for none of the state's keys, so no step copies the
    conversation for it, and the graph's state and output carry no key of the route's."""
    guard = ag.Guard(ag.Policy(max_steps=4, on_limit="finish"), traces=False)
    gg = GraphGuard(guard)
    seen: list[Any] = []
    edge: Any = gg.route
    decide, adecide = edge._decide, edge._adecide

    def spy(state: Any) -> Any:
        seen.append(state)
        return decide(state)

    async def aspy(state: Any) -> Any:
        seen.append(state)
        return await adecide(state)

    edge._decide, edge._adecide = spy, aspy
    saver = InMemorySaver()
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o"), checkpointer=saver))
    config: Any = {"configurable": {"thread_id": f"route-{mode}"}}
    out = graph.invoke(user(), config) if mode == "sync" else await graph.ainvoke(user(), config)
    assert len(seen) == 4  # START and three tool steps, each routed once
    assert all(state == {} for state in seen), seen
    assert set(out) == {"messages", "agentguard"}
    assert out["agentguard"]["steps"] == 4
    # the route's own key is a channel of the compiled graph, never written nor checkpointed
    assert "agentguard_route" in graph.graph.channels
    assert set(graph.graph.get_state(config).values) == {"messages", "agentguard"}
    for saved in saver.list(config):
        assert "agentguard_route" not in saved.checkpoint["channel_values"]
