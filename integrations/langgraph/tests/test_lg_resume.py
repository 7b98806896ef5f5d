"""A thread interrupted before every tool call and resumed, each run by a *fresh* Guard (a new
store: all it knows of the thread is the checkpoint, as after a process restart), refuses
exactly where one uninterrupted run refuses: every kind of spend the thread had — money,
total / input / output tokens, model calls, tool calls in total and per tool, steps —
carries over through ``BudgetState``. InMemorySaver and SqliteSaver, sync and async."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from lg_support import Scripted, react_graph, user

import agentguard as ag
from agentguard_langgraph import GraphGuard

LIMITS: dict[str, dict[str, Any]] = {
    "max_cost_usd": {"max_cost_usd": "0.008"},
    "max_total_tokens": {"max_total_tokens": 1500},
    "max_input_tokens": {"max_input_tokens": 1200},
    "max_total_output_tokens": {"max_total_output_tokens": 120},
    "max_model_calls": {"max_model_calls": 5},
    "max_tool_calls": {"max_tool_calls": 3},
    "tool_limits": {"tool_limits": {"search": 2}},
    "max_steps": {"max_steps": 4},
}


def fresh(limit: str, **compile_kw: Any) -> tuple[GraphGuard, Any, Scripted]:
    """A new guard, graph guard, model and graph: nothing shared with earlier runs."""
    policy = ag.Policy(on_limit="finish", max_output_tokens=40, **LIMITS[limit])
    guard = ag.Guard(policy, traces=False)
    gg = GraphGuard(guard, budget="thread")
    model = Scripted(model_name="gpt-4o", reply_tokens=30)
    return gg, gg.bind(react_graph(gg, model, **compile_kw)), model


def anon(text: Any) -> Any:
    """``text`` with task ids (each run has its own) left out."""
    return re.sub(r"task:[0-9a-f]{12}", "task:<run>", text) if isinstance(text, str) else text


def outcome(task: ag.Task, values: dict[str, Any]) -> dict[str, Any]:
    last = values["messages"][-1]
    ended = dict(last.response_metadata.get("agentguard") or {})
    ended.pop("task_id", None)
    return {
        "spend": {k: v for k, v in values.items() if k == "agentguard"},
        "ended": {k: anon(v) for k, v in ended.items()},
        "final": last.response_metadata.get("agentguard_final"),
        "answer": anon(last.text),
        "limit": next((d.limit for d in reversed(task.decisions) if d.limit), None),
    }


@contextlib.asynccontextmanager
async def saver(kind: str, mode: str, path: Path) -> AsyncIterator[Any]:
    if kind == "memory":
        yield InMemorySaver()
    elif mode == "sync":
        with SqliteSaver.from_conn_string(str(path)) as cp:
            yield cp
    else:
        async with AsyncSqliteSaver.from_conn_string(str(path)) as acp:
            yield acp


async def drive(graph: Any, payload: Any, config: Any, mode: str) -> dict[str, Any]:
    if mode == "sync":
        graph.invoke(payload, config)
        snap = graph.get_state(config)
    else:
        await graph.ainvoke(payload, config)
        snap = await graph.aget_state(config)
    return {"values": dict(snap.values), "next": snap.next}


@pytest.mark.parametrize("limit", list(LIMITS))
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_resumed_thread_refuses_where_one_run_would(
    limit: str, kind: str, mode: str, tmp_path: Path
) -> None:
    config: Any = {"configurable": {"thread_id": f"t-{limit}"}}
    # one uninterrupted run: where the limit refuses
    _, whole, whole_model = fresh(limit, checkpointer=InMemorySaver())
    done = await drive(whole, user(), config, mode)
    assert not done["next"]
    assert whole.last_task is not None
    expected = outcome(whole.last_task, done["values"])
    if limit != "max_total_output_tokens":  # (the core names that one max_total_tokens)
        assert expected["limit"] == (limit if limit != "tool_limits" else "tool_limits.search")
    calls = len(whole_model.seen)
    assert calls >= 3  # the limit is reached after a few steps, not at once

    # the same thread interrupted before each tool call, every run by a fresh guard
    runs: list[ag.Task] = []
    seen = 0
    async with saver(kind, mode, tmp_path / "threads.sqlite") as cp:
        payload: Any = user()
        for _ in range(calls + 2):
            _, graph, model = fresh(limit, checkpointer=cp, interrupt_before=["tools"])
            state = await drive(graph, payload, config, mode)
            assert graph.last_task is not None
            runs.append(graph.last_task)
            seen += len(model.seen)
            if not state["next"]:
                break
            assert state["next"] == ("tools",)
            payload = None
    assert len(runs) > 2
    # the refusal came at the same call, for the same limit, with the same spend
    assert seen == calls
    assert outcome(runs[-1], state["values"]) == expected
    # each run but the last was allowed everything it asked for
    assert all(t.status == "ok" for t in runs[:-1])
    assert runs[-1].status == "finished"


@pytest.mark.parametrize("limit", ["max_input_tokens", "tool_limits", "max_model_calls"])
def test_without_the_carried_spend_the_thread_would_run_past_its_limit(
    limit: str, tmp_path: Path
) -> None:
    """The carried spend is what stops the thread: a run budget (nothing seeded) resumed the
    same way makes more calls than the thread's limit allows."""
    config: Any = {"configurable": {"thread_id": "t-run"}}
    _, whole, whole_model = fresh(limit, checkpointer=InMemorySaver())
    whole.invoke(user(), config)
    calls = len(whole_model.seen)
    seen = 0
    with SqliteSaver.from_conn_string(str(tmp_path / "runs.sqlite")) as cp:
        payload: Any = user()
        for _ in range(calls + 3):
            gg, graph, model = fresh(limit, checkpointer=cp, interrupt_before=["tools"])
            gg.budget = "run"
            graph.invoke(payload, config)
            seen += len(model.seen)
            if not graph.get_state(config).next:
                break
            payload = None
    assert seen > calls
