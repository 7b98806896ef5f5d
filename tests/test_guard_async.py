"""The async twins of the event API (``astart_model_call``, ``call.aend`` / ``afail``,
``astart_tool_call``, ``tool.aend``, ``arecord_retry``, ``astep``, ``aclose``, ``async with
guard.task``) on MemoryStore and on RedisStore driven by redis.asyncio.

They share the decision code with the sync API (one body per event, driven either way), so the
same scenario gives the same decisions, spend and spans both ways; on Redis the async path never
touches the sync client.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis_servers

import agentguard as ag
from agentguard._store import BudgetStore, MemoryStore

redis = pytest.importorskip("redis", reason='RedisStore needs pip install "agentguard[redis]"')
from agentguard._redis_store import RedisStore  # noqa: E402

D = Decimal

POLICY = ag.Policy(
    max_cost_usd="0.006",
    max_tool_calls=2,
    max_retries=1,
    max_steps=3,
    on_limit="finish",
    budgets=[ag.Budget(scope="team", max_cost_usd=D("0.02"))],
)

# one scenario, as data: run through the sync API and through the async twins
SCENARIO: list[tuple[Any, ...]] = [
    ("step", "plan"),
    ("model", 2000, 400, {"prompt_tokens": 2000, "completion_tokens": 350}),
    ("model_open", 500, 100),  # left open (a parallel call): the task's close releases it
    ("tool", "search", D("0.0001")),
    ("retry", "rate limited"),
    ("model_fail", 1500, 300),
    ("step", "act"),
    ("model", 3000, 800, {"prompt_tokens": 3000, "completion_tokens": 800}),
    ("tool", "search", None),
    ("tool", "search", None),  # past max_tool_calls: blocked under finish
    ("model", 4000, 800, {"prompt_tokens": 4000, "completion_tokens": 700}),  # finish
    ("final", 4000, 200, {"prompt_tokens": 4000, "completion_tokens": 150}),
    ("step", "again"),
]


def _stores() -> Iterator[tuple[str, Callable[[], BudgetStore]]]:
    yield "memory", MemoryStore

    def single() -> BudgetStore:
        server = redis_servers.require("single")
        return RedisStore.from_url(server.url, namespace=f"a-{uuid.uuid4().hex[:10]}")

    def cluster() -> BudgetStore:
        server = redis_servers.require("cluster")
        return RedisStore.from_cluster(server.url, namespace=f"a-{uuid.uuid4().hex[:10]}")

    yield "redis", single
    yield "redis-cluster", cluster


STORES = dict(_stores())


def _outcome(task: ag.Task, log: list[Any], snap: Any, sink: ag.MemorySink) -> Any:
    spans = sorted(
        ((s.kind, s.name, s.status, s.decision, s.cost_usd, s.model) for s in sink.spans), key=repr
    )
    return (
        log,
        task.cost_usd,
        task.model_calls,
        task.tool_calls,
        task.retries,
        task.steps,
        task.status,
        [(dict(b.committed), dict(b.reserved)) for b in snap.values()],
        spans,
    )


def _run_sync(store: BudgetStore) -> Any:
    sink = ag.MemorySink()
    guard = ag.Guard(POLICY, store=store, traces=sink)
    log: list[Any] = []
    with guard.task("t1", team="cx") as task:
        for ev in SCENARIO:
            if ev[0] == "step":
                log.append(task.step(ev[1]).action)
            elif ev[0] == "retry":
                log.append(task.record_retry(ev[1]).action)
            elif ev[0] == "tool":
                tool = task.start_tool_call(ev[1])
                log.append(tool.decision.action)
                if tool.allowed:
                    tool.end(cost_usd=ev[2])
            else:
                call = task.start_model_call(
                    "gpt-4o-mini", input_tokens=ev[1], max_tokens=ev[2], finish=ev[0] == "final"
                )
                log.append((call.decision.action, call.model, call.max_tokens))
                if call.done:
                    continue
                if ev[0] in ("model", "final"):
                    log.append(call.end(ev[3]))
                elif ev[0] == "model_fail":
                    call.fail(TimeoutError("provider timed out"))
    snap = store.snapshot([f"task:{task.id}", "team:cx"])
    if isinstance(store, RedisStore):
        store.close()
    return _outcome(task, log, snap, sink)


async def _run_async(store: BudgetStore) -> Any:
    sink = ag.MemorySink()
    guard = ag.Guard(POLICY, store=store, traces=sink)
    log: list[Any] = []
    async with guard.task("t1", team="cx") as task:
        for ev in SCENARIO:
            if ev[0] == "step":
                log.append((await task.astep(ev[1])).action)
            elif ev[0] == "retry":
                log.append((await task.arecord_retry(ev[1])).action)
            elif ev[0] == "tool":
                tool = await task.astart_tool_call(ev[1])
                log.append(tool.decision.action)
                if tool.allowed:
                    await tool.aend(cost_usd=ev[2])
            else:
                call = await task.astart_model_call(
                    "gpt-4o-mini", input_tokens=ev[1], max_tokens=ev[2], finish=ev[0] == "final"
                )
                log.append((call.decision.action, call.model, call.max_tokens))
                if call.done:
                    continue
                if ev[0] in ("model", "final"):
                    log.append(await call.aend(ev[3]))
                elif ev[0] == "model_fail":
                    await call.afail(TimeoutError("provider timed out"))
    snap = await store.asnapshot([f"task:{task.id}", "team:cx"])
    if isinstance(store, RedisStore):
        await store.aclose()  # the loop outlives the store: close its async client now
    return _outcome(task, log, snap, sink)


@pytest.mark.parametrize("kind", list(STORES))
async def test_async_twins_decide_and_spend_exactly_like_the_sync_api(kind: str) -> None:
    sync = await asyncio.to_thread(_run_sync, STORES[kind]())
    out = await _run_async(STORES[kind]())
    assert out == sync
    log, cost, model_calls, tool_calls, retries, _steps, status, balances, spans = out
    # the scenario really went through every kind of decision
    assert "block" in log and retries == 1 and tool_calls == 2
    assert any(isinstance(e, tuple) and e[0] == "finish" for e in log)
    assert model_calls == 3 and status == "finished"
    assert balances[1][1] == {}  # the open call was released by the async close
    assert cost is not None and cost > 0
    assert any(s[0] == "model" and s[2] == "error" for s in spans)  # the failed call's span


async def test_async_events_never_touch_the_sync_client() -> None:
    """The sync client points at a closed port; only the async client reaches the server.
    Every async twin works, so none of them does sync store I/O (which would block the loop)."""
    server = redis_servers.require("single")
    dead = redis.Redis(host="127.0.0.1", port=redis_servers.free_port(), socket_timeout=0.2)
    url = server.url
    store = RedisStore(
        dead,
        async_client=lambda: redis.asyncio.Redis.from_url(url),
        namespace=f"a-{uuid.uuid4().hex[:10]}",
        retries=0,
        renew_leases=False,
    )
    with pytest.raises(ag.StoreError):  # the sync path really is cut off
        store.snapshot(["team:cx"])
    out = await _run_async(store)  # closes the store
    dead.close()
    reference = await asyncio.to_thread(_run_sync, MemoryStore())
    assert out[0] == reference[0]  # the same decisions as on the embedded store
    assert out[1] == reference[1]


async def test_concurrent_async_tasks_share_a_team_budget_exactly() -> None:
    """64 asyncio tasks on one loop, calls in flight together, against one team budget on
    Redis: committed spend ends within the limit to the last decimal and equals what the tasks
    report."""
    server = redis_servers.require("single")
    ns = f"a-{uuid.uuid4().hex[:10]}"
    store = RedisStore.from_url(server.url, namespace=ns)
    limit = D("0.012")
    guard = ag.Guard(
        ag.Policy(budgets=[ag.Budget(scope="team", max_cost_usd=limit)]),
        store=store,
        traces=False,
    )
    costs: list[Decimal] = []

    async def worker(n: int) -> None:
        for i in range(4):
            try:
                async with guard.task(f"w{n}-{i}", team="cx") as task:
                    call = await task.astart_model_call(
                        "gpt-4o-mini", input_tokens=2000, max_tokens=400
                    )
                    await asyncio.sleep(0.002)  # in flight while the others reserve
                    out = min(150 + (n * 7 + i) % 250, call.max_tokens or 400)
                    await call.aend({"prompt_tokens": 2000, "completion_tokens": out})
                costs.append(task.cost_usd or D(0))
            except ag.BudgetExceeded:
                pass

    await asyncio.gather(*[worker(n) for n in range(64)])
    team = (await store.asnapshot(["team:cx"]))["team:cx"]
    await store.aclose()
    assert len(costs) > 10  # the tasks really competed
    assert team.committed["cost_usd"] == sum(costs, D(0))
    assert team.committed["cost_usd"] <= limit
    assert "cost_usd" not in team.reserved


async def test_async_stop_fail_and_close_release_what_they_hold() -> None:
    store = MemoryStore()
    guard = ag.Guard(ag.Policy(max_cost_usd="0.0004"), store=store, traces=False)
    task = await guard.aopen_task("t1")
    first = await task.astart_model_call("gpt-4o-mini", input_tokens=1000, max_tokens=200)
    held = store.snapshot(["task:t1"])["task:t1"].reserved["cost_usd"]
    assert held > 0
    await first.afail(RuntimeError("boom"))
    assert store.snapshot(["task:t1"])["task:t1"].reserved == {}
    second = await task.astart_model_call("gpt-4o-mini", input_tokens=1000, max_tokens=200)
    with pytest.raises(ag.BudgetExceeded):  # under on_limit="raise" the async twin raises too
        await task.astart_model_call("gpt-4o-mini", input_tokens=100_000, max_tokens=200)
    assert second.done is False
    await task.aclose()
    assert task.status == "ok"
    assert store.snapshot(["task:t1"])["task:t1"].reserved == {}  # the open call: released
    spent = await task.aspent()
    assert spent.model_calls == 0


class RacingStore(MemoryStore):
    """Another worker charges the team line just before each of this store's next
    reservations (one amount per reservation): the guard's reservation is then refused."""

    def __init__(self, steals: list[Decimal]) -> None:
        super().__init__()
        self.steals = list(steals)
        self.reservations = 0

    def _race(self, lines: Any) -> None:
        self.reservations += 1
        if self.steals:
            team = [ln for ln in lines if ln.key.startswith("team:")]
            self.charge(team, {"cost_usd": self.steals.pop(0)}, check=False)

    def reserve(self, reservation_id: str, lines: Any, amounts: Any) -> Any:
        self._race(lines)
        return super().reserve(reservation_id, lines, amounts)

    async def areserve(self, reservation_id: str, lines: Any, amounts: Any) -> Any:
        self._race(lines)
        return super().reserve(reservation_id, lines, amounts)


