"""RedisStore beyond the shared contract: faults on a real server (killed and restarted), leases,
windows, exact money, no prompt text in Redis, and the multi-process concurrency proof.

The contract itself runs in ``test_store_conformance.py`` (single node and cluster).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis_servers

import agentguard as ag
from agentguard._store import BudgetLine

redis = pytest.importorskip("redis", reason='RedisStore needs pip install "agentguard[redis]"')
from agentguard._redis_store import RedisStore  # noqa: E402

D = Decimal
LINE = BudgetLine("team:cx", {"cost_usd": D("1")})


def _ns() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def url() -> str:
    server = redis_servers.require("single")
    return server.url


@pytest.fixture
def own_server() -> Iterator[redis_servers.Server]:
    """A server this test may kill: append-only file on, so restarts keep the data."""
    redis_servers.require("single")  # skip / fail in CI before starting anything
    server = redis_servers.Server(extra=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    yield server
    server.stop()


def test_redis_store_resolves_lazily() -> None:
    assert ag.RedisStore is RedisStore


def test_money_is_exact_to_18_decimals_and_large(url: str) -> None:
    store = RedisStore.from_url(url, namespace=_ns())
    big = BudgetLine("org:acme", {"cost_usd": D("5000000")})
    assert store.reserve("r1", [big], {"cost_usd": D("4999999.999999999999999999")}).ok
    assert not store.reserve("r2", [big], {"cost_usd": D("0.000000000000000002")}).ok
    assert store.reserve("r3", [big], {"cost_usd": D("0.000000000000000001")}).ok
    store.commit("r1", [big], {"cost_usd": D("0.1") + D("0.2")})
    snap = store.snapshot(["org:acme"])["org:acme"]
    assert snap.committed["cost_usd"] == D("0.3")
    assert snap.reserved["cost_usd"] == D("0.000000000000000001")


def test_rounding_reserves_up_and_commits_half_even(url: str) -> None:
    store = RedisStore.from_url(url, namespace=_ns())
    line = BudgetLine("task:a")
    assert store.reserve("r1", [line], {"cost_usd": D("1E-19")}).ok
    assert store.snapshot(["task:a"])["task:a"].reserved["cost_usd"] == D("1E-18")
    store.commit("r1", [line], {"cost_usd": D("2.5E-18")})
    assert store.snapshot(["task:a"])["task:a"].committed["cost_usd"] == D("2E-18")


def test_commit_is_idempotent_per_reservation(url: str) -> None:
    """A replayed commit (a retry after a lost reply, a fail_open replay) counts once."""
    store = RedisStore.from_url(url, namespace=_ns())
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.5")}).ok
    store.commit("r1", [LINE], {"cost_usd": D("0.4")})
    store.commit("r1", [LINE], {"cost_usd": D("0.4")})
    assert store.snapshot(["team:cx"])["team:cx"].committed["cost_usd"] == D("0.4")


def test_keys_and_counters_with_quotes_and_non_ascii_round_trip(url: str) -> None:
    """A reservation record names its lines and counters (JSON built by the client): quotes,
    backslashes and non-ASCII text come back to exactly the keys that were reserved."""
    store = RedisStore.from_url(url, namespace=_ns())
    line = BudgetLine('task:café-☕ "q" \\ 𝄞', {'tool:say "hi"': 2})
    assert store.reserve("r1", [line, LINE], {'tool:say "hi"': 2, "cost_usd": D("0.5")}).ok
    assert not store.reserve("r2", [line], {'tool:say "hi"': 1}).ok
    store.release("r1")
    snap = store.snapshot([line.key, "team:cx"])
    assert snap[line.key].reserved == {} and snap["team:cx"].reserved == {}
    assert store.reserve("r3", [line], {'tool:say "hi"': 2}).ok
    bal = store.commit("r3", [line], {'tool:say "hi"': 1})
    assert bal[line.key].committed == {'tool:say "hi"': 1} and bal[line.key].reserved == {}


def test_reused_reservation_id_is_refused(url: str) -> None:
    store = RedisStore.from_url(url, namespace=_ns())
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.1")}).ok
    with pytest.raises(ValueError, match="already held"):
        store.reserve("r1", [LINE], {"cost_usd": D("0.1")})


def test_lease_of_a_dead_worker_is_reclaimed_and_late_commit_is_recorded(url: str) -> None:
    ns = _ns()
    # renew_leases=False: a worker whose renewals stopped (frozen, or dead as far as Redis knows)
    dead = RedisStore.from_url(url, namespace=ns, lease_ttl=0.2, renew_leases=False)
    alive = RedisStore.from_url(url, namespace=ns, lease_ttl=0.2)
    assert dead.reserve("r-dead", [LINE], {"cost_usd": D("0.8")}).ok
    assert not alive.reserve("r1", [LINE], {"cost_usd": D("0.8")}).ok
    time.sleep(0.3)
    assert alive.snapshot(["team:cx"])["team:cx"].reserved.get("cost_usd", 0) == 0
    assert alive.reserve("r2", [LINE], {"cost_usd": D("0.8")}).ok
    # the "dead" worker was only slow: its spend is recorded, never lost, and flagged
    bal = dead.commit("r-dead", [LINE], {"cost_usd": D("0.5")})
    assert bal["team:cx"].committed["cost_usd"] == D("0.5")
    assert bal["team:cx"].reserved["cost_usd"] == D("0.8")
    assert dead.late_commits == 1
    assert dead.stats()["late_commits"] == 1


def test_a_refused_reserve_reclaims_expired_leases_first(url: str) -> None:
    """A reserve only looks for expired leases when it would be refused; then it reclaims them
    and checks again, so a dead worker's hold never causes a refusal."""
    ns = _ns()
    dead = RedisStore.from_url(url, namespace=ns, lease_ttl=0.2, renew_leases=False)
    alive = RedisStore.from_url(url, namespace=ns)
    assert dead.reserve("r-dead", [LINE], {"cost_usd": D("0.8")}).ok
    time.sleep(0.3)
    res = alive.reserve("r1", [LINE], {"cost_usd": D("0.8")})  # no snapshot in between
    assert res.ok
    assert res.balances["team:cx"].reserved["cost_usd"] == D("0.8")
    assert not alive.reserve("r2", [LINE], {"cost_usd": D("0.3")}).ok  # a live hold counts


