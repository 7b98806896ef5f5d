"""RedisStore and closed tasks: a line nothing names again expires, on a real server.

A task opened without an id (the adapters open one per run) has an id nobody can name again:
when it and its children have closed, its line is set to expire after ``closed_task_ttl`` — an
always-on service does not leave a key per run in Redis — and the task keeps the balance Redis
handed back. Named tasks' lines, held lines and lines during an outage stay as they are.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis_servers

import agentguard as ag
from agentguard._redis_store import RedisStore
from agentguard._store import BudgetLine


@pytest.fixture(scope="module")
def url() -> str:
    return redis_servers.require("single").url


@pytest.fixture
def own_server() -> Iterator[redis_servers.Server]:
    """A server this test may kill: append-only file on, so restarts keep the data."""
    redis_servers.require("single")
    server = redis_servers.Server(extra=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    yield server
    server.stop()


def store_at(url: str, **kwargs: object) -> RedisStore:
    return RedisStore.from_url(url, namespace=f"t-{uuid.uuid4().hex[:12]}", **kwargs)  # type: ignore[arg-type]


def pttl(store: RedisStore, key: str) -> int:
    """Milliseconds left of a budget key: -1 kept for ever, -2 absent."""
    return int(store.client.pttl(store._bkey(key)))


def spend(task: ag.Task) -> None:
    task.step()
    task.start_model_call("gpt-4o-mini", input_tokens=100).end(ag.Usage(100, 20))


def test_a_closed_task_without_an_id_leaves_its_line_to_expire(url: str) -> None:
    store = store_at(url, closed_task_ttl=60)
    g = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    with g.task() as fresh:
        spend(fresh)
        assert pttl(store, f"task:{fresh.id}") == -1
    assert 0 < pttl(store, f"task:{fresh.id}") <= 60_000
    assert f"task:{fresh.id}" not in store._seen  # nothing of it is kept in the process
    with g.task("ticket-1") as named:
        spend(named)
    assert pttl(store, "task:ticket-1") == -1  # a named task's line stays: its id continues it
    store.client.delete(store._bkey(f"task:{fresh.id}"))  # as when it has expired
    assert fresh.spent.model_calls == 1  # the balance Redis handed back at the close
    assert fresh.spent.cost_usd == fresh.cost_usd > 0


def test_the_line_expires_and_an_event_before_that_still_counts(url: str) -> None:
    store = store_at(url, closed_task_ttl=1.0)
    g = ag.Guard(ag.Policy(max_model_calls=2), store=store, traces=False)
    t = g.open_task()
    t.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    t.close()
    # an event after the close, within the ttl, finds the line (and keeps its ttl)
    t.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    with pytest.raises(ag.BudgetExceeded):
        t.start_model_call("gpt-4o-mini", input_tokens=10)
    assert 0 < pttl(store, f"task:{t.id}") <= 1000
    time.sleep(1.2)
    assert pttl(store, f"task:{t.id}") == -2


def test_a_parent_line_waits_for_its_children_and_hands_back_their_spend(url: str) -> None:
    store = store_at(url, closed_task_ttl=60)
    g = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    parent = g.open_task()
    child = g.open_task(parent=parent)
    spend(parent)
    parent.close()
    assert pttl(store, f"task:{parent.id}") == -1  # its child still charges it
    spend(child)
    child.close()
    assert 0 < pttl(store, f"task:{parent.id}") <= 60_000
    assert 0 < pttl(store, f"task:{child.id}") <= 60_000
    store.client.delete(store._bkey(f"task:{parent.id}"))
    assert parent.spent.model_calls == 2  # its own call and its child's, as Redis had them
    assert parent.spent.cost_usd == parent.cost_usd + child.cost_usd  # type: ignore[operator]


def test_a_held_line_is_kept_and_a_missing_one_is_not_created(url: str) -> None:
    store = store_at(url, closed_task_ttl=60)
    line = BudgetLine("task:t", {"model_calls": 5})
    assert store.reserve("r1", [line], {"model_calls": 1}).ok
    assert store.retire("task:t") is None
    assert pttl(store, "task:t") == -1
    store.commit("r1", [line], {"model_calls": 1})
    kept = store.retire("task:t")
    assert kept is not None and kept.committed == {"model_calls": 1}
    assert store.retire("never-seen") is None
    assert pttl(store, "never-seen") == -2


def test_a_bad_closed_task_ttl_is_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"closed_task_ttl=0"):
        RedisStore(client=None, closed_task_ttl=0)
    with pytest.raises(ValueError, match=r"closed_task_ttl=-1"):
        RedisStore(client=None, closed_task_ttl=-1)


def test_closed_task_ttl_none_keeps_the_lines(url: str) -> None:
    store = store_at(url, closed_task_ttl=None)
    g = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    with g.task() as t:
        spend(t)
    assert pttl(store, f"task:{t.id}") == -1
    assert t.spent.model_calls == 1


def test_async_tasks_retire_through_the_async_client(url: str) -> None:
    store = store_at(url, closed_task_ttl=60)
    g = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)

    async def run() -> ag.Task:
        async with g.task() as t:
            call = await t.astart_model_call("gpt-4o-mini", input_tokens=10)
            await call.aend(ag.Usage(10, 5))
        return t

    t = asyncio.run(run())
    assert 0 < pttl(store, f"task:{t.id}") <= 60_000
    assert t.spent.model_calls == 1


@pytest.mark.parametrize("on_store_error", ["fail_closed", "fail_open"])
def test_a_close_during_an_outage_keeps_the_line_and_does_not_fail(
    own_server: redis_servers.Server, on_store_error: str
) -> None:
    store = store_at(
        own_server.url,
        closed_task_ttl=60,
        on_store_error=on_store_error,
        retries=0,
        timeout=0.5,
    )
    g = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    t = g.open_task()
    spend(t)
    own_server.kill()
    t.close()  # housekeeping never fails the close
    assert t.status == "ok"
    own_server.start()
    assert pttl(store, f"task:{t.id}") == -1  # kept: nothing was retired
    assert store.snapshot([f"task:{t.id}"])[f"task:{t.id}"].committed["model_calls"] == 1
    assert t.cost_usd is not None and t.spent.cost_usd == t.cost_usd > 0


def test_a_child_on_another_guards_store_retires_each_line_on_its_own_store(url: str) -> None:
    """A parent task of a Redis guard and its child on an embedded-store guard: the child's
    close retires its own line in place and the parent's through Redis."""
    store = store_at(url, closed_task_ttl=60)
    shared = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    local = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)
    parent = shared.open_task()
    spend(parent)
    child = local.open_task(parent=parent)
    spend(child)
    parent.close()
    assert pttl(store, f"task:{parent.id}") == -1  # waits for its child
    child.close()
    assert 0 < pttl(store, f"task:{parent.id}") <= 60_000
    assert f"task:{child.id}" not in local.store.live  # type: ignore[attr-defined]
    assert child.spent.model_calls == 1
