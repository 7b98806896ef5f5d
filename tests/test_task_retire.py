"""What the embedded store keeps of a closed task: nothing, when nothing can charge its line again.

An always-on process opens a task per request. A task opened without an id (the adapters' run
tasks) has an id nobody can name again, so once it and its children have closed, its own budget
line leaves the :class:`MemoryStore`; the task keeps the line's last balance for its read-outs.
A named task's line stays: opening the same id again continues its budget.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

import pytest

import agentguard as ag
from agentguard import BudgetLine, MemoryStore
from agentguard.testing import LoopCheckingStore


def task_keys(g: ag.Guard) -> list[str]:
    return sorted(k for k in g.store.live if k.startswith("task:"))  # type: ignore[attr-defined]


def spend(task: ag.Task, calls: int = 2) -> None:
    task.step()
    for _ in range(calls):
        task.start_model_call("gpt-4o-mini", input_tokens=100).end(ag.Usage(100, 20))
    task.start_tool_call("search").end()


def test_a_task_without_an_id_leaves_nothing_in_the_store_and_still_reads_its_spend() -> None:
    team = ag.Budget(scope="team", max_cost_usd="5")
    g = ag.Guard(ag.Policy(max_cost_usd="1", budgets=[team]), traces=False)
    with g.task(team="cx") as task:
        spend(task)
        assert task_keys(g) == [f"task:{task.id}"]
        during = task.spent
    assert task_keys(g) == []
    after = task.spent
    assert after == task.last_spent == during
    assert (after.model_calls, after.tool_calls, after.steps) == (2, 1, 1)
    assert after.cost_usd == task.cost_usd > 0
    # the decisions' read-out: the task's own line (kept) and the team's (live)
    room = task._headroom()
    assert (room.remaining_usd, room.budget) == (Decimal("1") - after.cost_usd, f"task:{task.id}")
    # the team's line is shared by other tasks: it stays, with the task's spend in it
    assert g.store.live["team:cx"].committed["cost_usd"] == after.cost_usd  # type: ignore[attr-defined]


def test_a_named_task_keeps_its_line_and_the_same_id_continues_its_budget() -> None:
    g = ag.Guard(ag.Policy(max_model_calls=3), traces=False)
    with g.task("ticket-7") as first:
        spend(first)
    assert task_keys(g) == ["task:ticket-7"]
    with g.task("ticket-7") as again:
        again.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
        with pytest.raises(ag.BudgetExceeded):
            again.start_model_call("gpt-4o-mini", input_tokens=10)
    assert again.spent.model_calls == 3


def test_the_line_of_a_parent_waits_for_its_children() -> None:
    """A child charges its parent's line too: a parent closed before its child keeps that line
    (its budget still binds the child) until the child closes."""
    g = ag.Guard(ag.Policy(max_model_calls=3), traces=False)
    parent = g.open_task()
    child = g.open_task(parent=parent)  # a child with an id of its own making is kept too
    named = g.open_task("sub-1", parent=parent)
    parent.close()
    assert task_keys(g) == []  # nothing charged any line yet
    child.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    named.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    child.close()
    assert task_keys(g) == sorted([f"task:{parent.id}", "task:sub-1"])
    named.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    with pytest.raises(ag.BudgetExceeded) as stop:  # the closed parent's budget still binds
        named.start_model_call("gpt-4o-mini", input_tokens=10)
    assert stop.value.budget == f"task:{parent.id}"
    named.close()
    assert task_keys(g) == ["task:sub-1"]  # the named child's line stays, the parent's went
    assert parent.spent.model_calls == 3  # its children's calls, read from the kept balance
    assert child.spent.model_calls == 1


def test_nested_scopes_retire_inner_then_outer_and_the_outer_counts_the_inner() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)
    with g.task() as outer:
        for _ in range(3):
            with g.task() as inner:
                spend(inner, calls=1)
            assert task_keys(g) == [f"task:{outer.id}"]
    assert task_keys(g) == []
    assert outer.spent.model_calls == 3
    assert outer.spent.cost_usd == 3 * inner.cost_usd  # type: ignore[operator]


def test_a_line_held_by_a_reservation_is_not_retired() -> None:
    store = MemoryStore()
    line = BudgetLine("task:t", {"model_calls": 5})
    assert store.reserve("r1", [line], {"model_calls": 1}).ok
    assert store.retire("task:t") is None
    assert "task:t" in store.live
    store.commit("r1", [line], {"model_calls": 1})
    kept = store.retire("task:t")
    assert kept is not None and kept.committed == {"model_calls": 1}
    assert "task:t" not in store.live
    assert store.retire("task:t") is None  # gone: nothing to hand back
    assert store.retire("never-seen") is None


def test_many_tasks_on_many_threads_leave_the_store_as_it_was() -> None:
    team = ag.Budget(scope="team", max_cost_usd="100")
    g = ag.Guard(ag.Policy(max_cost_usd="1", budgets=[team]), traces=False)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                with g.task(team="cx") as t, g.task() as sub:
                    spend(sub, calls=1)
                    spend(t, calls=1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert list(g.store.live) == ["team:cx"]  # type: ignore[attr-defined]
    assert g.store.live["team:cx"].committed["model_calls"] == 8 * 50 * 2  # type: ignore[attr-defined]
    assert not g.store.live["team:cx"].reserved  # type: ignore[attr-defined]


def test_async_tasks_retire_their_lines_too() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)

    async def run() -> ag.Task:
        async with g.task() as t:
            call = await t.astart_model_call("gpt-4o-mini", input_tokens=10)
            await call.aend(ag.Usage(10, 5))
        opened = await g.aopen_task()
        await opened.astep()
        await opened.aclose()
        assert opened.spent.steps == 1
        return t

    t = asyncio.run(run())
    assert task_keys(g) == []
    assert t.spent.model_calls == 1


def test_a_store_other_than_the_embedded_one_is_left_as_it_is() -> None:
    """Only the embedded store retires lines (a shared store's lines may be read by other
    workers): a subclass of it keeps them, as any store does."""
    store = LoopCheckingStore()
    g = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    with g.task() as t:
        spend(t)
    assert f"task:{t.id}" in store.live


def test_an_event_after_the_close_finds_the_line_as_it_was() -> None:
    """Events are not refused on a closed task: its retired line comes back with its balance
    first, so the task's own limits still count what it spent before the close."""
    g = ag.Guard(ag.Policy(max_model_calls=3, max_steps=5), traces=False)
    t = g.open_task()
    t.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    t.step()
    t.close()
    assert task_keys(g) == []
    assert not t._lanes  # retired: the general path, which puts the line back first
    t.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))  # after the close
    assert task_keys(g) == [f"task:{t.id}"]
    assert t._lanes and t._kept is None  # back as it was: the fast lanes again
    assert g.store.live[f"task:{t.id}"].committed["model_calls"] == 2  # type: ignore[attr-defined]
    t.step()
    assert t.spent.steps == 2  # the step before the close is still counted
    t.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    with pytest.raises(ag.BudgetExceeded) as stop:
        t.start_model_call("gpt-4o-mini", input_tokens=10)
    assert stop.value.limit == "max_model_calls"
    assert t.spent.model_calls == t.model_calls == 3


