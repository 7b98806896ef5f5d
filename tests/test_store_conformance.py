"""The BudgetStore contract. Every store runs this suite (the Redis store joins via STORES).

The invariant: for every key and every limited counter, committed + reserved <= limit after
any interleaving of reserve / commit / release / charge — unless actual spend above a
reservation was committed, which is recorded truthfully (never clipped).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from agentguard._store import BudgetLine, BudgetStore, MemoryStore


def _redis_store(kind: str) -> BudgetStore:
    """A RedisStore on this session's private server (single node or 3-master cluster), in a
    fresh namespace so tests never see each other's keys."""
    import uuid

    import redis_servers

    from agentguard._redis_store import RedisStore

    server = redis_servers.require(kind)
    ns = f"t-{uuid.uuid4().hex[:12]}"
    if isinstance(server, redis_servers.Cluster):
        return RedisStore.from_cluster(server.url, namespace=ns)
    return RedisStore.from_url(server.url, namespace=ns)


STORES: dict[str, Callable[[], BudgetStore]] = {
    "memory": MemoryStore,
    "redis": lambda: _redis_store("single"),
    "redis-cluster": lambda: _redis_store("cluster"),
}

D = Decimal


def _close(store: BudgetStore) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> Iterator[BudgetStore]:
    s = STORES[request.param]()
    yield s
    _close(s)


def test_reserve_within_limit_then_refuse(store: BudgetStore) -> None:
    line = BudgetLine("task:a", {"cost_usd": D("1.00")})
    assert store.reserve("r1", [line], {"cost_usd": D("0.70")}).ok
    res = store.reserve("r2", [line], {"cost_usd": D("0.31")})
    assert not res.ok
    assert res.denied is not None
    assert (res.denied.key, res.denied.counter) == ("task:a", "cost_usd")
    assert res.denied.used == D("0.70")
    assert res.denied.requested == D("0.31")
    assert store.reserve("r3", [line], {"cost_usd": D("0.30")}).ok  # exactly to the limit


def test_all_or_nothing_across_lines(store: BudgetStore) -> None:
    task = BudgetLine("task:a", {"cost_usd": D("10")})
    team = BudgetLine("team:cx", {"cost_usd": D("1")})
    assert not store.reserve("r1", [task, team], {"cost_usd": D("2")}).ok
    snap = store.snapshot(["task:a", "team:cx"])
    assert snap["task:a"].used("cost_usd") == 0
    assert snap["team:cx"].used("cost_usd") == 0


def test_commit_moves_reserved_to_committed_exactly(store: BudgetStore) -> None:
    lines = [BudgetLine("task:a", {"cost_usd": D("1")}), BudgetLine("team:cx")]
    assert store.reserve("r1", lines, {"cost_usd": D("0.5"), "model_calls": 1}).ok
    bal = store.commit("r1", lines, {"cost_usd": D("0.1234567890123"), "model_calls": 1})
    for key in ("task:a", "team:cx"):
        assert bal[key].committed["cost_usd"] == D("0.1234567890123")
        assert bal[key].reserved.get("cost_usd", 0) == 0
        assert bal[key].committed["model_calls"] == 1


def test_actual_above_reservation_is_recorded_not_clipped(store: BudgetStore) -> None:
    line = BudgetLine("task:a", {"cost_usd": D("1")})
    assert store.reserve("r1", [line], {"cost_usd": D("0.9")}).ok
    bal = store.commit("r1", [line], {"cost_usd": D("1.5")})
    assert bal["task:a"].committed["cost_usd"] == D("1.5")
    assert not store.reserve("r2", [line], {"cost_usd": D("0.000001")}).ok


def test_release_is_idempotent_and_noop_after_commit(store: BudgetStore) -> None:
    line = BudgetLine("task:a", {"cost_usd": D("1")})
    assert store.reserve("r1", [line], {"cost_usd": D("0.6")}).ok
    store.release("r1")
    store.release("r1")
    assert store.snapshot(["task:a"])["task:a"].used("cost_usd") == 0
    assert store.reserve("r2", [line], {"cost_usd": D("0.6")}).ok
    store.commit("r2", [line], {"cost_usd": D("0.2")})
    store.release("r2")
    assert store.snapshot(["task:a"])["task:a"].used("cost_usd") == D("0.2")
    store.release("never-existed")


def test_charge_checks_and_commits(store: BudgetStore) -> None:
    line = BudgetLine("task:a", {"steps": 2})
    assert store.charge([line], {"steps": 1}).ok
    assert store.charge([line], {"steps": 1}).ok
    res = store.charge([line], {"steps": 1})
    assert not res.ok
    assert res.balances["task:a"].committed["steps"] == 2
    assert store.charge([line], {"steps": 1}, check=False).ok  # recording past a limit
    assert store.snapshot(["task:a"])["task:a"].committed["steps"] == 3


def test_unlimited_line_only_records(store: BudgetStore) -> None:
    line = BudgetLine("org:acme")
    for i in range(5):
        assert store.reserve(f"r{i}", [line], {"cost_usd": D("1000")}).ok
    assert store.snapshot(["org:acme"])["org:acme"].reserved["cost_usd"] == D("5000")


def test_async_methods_match_sync(store: BudgetStore) -> None:
    line = BudgetLine("task:a", {"cost_usd": D("1")})

    async def run() -> None:
        assert (await store.areserve("r1", [line], {"cost_usd": D("0.8")})).ok
        assert not (await store.areserve("r2", [line], {"cost_usd": D("0.3")})).ok
        await store.acommit("r1", [line], {"cost_usd": D("0.25")})
        await store.arelease("r1")
        assert (await store.acharge([line], {"cost_usd": D("0.5")})).ok
        snap = await store.asnapshot(["task:a"])
        assert snap["task:a"].used("cost_usd") == D("0.75")

    asyncio.run(run())


