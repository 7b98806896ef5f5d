"""The graph guard's glue on its hot path: the spend ledger of runs in flight together, the run
task each ``invoke`` opens and closes itself, the tool gate's metered flag, and a wrapped node
called outside a graph run."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from lg_support import Scripted, react_graph, user

import agentguard as ag
from agentguard_langchain import AgentGuardCallbackHandler
from agentguard_langgraph import GraphGuard

POLICY = ag.Policy(max_steps=20, max_cost_usd="1", on_limit="finish")


def state_matches_task(out: dict[str, Any], task: ag.Task) -> None:
    """The run's state says exactly what its own task spent (nothing of the other run's)."""
    spend = out["agentguard"]
    assert spend["cost_usd"] == task.cost_usd
    assert spend["input_tokens"] == task.usage.input_tokens
    assert spend["output_tokens"] == task.usage.output_tokens
    assert spend["tokens"] == task.usage.input_tokens + task.usage.output_tokens
    assert spend["model_calls"] == task.model_calls
    assert spend["tool_calls"] == task.tool_calls
    assert spend["tool_calls_by_name"] == task.tool_calls_by_name
    assert spend["steps"] == task.steps


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_runs_in_flight_together_each_record_their_own_spend(mode: str) -> None:
    # one GraphGuard, two runs whose nodes record in turn: each record switches the ledger
    # from one run's task to the other's, which must pick up where that task left off
    gg = GraphGuard(ag.Guard(POLICY, traces=False))
    runs = [
        gg.bind(
            react_graph(
                gg, Scripted(model_name="gpt-4o", tool_calls=t, latency=0.02), steps_in="node"
            )
        )
        for t in (3, 4)
    ]
    if mode == "sync":
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda g: g.invoke(user()), runs))
    else:
        outs = await asyncio.gather(*(g.ainvoke(user()) for g in runs))
    tasks = [g.last_task for g in runs]
    assert tasks[0] is not None and tasks[1] is not None and tasks[0] is not tasks[1]
    assert [t.tool_calls for t in tasks] == [3, 4]
    for out, task in zip(outs, tasks, strict=True):
        state_matches_task(out, task)
    # the two models really answered at the same time: the records interleaved
    assert gg._ledgers  # a task still running when the other recorded kept its ledger


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_run_that_fails_closes_its_task_and_leaves_no_current_task(mode: str) -> None:
    class BrokenNodeError(Exception):
        pass

    guard = ag.Guard(POLICY, traces=False)
    gg = GraphGuard(guard)

    def agent(state: Any) -> dict[str, Any]:
        raise BrokenNodeError("the node failed")

    async def aagent(state: Any) -> dict[str, Any]:
        raise BrokenNodeError("the node failed")

    from langchain_core.runnables import RunnableLambda
    from langgraph.graph import START, StateGraph
    from lg_support import State

    b = StateGraph(State)
    b.add_node("agent", RunnableLambda(gg.node(agent), afunc=gg.node(aagent)))
    b.add_edge(START, "agent")
    graph = gg.bind(b.compile())
    with pytest.raises(BrokenNodeError):
        graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    assert ag.current_task() is None
    assert graph.last_task is not None
    assert graph.last_task.status == "error"
    assert graph.last_task.ended is not None


def test_a_task_of_another_guard_is_not_the_parent_of_the_run() -> None:
    gg = GraphGuard(ag.Guard(POLICY, traces=False))
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o", tool_calls=1)))
    other = ag.Guard(traces=False)
    with other.task("someone-else") as outer:
        graph.invoke(user())
        assert ag.current_task() is outer
    assert graph.last_task is not None
    assert graph.last_task.parent is None


def test_the_thread_id_tag_comes_from_the_config_unless_the_guard_sets_it() -> None:
    guard = ag.Guard(POLICY, traces=False)
    config: Any = {"configurable": {"thread_id": "t-7"}}
    for tags, expected in (({"team": "cx"}, "t-7"), ({"thread_id": "mine"}, "mine")):
        gg = GraphGuard(guard, tags=tags)
        graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o", tool_calls=1)))
        graph.invoke(user(), config)
        assert graph.last_task is not None
        assert graph.last_task.tags["thread_id"] == expected
        assert gg.tags == tags  # the guard's own tags are left as they were


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_callback_handler_on_the_run_does_not_count_the_gated_tools_again(
    mode: str,
) -> None:
    guard = ag.Guard(POLICY, traces=False)
    gg = GraphGuard(guard)
    graph = gg.bind(
        react_graph(gg, Scripted(model_name="gpt-4o", tool_calls=3, parallel_tool_calls=2))
    )
    config: Any = {"callbacks": [AgentGuardCallbackHandler(guard)]}
    out = graph.invoke(user(), config) if mode == "sync" else await graph.ainvoke(user(), config)
    task = graph.last_task
    assert task is not None
    ran = [m for m in out["messages"] if m.type == "tool"]
    assert len(ran) == 6
    assert task.tool_calls == 6  # each once: the tool gate marked its calls as metered
    assert task.model_calls == 4
    assert out["agentguard"]["tool_calls"] == 6


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_wrapped_node_called_outside_a_graph_run_is_a_first_attempt(mode: str) -> None:
    guard = ag.Guard(POLICY, traces=False)
    gg = GraphGuard(guard)

    def node(state: Any) -> dict[str, Any]:
        return {"seen": state}

    async def anode(state: Any) -> dict[str, Any]:
        return {"seen": state}

    from langchain_core.runnables import RunnableLambda

    wrapped = gg.node(node if mode == "sync" else anode, step=True)
    # called as a function (no runnable config at all), then as a runnable outside a graph
    # (a config without LangGraph's runtime in it)
    as_runnable = RunnableLambda(wrapped)
    with guard.task("direct") as task:
        out = wrapped(1) if mode == "sync" else await wrapped(1)
        again = as_runnable.invoke(2) if mode == "sync" else await as_runnable.ainvoke(2)
    assert task.retries == 0
    assert task.steps == 2
    assert out == {"seen": 1, "agentguard": {"steps": 1}}
    assert again == {"seen": 2, "agentguard": {"steps": 1}}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_wrapped_node_carries_its_signature_and_still_gets_its_config(mode: str) -> None:
    import inspect

    from langchain_core.runnables import RunnableConfig, RunnableLambda
    from langgraph.graph import START, StateGraph
    from lg_support import State

    guard = ag.Guard(POLICY, traces=False)
    gg = GraphGuard(guard)

    def node(state: State, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [("ai", str(config["configurable"]["ticket"]))]}

    async def anode(state: State, config: RunnableConfig) -> dict[str, Any]:
        return node(state, config)

    fn = node if mode == "sync" else anode
    wrapped = gg.node(fn, step=True)
    # LangChain's RunnableLambda asks for the signature on every call: the wrapper has it at
    # hand instead of unwrapping and rebuilding it each time
    assert wrapped.__signature__ == inspect.signature(fn)  # type: ignore[attr-defined]
    config: Any = {"configurable": {"ticket": 1182}}
    for as_node in (wrapped, RunnableLambda(wrapped)):
        b = StateGraph(State)
        b.add_node("agent", as_node)
        b.add_edge(START, "agent")
        graph = gg.bind(b.compile())
        if mode == "sync":
            out = graph.invoke(user(), config)
        else:
            out = await graph.ainvoke(user(), config)
        assert out["messages"][-1].content == "1182"
        assert out["agentguard"]["steps"] == 1  # the wrapper ran: a step, recorded


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_streamed_run_charges_one_task_closed_when_the_stream_ends(mode: str) -> None:
    guard = ag.Guard(POLICY, traces=False)
    gg = GraphGuard(guard)
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o", tool_calls=2), steps_in="node"))
    config: Any = {"configurable": {"thread_id": "t-stream"}}
    with guard.task("caller") as caller:
        if mode == "sync":
            chunks = list(graph.stream(user(), config, stream_mode="values"))
        else:
            chunks = [c async for c in graph.astream(user(), config, stream_mode="values")]
        assert ag.current_task() is caller
    task = graph.last_task
    assert task is not None
    assert task.parent is caller  # the caller's task of the same guard
    assert task.tags["thread_id"] == "t-stream"
    assert task.ended is not None and task.status == "ok"
    assert (task.model_calls, task.tool_calls, task.steps) == (3, 2, 3)
    state_matches_task(chunks[-1], task)
