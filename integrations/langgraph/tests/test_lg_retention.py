"""A guarded run keeps nothing alive once it is over.

An always-on agent runs for weeks: whatever the guard keeps per run (a cache entry, a span, a
ledger) grows the process and makes the garbage collector run more often (a strong count cache
once kept ~70 objects per ReAct run). Each test warms a shape up, then counts the objects the
garbage collector tracks before and after more runs, guarded and bare (the same graph or agent
without agentguard: what the process keeps by itself — under coverage, a tracer per thread
ToolNode starts — is kept on both sides). Not even the budget line of each run's task: its id
was made up for the run, so the embedded store lets the line go when the task closes.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from lg_support import Scripted, bare_react_graph, react_graph, search, user

import agentguard as ag
import agentguard._tokens as tokens_module
from agentguard_langchain import AgentGuardMiddleware
from agentguard_langgraph import GraphGuard

RUNS = 30


def kept_per_run(run: Callable[[], Any]) -> float:
    """Objects the collector tracks that ``RUNS`` more runs left behind, per run."""
    for _ in range(10):  # warm-up: lazily built caches of the frameworks and of the guard
        run()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(RUNS):
        run()
    gc.collect()
    return (len(gc.get_objects()) - before) / RUNS


def policy() -> ag.Policy:
    return ag.Policy(max_cost_usd="1000", max_steps=1000, on_limit="finish")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_guarded_react_graph_keeps_nothing_per_run(mode: str) -> None:
    guard = ag.Guard(policy(), traces=False)
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o", tool_calls=3)
    plain = Scripted(model_name="gpt-4o", tool_calls=3)
    graphs = {
        "guarded": (gg.bind(react_graph(gg, model, steps_in="node")), model),
        "bare": (bare_react_graph(plain), plain),
    }
    loop = asyncio.new_event_loop()

    def runner(name: str) -> Callable[[], None]:
        graph, m = graphs[name]

        def run() -> None:
            m._calls = 0  # the script (3 tool calls, then an answer) restarts per run
            m.seen.clear()
            if mode == "sync":
                out = graph.invoke(user())
            else:
                out = loop.run_until_complete(graph.ainvoke(user()))
            assert sum(msg.type == "tool" for msg in out["messages"]) == 3

        return run

    try:
        bare = kept_per_run(runner("bare"))
        guarded = kept_per_run(runner("guarded"))
    finally:
        loop.close()
    assert guarded - bare <= 0.5, (guarded, bare)
    assert list(guard.store.live) == []  # type: ignore[attr-defined]


def test_a_create_agent_run_with_the_middleware_keeps_nothing_per_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``create_agent`` binds its tools afresh for every model call: fresh schema dicts, which
    the counter holds in a small cache only (bounded, so it is made smaller here than the
    window measured: otherwise the window would see it fill up to its bound)."""
    monkeypatch.setattr(tokens_module, "_HELD_TOOLS_MAX", 2)
    guard = ag.Guard(policy(), traces=False)
    model = Scripted(model_name="gpt-4o", tool_calls=3)
    plain = Scripted(model_name="gpt-4o", tool_calls=3)
    guarded_agent = create_agent(
        model=model, tools=[search], middleware=[AgentGuardMiddleware(guard)]
    )
    bare_agent = create_agent(model=plain, tools=[search])

    def runner(agent: Any, m: Scripted) -> Callable[[], None]:
        def run() -> None:
            m._calls = 0
            m.seen.clear()
            out = agent.invoke(user())
            assert sum(msg.type == "tool" for msg in out["messages"]) == 3

        return run

    bare = kept_per_run(runner(bare_agent, plain))
    guarded = kept_per_run(runner(guarded_agent, model))
    assert guarded - bare <= 0.5, (guarded, bare)
    assert list(guard.store.live) == []  # type: ignore[attr-defined]