RACE_POLICY = ag.Policy(budgets=[ag.Budget(scope="team", max_cost_usd=D("0.01"))])


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_refused_reservation_is_decided_again_with_what_is_left(twin: str) -> None:
    store = RacingStore([D("0.001")])  # taken between the decision and the reservation
    guard = ag.Guard(RACE_POLICY, store=store, traces=False)

    async def go() -> ag.ModelCall:
        async with guard.task("t", team="cx") as task:
            call = await task.astart_model_call("gpt-4o", input_tokens=1000)
            await call.aend(ag.Usage(1000, 10))
            return call

    if twin == "async":
        call = asyncio.run(go())
    else:
        with guard.task("t", team="cx") as task:
            call = task.start_model_call("gpt-4o", input_tokens=1000)
            call.end(ag.Usage(1000, 10))
    # $0.01 left paid for 750 output tokens; after the $0.001 taken, for 650: decided again
    assert store.reservations == 2
    assert call.max_tokens == 650
    assert call.decision.reserve_usd == D("0.009")
    team = store.snapshot(["team:cx"])["team:cx"]
    assert team.used("cost_usd") <= D("0.01")


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_four_refused_reservations_stop_naming_the_line_that_refused(twin: str) -> None:
    store = RacingStore([D("0.001")] * 4)
    guard = ag.Guard(RACE_POLICY, store=store, traces=False)

    async def go() -> None:
        async with guard.task("t", team="cx") as task:
            await task.astart_model_call("gpt-4o", input_tokens=1000)

    with pytest.raises(ag.BudgetExceeded) as info:
        if twin == "async":
            asyncio.run(go())
        else:
            with guard.task("t", team="cx") as task:
                task.start_model_call("gpt-4o", input_tokens=1000)
    assert store.reservations == 4
    assert info.value.budget == "team:cx"
    assert "refused on team:cx" in str(info.value)
    assert store.snapshot(["team:cx"])["team:cx"].reserved == {}  # nothing left held