def test_a_call_longer_than_the_lease_keeps_its_reservation(url: str) -> None:
    """The store renews the leases it holds every lease_ttl / 3: a model call running for
    several lease_ttl is never reclaimed under it, while other workers keep reclaiming."""
    ns = _ns()
    store = RedisStore.from_url(url, namespace=ns, lease_ttl=0.6)
    other = RedisStore.from_url(url, namespace=ns, lease_ttl=0.6)
    policy = ag.Policy(budgets=[ag.Budget(scope="team", max_cost_usd=D("0.001"))])
    guard = ag.Guard(policy, store=store, traces=False)
    with guard.task("long", team="cx") as task:
        call = task.start_model_call("gpt-4o-mini", input_tokens=2000, max_tokens=400)
        held = call.amounts["cost_usd"]
        deadline = time.monotonic() + 2.0  # more than three lease_ttl
        while time.monotonic() < deadline:
            bal = other.snapshot(["team:cx"])["team:cx"]  # reclaims expired leases
            assert bal.reserved["cost_usd"] == held
            time.sleep(0.05)
        call.end({"prompt_tokens": 2000, "completion_tokens": 300})
    assert store.lease_renewals >= 3
    assert store.late_commits == 0 and store.stats().get("late_commits", 0) == 0
    bal = other.snapshot(["team:cx"])["team:cx"]
    assert bal.committed["cost_usd"] == task.cost_usd
    assert "cost_usd" not in bal.reserved
    assert not store._leased  # nothing left to renew
    store.close()