def test_a_paid_tool_ending_after_the_close_is_charged_to_the_line_as_it_was() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)
    t = g.open_task()
    t.start_model_call("gpt-4o-mini", input_tokens=1000).end(ag.Usage(1000, 100))
    tool = t.start_tool_call("search")
    t.close()
    before = t.spent.cost_usd
    tool.end(cost_usd=Decimal("0.25"))
    assert g.store.live[f"task:{t.id}"].committed["cost_usd"] == before + Decimal("0.25")  # type: ignore[attr-defined]
    assert t.spent.cost_usd == t.cost_usd == before + Decimal("0.25")


def test_a_child_opened_under_a_closed_parent_is_held_to_what_the_parent_spent() -> None:
    g = ag.Guard(ag.Policy(max_model_calls=2), traces=False)
    parent = g.open_task()
    parent.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    parent.close()
    assert task_keys(g) == []
    late = g.open_task(parent=parent)
    late.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    with pytest.raises(ag.BudgetExceeded) as stop:
        late.start_model_call("gpt-4o-mini", input_tokens=10)
    assert stop.value.budget == f"task:{parent.id}"
    late.close()
    assert task_keys(g) == []  # both retired again once the child closed
    assert parent.spent.model_calls == 2


def test_restore_adds_what_was_charged_to_the_key_since() -> None:
    store = MemoryStore()
    line = BudgetLine("task:t")
    store.charge([line], {"steps": 2})
    kept = store.retire("task:t")
    assert kept is not None
    store.charge([line], {"steps": 1, "retries": 1})
    store.restore("task:t", kept)
    assert store.live["task:t"] is kept
    assert dict(kept.committed) == {"steps": 3, "retries": 1}