def test_threaded_stress_never_overspends(store: BudgetStore) -> None:
    """16 threads race reserve/commit/release on a shared team budget; a barrier puts every
    first reservation in flight together. Committed spend never passes the limit."""
    limit = D("5.000000")
    team = BudgetLine("team:cx", {"cost_usd": limit})
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []
    admitted = [0] * 16

    def worker(n: int) -> None:
        try:
            task = BudgetLine(f"task:{n}", {"cost_usd": D("1.0")})
            barrier.wait()
            for i in range(300):
                rid = f"w{n}-{i}"
                want = D("0.013") + D(i % 7) / 1000
                if store.reserve(rid, [task, team], {"cost_usd": want}).ok:
                    admitted[n] += 1
                    if i % 5 == 0:
                        store.release(rid)
                    else:
                        store.commit(rid, [task, team], {"cost_usd": want - D("0.001")})
                snap = store.snapshot(["team:cx"])["team:cx"]
                assert snap.used("cost_usd") <= limit
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = store.snapshot(["team:cx"])["team:cx"]
    assert final.reserved.get("cost_usd", 0) == 0
    assert final.committed["cost_usd"] <= limit
    assert sum(admitted) > 100  # the threads really competed for the budget
    # the team budget is nearly exhausted: exactness, not luck, kept it under the limit
    assert limit - final.committed["cost_usd"] < D("0.02")


amounts = st.decimals(min_value=D("0"), max_value=D("0.4"), places=6)


class StoreMachine(RuleBasedStateMachine):
    """Random interleavings of the contract's operations across two tasks and a team."""

    reservations = Bundle("reservations")

    make_store: Callable[[], BudgetStore] = MemoryStore

    def __init__(self) -> None:
        super().__init__()
        self.store: BudgetStore = type(self).make_store()
        self.n = 0
        self.released: set[str] = set()
        self.late_commit = False  # a commit after release: recorded, may pass a limit
        self.lines = {
            "a": [
                BudgetLine("task:a", {"cost_usd": D("1"), "model_calls": 5}),
                BudgetLine("team:t", {"cost_usd": D("1.5")}),
            ],
            "b": [
                BudgetLine("task:b", {"cost_usd": D("1")}),
                BudgetLine("team:t", {"cost_usd": D("1.5")}),
            ],
        }
        self.committed = {"task:a": D(0), "task:b": D(0), "team:t": D(0)}

    @initialize(target=reservations)
    def start(self) -> tuple[str, str, Decimal]:
        return self._reserve("a", D("0.1")) or ("none", "a", D(0))

    def _reserve(self, who: str, amount: Decimal) -> tuple[str, str, Decimal] | None:
        self.n += 1
        rid = f"r{self.n}"
        if self.store.reserve(rid, self.lines[who], {"cost_usd": amount, "model_calls": 1}).ok:
            return (rid, who, amount)
        return None

    @rule(target=reservations, who=st.sampled_from(["a", "b"]), amount=amounts)
    def reserve(self, who: str, amount: Decimal) -> tuple[str, str, Decimal]:
        return self._reserve(who, amount) or ("none", who, D(0))

    @rule(r=consumes(reservations), frac=st.sampled_from([D(0), D("0.5"), D(1)]))
    def commit(self, r: tuple[str, str, Decimal], frac: Decimal) -> None:
        rid, who, amount = r
        if rid == "none":
            return
        actual = amount * frac
        if rid in self.released:
            self.late_commit = True
        self.store.commit(rid, self.lines[who], {"cost_usd": actual, "model_calls": 1})
        for line in self.lines[who]:
            self.committed[line.key] += actual

    @rule(who=st.sampled_from(["a", "b"]), amount=amounts)
    def charge(self, who: str, amount: Decimal) -> None:
        if self.store.charge(self.lines[who], {"cost_usd": amount}).ok:
            for line in self.lines[who]:
                self.committed[line.key] += amount

    @rule(r=reservations)
    def release(self, r: tuple[str, str, Decimal]) -> None:
        self.store.release(r[0])  # possibly twice, possibly after commit: must be harmless
        self.released.add(r[0])

    @invariant()
    def never_over_limit(self) -> None:
        snap = self.store.snapshot(["task:a", "task:b", "team:t"])
        if not self.late_commit:
            assert snap["task:a"].used("cost_usd") <= D("1")
            assert snap["task:b"].used("cost_usd") <= D("1")
            assert snap["team:t"].used("cost_usd") <= D("1.5")
            assert snap["task:a"].used("model_calls") <= 5
        for key, value in self.committed.items():
            assert snap[key].committed.get("cost_usd", D(0)) == value
            assert snap[key].reserved.get("cost_usd", D(0)) >= 0

    def teardown(self) -> None:
        _close(self.store)


_MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _machine_for(name: str) -> type[StoreMachine]:
    make = STORES[name]
    return type(f"StoreMachine_{name}", (StoreMachine,), {"make_store": staticmethod(make)})


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = _MACHINE_SETTINGS
TestRedisStoreMachine = _machine_for("redis").TestCase
TestRedisStoreMachine.settings = _MACHINE_SETTINGS
TestRedisClusterStoreMachine = _machine_for("redis-cluster").TestCase
TestRedisClusterStoreMachine.settings = _MACHINE_SETTINGS