def test_renewal_stops_after_lease_max(url: str) -> None:
    """A reservation nobody ends (an adapter lost the call) is renewed for lease_max at most,
    then runs out; a commit after that is still recorded, and flagged late."""
    ns = _ns()
    store = RedisStore.from_url(url, namespace=ns, lease_ttl=0.3, lease_max=0.5)
    other = RedisStore.from_url(url, namespace=ns)
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.8")}).ok
    time.sleep(1.3)
    assert other.snapshot(["team:cx"])["team:cx"].reserved.get("cost_usd", 0) == 0
    assert store.lease_renewals >= 1 and not store._leased
    bal = store.commit("r1", [LINE], {"cost_usd": D("0.7")})
    assert bal["team:cx"].committed["cost_usd"] == D("0.7")
    assert store.late_commits == 1
    with pytest.raises(ValueError, match="lease_max"):
        RedisStore.from_url(url, lease_max=0)
    store.close()


def test_a_killed_workers_lease_runs_out_once_renewals_stop(url: str) -> None:
    """A real worker process holds a reservation and renews it while alive; SIGKILLed, its
    renewals stop and the lease is reclaimed after lease_ttl."""
    ns = _ns()
    code = (
        "import sys, time\n"
        "from decimal import Decimal\n"
        "from agentguard._redis_store import RedisStore\n"
        "from agentguard._store import BudgetLine\n"
        "s = RedisStore.from_url(sys.argv[1], namespace=sys.argv[2], lease_ttl=0.6)\n"
        "line = BudgetLine('team:cx', {'cost_usd': Decimal('1')})\n"
        "assert s.reserve('r-worker', [line], {'cost_usd': Decimal('0.8')}).ok\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, url, ns], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        other = RedisStore.from_url(url, namespace=ns, lease_ttl=0.6)
        time.sleep(2.0)  # more than three lease_ttl: the living worker keeps its lease
        assert other.snapshot(["team:cx"])["team:cx"].reserved["cost_usd"] == D("0.8")
        assert not other.reserve("r1", [LINE], {"cost_usd": D("0.5")}).ok
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    time.sleep(0.9)  # the last renewal's deadline has passed
    assert other.snapshot(["team:cx"])["team:cx"].reserved.get("cost_usd", 0) == 0
    assert other.reserve("r2", [LINE], {"cost_usd": D("0.9")}).ok


def test_windowed_key_expires_after_its_window(url: str) -> None:
    ns = _ns()
    store = RedisStore.from_url(url, namespace=ns, window_grace=0)
    now = time.time()
    old = BudgetLine("team:cx@hour:old", {"cost_usd": D("1")}, expires_at=now + 0.4)
    new = BudgetLine("team:cx@hour:new", {"cost_usd": D("1")}, expires_at=now + 3600)
    assert store.reserve("r1", [old], {"cost_usd": D("0.9")}).ok
    store.commit("r1", [old], {"cost_usd": D("0.9")})
    ttl = store.client.pttl("{" + ns + "}:b:team:cx@hour:old")
    assert 0 < ttl <= 400
    assert not store.reserve("r2", [old], {"cost_usd": D("0.2")}).ok
    assert store.reserve("r3", [new], {"cost_usd": D("0.9")}).ok  # the next window is fresh
    time.sleep(0.5)
    assert store.snapshot([old.key])[old.key].committed == {}
    assert store.snapshot([new.key])[new.key].reserved["cost_usd"] == D("0.9")


def test_a_commit_after_the_rollover_lands_in_the_window_it_reserved_in(url: str) -> None:
    """No spend lost at the boundary: a call reserved in one window and committed after the
    next began is recorded on its own window's key (kept alive by window_grace), and the new
    window starts fresh, unaffected."""
    ns = _ns()
    store = RedisStore.from_url(url, namespace=ns, window_grace=5)
    now = time.time()
    old = BudgetLine("team:cx@hour:h1", {"cost_usd": D("1")}, expires_at=now + 0.3)
    new = BudgetLine("team:cx@hour:h2", {"cost_usd": D("1")}, expires_at=now + 3600)
    assert store.reserve("r1", [old], {"cost_usd": D("0.6")}).ok
    time.sleep(0.4)  # the hour is over; the call is still running
    assert store.reserve("r2", [new], {"cost_usd": D("0.9")}).ok
    bal = store.commit("r1", [old], {"cost_usd": D("0.55")})
    assert bal[old.key].committed["cost_usd"] == D("0.55")
    snap = store.snapshot([old.key, new.key])
    assert snap[old.key].committed["cost_usd"] == D("0.55")
    assert snap[old.key].reserved == {}
    assert snap[new.key].committed == {} and snap[new.key].reserved["cost_usd"] == D("0.9")
    ttl = store.client.pttl("{" + ns + "}:b:" + old.key)
    assert 0 < ttl <= 5000  # dropped after its grace


def test_fail_closed_stops_while_redis_is_down(own_server: redis_servers.Server) -> None:
    store = RedisStore.from_url(own_server.url, namespace=_ns(), retries=1, timeout=0.5)
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.3")}).ok
    own_server.kill()
    started = time.monotonic()
    with pytest.raises(ag.StoreError, match="fail_closed"):
        store.reserve("r2", [LINE], {"cost_usd": D("0.3")})
    assert time.monotonic() - started < 3  # bounded timeouts and retries
    with pytest.raises(ag.StoreError):
        store.snapshot(["team:cx"])
    own_server.start()
    store.commit("r1", [LINE], {"cost_usd": D("0.25")})
    assert store.snapshot(["team:cx"])["team:cx"].committed["cost_usd"] == D("0.25")


def test_fail_closed_guard_call_is_stopped(own_server: redis_servers.Server) -> None:
    store = RedisStore.from_url(own_server.url, namespace=_ns(), retries=0, timeout=0.5)
    guard = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    with guard.task("t1") as task:
        own_server.kill()
        with pytest.raises(ag.StoreError):
            task.start_model_call("gpt-4o-mini", input_tokens=100, max_tokens=10)
    own_server.start()


def test_fail_open_accounts_locally_and_reconciles_once(own_server: redis_servers.Server) -> None:
    ns = _ns()
    store = RedisStore.from_url(
        own_server.url,
        namespace=ns,
        on_store_error="fail_open",
        retries=0,
        timeout=0.5,
        reconnect_interval=0.1,
    )
    steps = BudgetLine("task:a", {"steps": 10})
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.3")}).ok
    store.commit("r1", [LINE], {"cost_usd": D("0.2")})
    assert store.reserve("r2", [LINE], {"cost_usd": D("0.3")}).ok  # held in Redis
    own_server.kill()
    # Redis is down: the store keeps going on local accounting, against what it last saw
    store.commit("r2", [LINE], {"cost_usd": D("0.1")})  # a reservation Redis holds
    assert store.reserve("r3", [LINE], {"cost_usd": D("0.5")}).ok  # local
    assert not store.reserve("r4", [LINE], {"cost_usd": D("0.3")}).ok  # 0.3 + 0.5 + 0.3 > 1
    store.commit("r3", [LINE], {"cost_usd": D("0.4")})
    assert store.charge([steps], {"steps": 1}).ok
    store.release("r-none")
    snap = store.snapshot(["team:cx"])["team:cx"]
    assert snap.committed["cost_usd"] == D("0.7")
    own_server.start()
    time.sleep(0.15)
    # the next operation replays the journal, each spend exactly once
    snap = store.snapshot(["team:cx", "task:a"])
    assert snap["team:cx"].committed["cost_usd"] == D("0.7")
    assert snap["team:cx"].reserved.get("cost_usd", 0) == 0
    assert snap["task:a"].committed["steps"] == 1
    # a second store (another worker) sees the reconciled truth in Redis
    other = RedisStore.from_url(own_server.url, namespace=ns)
    assert other.snapshot(["team:cx"])["team:cx"].committed["cost_usd"] == D("0.7")
    store.snapshot(["team:cx"])  # nothing left to replay: still no double count
    assert other.snapshot(["team:cx"])["team:cx"].committed["cost_usd"] == D("0.7")


def test_fail_open_guard_keeps_running_through_a_restart(own_server: redis_servers.Server) -> None:
    ns = _ns()
    store = RedisStore.from_url(
        own_server.url, namespace=ns, on_store_error="fail_open", retries=0, timeout=0.5,
        reconnect_interval=0.05,
    )  # fmt: skip
    policy = ag.Policy(budgets=[ag.Budget(scope="team", max_cost_usd=D("10"))])
    guard = ag.Guard(policy, store=store, traces=False)
    total = D(0)
    for i in range(6):
        if i == 2:
            own_server.kill()
        if i == 4:
            own_server.start()
            time.sleep(0.1)
        with guard.task(f"t{i}", team="cx") as task:
            call = task.start_model_call("gpt-4o-mini", input_tokens=1000, max_tokens=100)
            call.end({"prompt_tokens": 1000, "completion_tokens": 50})
            total += task.cost_usd or 0
    snap = RedisStore.from_url(own_server.url, namespace=ns).snapshot(["team:cx"])["team:cx"]
    assert snap.committed["cost_usd"] == total
    assert snap.committed["model_calls"] == 6


def test_no_prompt_text_reaches_redis(url: str) -> None:
    ns = _ns()
    store = RedisStore.from_url(url, namespace=ns)
    guard = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
    secret = "SECRET-PROMPT-TEXT-42"
    with guard.task("t1") as task:
        call = task.start_model_call(
            "gpt-4o-mini", messages=[{"role": "user", "content": secret}], max_tokens=20
        )
        call.end(None, output_text=f"{secret} answered")
    client = store.client
    keys = list(client.scan_iter(match="{" + ns + "}*"))
    assert keys
    for key in keys:
        kind = client.type(key)
        dump = repr(key) + repr(
            client.hgetall(key) if kind == b"hash" else client.zrange(key, 0, -1)
            if kind == b"zset" else client.get(key)
        )  # fmt: skip
        assert secret not in dump


def test_async_store_on_a_cluster() -> None:
    import asyncio

    server = redis_servers.require("cluster")
    assert isinstance(server, redis_servers.Cluster)
    store = RedisStore.from_cluster(nodes=server.addresses, namespace=_ns())

    async def run() -> None:
        lines = [BudgetLine("task:a", {"cost_usd": D("1")}), BudgetLine("org:x")]
        results = await asyncio.gather(
            *[store.areserve(f"r{i}", lines, {"cost_usd": D("0.3")}) for i in range(5)]
        )
        assert sum(r.ok for r in results) == 3
        snap = await store.asnapshot(["org:x"])
        assert snap["org:x"].reserved["cost_usd"] == D("0.9")

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_eight_processes_of_sixteen_threads_never_overspend(kind: str) -> None:
    """8 processes x 16 threads run tasks against one team budget, calls in flight together:
    the team's committed spend stays within the limit to the last decimal, and every call that
    ran has its span (the spans' costs add up to exactly what Redis committed)."""
    server = redis_servers.require(kind)
    ns, limit = _ns(), D("0.5")
    worker = Path(__file__).with_name("redis_worker.py")
    extra = ["cluster"] if kind == "cluster" else []
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), server.url, ns, str(w), str(limit), *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(8)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ran = [t for o in outs for t in o["ran"]]
    span_tasks = [t for o in outs for t in o["span_tasks"]]
    spent = sum((D(o["cost"]) for o in outs), D(0))
    store = (
        RedisStore.from_cluster(server.url, namespace=ns)
        if kind == "cluster"
        else RedisStore.from_url(server.url, namespace=ns)
    )
    team = store.snapshot(["team:cx"])["team:cx"]
    assert sorted(ran) == sorted(span_tasks)
    assert len(ran) > 100  # the workers really competed
    assert team.committed["cost_usd"] == spent
    assert team.committed["cost_usd"] <= limit
    assert team.reserved.get("cost_usd", 0) == 0
    assert team.committed["model_calls"] == len(ran)


