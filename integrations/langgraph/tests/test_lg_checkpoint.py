"""A checkpointed thread (InMemorySaver and SqliteSaver) interrupted before every tool call and
resumed on the same ``thread_id``: with ``budget="thread"`` each resumed run continues against
what the thread already spent — the ``Decimal`` cost in the state survives the checkpoint — and
the thread ends at its ceiling exactly where one uninterrupted run would, sync and async."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from lg_support import Scripted, react_graph, user

import agentguard as ag
from agentguard_langgraph import GraphGuard

CEILING = Decimal("0.01")


def policy() -> ag.Policy:
    return ag.Policy(max_cost_usd=CEILING, on_limit="finish")


@contextlib.asynccontextmanager
async def saver(kind: str, mode: str, tmp_path: Path) -> AsyncIterator[Any]:
    if kind == "memory":
        yield InMemorySaver()
    elif mode == "sync":
        with SqliteSaver.from_conn_string(str(tmp_path / "threads.sqlite")) as cp:
            yield cp
    else:
        async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "threads.sqlite")) as acp:
            yield acp


def spend(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k == "agentguard"}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_resumed_thread_continues_against_what_it_spent(
    kind: str, mode: str, tmp_path: Path
) -> None:
    sink = ag.MemorySink()
    guard = ag.Guard(policy(), traces=sink)
    gg = GraphGuard(guard, budget="thread")
    model = Scripted(model_name="gpt-4o", reply_tokens=300)
    config: Any = {"configurable": {"thread_id": "ticket-1182"}}
    tasks: list[ag.Task] = []
    states: list[dict[str, Any]] = []
    async with saver(kind, mode, tmp_path) as checkpointer:
        graph = gg.bind(
            react_graph(gg, model, checkpointer=checkpointer, interrupt_before=["tools"])
        )
        payload: Any = user()
        for _ in range(30):
            if mode == "sync":
                out = graph.invoke(payload, config)
                snap = graph.get_state(config)
            else:
                out = await graph.ainvoke(payload, config)
                snap = await graph.aget_state(config)
            assert graph.last_task is not None
            tasks.append(graph.last_task)
            states.append(spend(snap.values))
            if not snap.next:
                break
            assert snap.next == ("tools",)  # interrupted before the tool call
            payload = None  # resume the thread where it stopped

    # every run but the last is interrupted after one model call; the thread's ceiling ends
    # it (how many calls fit varies by a few tokens: the scripted tool-call ids are random)
    assert len(tasks) > 3
    final_cost = states[-1]["agentguard"]["cost_usd"]
    assert isinstance(final_cost, Decimal)  # survived the checkpoint as a Decimal
    assert CEILING / 2 < final_cost <= CEILING
    # each resumed run started from the thread's spend: its task's balance is the thread's
    # total, its own calls are only its share
    for before, after, task in zip([None, *states], states, tasks, strict=False):
        seeded = before["agentguard"]["cost_usd"] if before else Decimal(0)
        assert task.spent.cost_usd == after["agentguard"]["cost_usd"]
        assert task.cost_usd == after["agentguard"]["cost_usd"] - seeded
        assert task.model_calls == 1
        assert task.tags["thread_id"] == "ticket-1182"
    assert sum((t.cost_usd or Decimal(0) for t in tasks), Decimal(0)) == final_cost
    # the counters in the state are the thread's totals
    n = len(tasks)
    assert states[-1]["agentguard"]["model_calls"] == n
    assert states[-1]["agentguard"]["tool_calls"] == n - 1
    assert states[-1]["agentguard"]["steps"] == n
    assert states[-1]["agentguard"]["decisions"] == ["model:finish"]
    # decisions: only the last run finished, on the money ceiling
    assert [t.status for t in tasks] == ["ok"] * (n - 1) + ["finished"]
    assert [f"{d.kind}:{d.action}" for d in tasks[-1].decisions] == ["model:finish"]
    assert all(not t.decisions for t in tasks[:-1])
    final = out["messages"][-1]
    assert final.tool_calls == []
    assert final.response_metadata["agentguard_final"] is True
    assert len(model.seen) == n
    # the trace: one task record per run, all tagged with the thread, n model and n-1 tool spans
    records = [r for r in sink.tasks if r.tags.get("thread_id") == "ticket-1182"]
    assert [r.task_id for r in records] == [t.id for t in tasks]
    assert sum(r.cost_usd or Decimal(0) for r in records) == final_cost
    ids = {t.id for t in tasks}
    spans = [s for s in sink.spans if s.task_id in ids]
    assert sum(s.kind == "model" for s in spans) == n
    assert sum(s.kind == "tool" for s in spans) == n - 1


def run_thread(gg: GraphGuard, graph: Any, config: Any, max_runs: int) -> list[ag.Task]:
    tasks: list[ag.Task] = []
    payload: Any = user()
    for _ in range(max_runs):
        graph.invoke(payload, config)
        tasks.append(graph.last_task)
        if not graph.get_state(config).next:
            break
        payload = None
    return tasks


def test_step_cap_counts_the_threads_steps_across_resumes() -> None:
    sink = ag.MemorySink()
    guard = ag.Guard(ag.Policy(max_steps=5, on_limit="finish"), traces=sink)
    gg = GraphGuard(guard, budget="thread")
    bound = react_graph(
        gg, Scripted(model_name="gpt-4o"), checkpointer=InMemorySaver(), interrupt_before=["tools"]
    )
    graph = gg.bind(bound)
    config: Any = {"configurable": {"thread_id": "t-steps"}}
    tasks = run_thread(gg, graph, config, max_runs=20)
    # five runs of one step each: the fifth is the last step the cap allows, the final answer
    assert len(tasks) == 5
    assert [t.spent.steps for t in tasks] == [1, 2, 3, 4, 5]
    assert [t.status for t in tasks] == ["ok"] * 4 + ["finished"]
    values = graph.get_state(config).values
    assert values["agentguard"]["steps"] == 5
    assert values["agentguard"]["tool_calls"] == 4
    final = values["messages"][-1]
    assert final.tool_calls == []
    assert final.response_metadata["agentguard"]["limit"] == "max_steps"
    assert final.response_metadata["agentguard"]["reason"] == "5 of 5 steps used"
    # five steps allowed, then the cap's finish decision, recorded like the others
    assert [s.decision for s in sink.spans if s.kind == "step"] == ["allow"] * 5 + ["finish"]
    assert values["agentguard"]["decisions"] == ["step:finish"]
    assert [f"{d.kind}:{d.action}" for d in tasks[-1].decisions] == ["step:finish"]
    assert not any(d.kind == "overspend" for t in tasks for d in t.decisions)


def test_run_budget_gives_each_resumed_run_its_own_limits() -> None:
    guard = ag.Guard(ag.Policy(max_steps=2, on_limit="finish"), traces=False)
    gg = GraphGuard(guard)  # budget="run"
    bound = react_graph(
        gg, Scripted(model_name="gpt-4o"), checkpointer=InMemorySaver(), interrupt_before=["tools"]
    )
    graph = gg.bind(bound)
    config: Any = {"configurable": {"thread_id": "t-run"}}
    tasks = run_thread(gg, graph, config, max_runs=6)
    # each run takes one step of its own two: the thread never reaches a cap
    assert len(tasks) == 6
    assert all(t.spent.steps == 1 and t.status == "ok" for t in tasks)
    assert graph.get_state(config).values["agentguard"]["steps"] == 6


def test_a_spent_thread_is_stopped_at_once_when_asked_again() -> None:
    guard = ag.Guard(policy(), traces=False)
    gg = GraphGuard(guard, budget="thread")
    model = Scripted(model_name="gpt-4o", reply_tokens=300)
    graph = gg.bind(react_graph(gg, model, checkpointer=InMemorySaver()))
    config: Any = {"configurable": {"thread_id": "t-again"}}
    first = graph.invoke(user(), config)
    calls = len(model.seen)
    assert first["messages"][-1].response_metadata["agentguard_final"] is True
    out = graph.invoke(user("And the refund?"), config)
    # what is left of the thread's budget pays for no tool-calling step: the new run answers
    # at once — a tiny final answer if one still fits, else a message saying why it stopped
    last = out["messages"][-1]
    assert last.tool_calls == []
    assert graph.last_task is not None
    if len(model.seen) == calls:
        assert last.response_metadata["agentguard"]["ended_by"] == "stop"
        assert last.response_metadata["agentguard"]["limit"] == "max_cost_usd"
        assert out["agentguard"]["decisions"] == ["model:finish", "model:stop"]
    else:
        assert len(model.seen) == calls + 1
        assert model.seen[-1]["tool_choice"] == "none"
        assert out["agentguard"]["decisions"] == ["model:finish", "model:finish"]
    assert first["agentguard"]["cost_usd"] <= out["agentguard"]["cost_usd"] <= CEILING
    assert graph.last_task.spent.cost_usd == out["agentguard"]["cost_usd"]