def test_counters_stay_exact_across_the_double_boundary(url: str) -> None:
    """Scripts add small amounts as one double and large ones as (hi, lo) pairs: sums that
    cross 2**53 units, borrows across 10**12 and releases back to zero stay exact."""
    store = RedisStore.from_url(url, namespace=_ns())
    line = BudgetLine("org:x", {"tokens": 2**60})
    near = 2**53 - 3
    assert store.charge([line], {"tokens": near}).ok
    assert store.charge([line], {"tokens": 7}).ok  # 2**53 + 4: past the exact doubles
    assert store.charge([line], {"tokens": 10**12 - 1}).ok
    assert store.reserve("r1", [line], {"tokens": 2**59}).ok
    assert not store.reserve("r2", [line], {"tokens": 2**59}).ok  # exactly one unit too many
    bal = store.snapshot(["org:x"])["org:x"]
    assert bal.committed["tokens"] == 2**53 + 4 + 10**12 - 1
    assert bal.reserved["tokens"] == 2**59
    store.release("r1")
    assert store.charge([line], {"tokens": -(2**53)}, check=False).ok
    bal = store.snapshot(["org:x"])["org:x"]
    assert bal.committed["tokens"] == 4 + 10**12 - 1
    assert "tokens" not in bal.reserved  # back to zero: left out, as before
    money = BudgetLine("org:m", {"cost_usd": D("100000")})
    for amount in ("0.009007199254740993", "12345.678901234567890123", "0.000000000000000001"):
        assert store.charge([money], {"cost_usd": D(amount)}).ok
    total = D("0.009007199254740993") + D("12345.678901234567890123") + D("1E-18")
    assert store.snapshot(["org:m"])["org:m"].committed["cost_usd"] == total


def test_kept_connection_survives_a_server_restart(own_server: redis_servers.Server) -> None:
    """The store keeps its connections; one the server closed is replaced on the next call
    without using up a retry (retries=0 here), and the call counts once."""
    store = RedisStore.from_url(own_server.url, namespace=_ns(), retries=0, timeout=0.5)
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.3")}).ok
    own_server.kill()
    own_server.start()
    bal = store.commit("r1", [LINE], {"cost_usd": D("0.25")})
    assert bal["team:cx"].committed["cost_usd"] == D("0.25")
    assert "cost_usd" not in bal["team:cx"].reserved
    own_server.kill()
    own_server.start()
    assert store.reserve("r2", [LINE], {"cost_usd": D("0.75")}).ok  # a retried reserve: once
    assert store.snapshot(["team:cx"])["team:cx"].reserved["cost_usd"] == D("0.75")


def test_scripts_are_reloaded_after_script_flush(url: str) -> None:
    store = RedisStore.from_url(url, namespace=_ns())
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.5")}).ok
    store.client.script_flush()
    store.commit("r1", [LINE], {"cost_usd": D("0.5")})
    assert store.snapshot(["team:cx"])["team:cx"].committed["cost_usd"] == D("0.5")


@pytest.mark.parametrize("variant", ["decode_responses", "blocking_pool"])
def test_other_client_setups_use_the_generic_path(url: str, variant: str) -> None:
    """A client the fast path does not take (decoded replies still decode; a blocking pool goes
    through redis-py) gives the same results."""
    if variant == "decode_responses":
        client = redis.Redis.from_url(url, decode_responses=True)
    else:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=4)
        client = redis.Redis(connection_pool=pool)
    store = RedisStore(client, namespace=_ns())
    assert (store._single is None) == (variant == "blocking_pool")
    lines = [BudgetLine("task:a", {"cost_usd": D("1")}), BudgetLine("org:x")]
    assert store.reserve("r1", lines, {"cost_usd": D("0.6"), "tokens": 10}).ok
    res = store.reserve("r2", lines, {"cost_usd": D("0.6")})
    assert not res.ok and res.denied is not None and res.denied.used == D("0.6")
    bal = store.commit("r1", lines, {"cost_usd": D("0.5"), "tokens": 8})
    assert bal["org:x"].committed == {"cost_usd": D("0.5"), "tokens": 8}
    assert bal["org:x"].reserved == {}
    store.close()


def test_cluster_store_follows_a_moved_slot() -> None:
    """The store talks straight to the master of its slot; pointed at the wrong master (as
    after a resharding) it follows the MOVED redirection through the cluster client."""
    from agentguard._redis_store import _Conns

    server = redis_servers.require("cluster")
    store = RedisStore.from_cluster(server.url, namespace=_ns())
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.4")}).ok
    assert store._cluster is not None
    right = store._cluster.pool
    pools = [
        store.client.get_redis_connection(n).connection_pool for n in store.client.get_primaries()
    ]
    store._cluster = _Conns(next(p for p in pools if p is not right))
    bal = store.commit("r1", [LINE], {"cost_usd": D("0.3")})
    assert bal["team:cx"].committed["cost_usd"] == D("0.3")
    assert store.snapshot(["team:cx"])["team:cx"].committed["cost_usd"] == D("0.3")
    assert store._cluster is not None and store._cluster.pool is right


def test_cluster_store_recovers_when_its_master_is_unreachable() -> None:
    """A connection error on the store's own path to the slot's master (a failover) sends the
    next call through the cluster client, which refreshes its slot map; even with retries=0 a
    store that lost one call carries on with the next."""
    from agentguard._redis_store import _Conns

    server = redis_servers.require("cluster")
    store = RedisStore.from_cluster(server.url, namespace=_ns(), retries=0, timeout=0.5)
    assert store.reserve("r1", [LINE], {"cost_usd": D("0.4")}).ok
    right = store._cluster.pool if store._cluster is not None else None
    dead = redis.ConnectionPool(
        host="127.0.0.1", port=redis_servers.free_port(), socket_timeout=0.5
    )
    store._cluster = _Conns(dead)
    with pytest.raises(ag.StoreError):
        store.commit("r1", [LINE], {"cost_usd": D("0.3")})
    bal = store.commit("r1", [LINE], {"cost_usd": D("0.3")})  # through the cluster client
    assert bal["team:cx"].committed["cost_usd"] == D("0.3")
    assert store.snapshot(["team:cx"])["team:cx"].committed["cost_usd"] == D("0.3")
    assert store._cluster is not None and store._cluster.pool is right  # fast path again


def test_kept_connections_come_from_old_and_new_pool_signatures() -> None:
    """redis-py < 5.3 wants a command name for get_connection; later versions warn on one."""
    from agentguard._redis_store import _Conns

    class OldPool:
        def get_connection(self, command_name: str, *keys: str) -> tuple[str, str | None]:
            return ("old", command_name)

    class NewPool:
        def get_connection(self, command_name: str | None = None) -> tuple[str, str | None]:
            return ("new", command_name)

    assert _Conns(OldPool()).take() == (("old", "EVALSHA"), False)
    assert _Conns(NewPool()).take() == (("new", None), False)
    conns = _Conns(NewPool())
    conns.free.append("kept")
    assert conns.take() == ("kept", True)
