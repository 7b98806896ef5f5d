"""RedisStore: reserve + commit latency and throughput on a private single node and a private
3-master cluster, as ratios to a bare PING and a bare EVALSHA of a trivial script measured in the
same run; then throughput with 1, 2, 4 and 8 client processes.

Baselines: ``ping`` is redis-py's ``client.ping()``; ``ping (raw)`` is one PING on a connection
the store keeps (its own transport, without redis-py's per-command machinery); ``evalsha`` is
``store.trivial()``, a trivial script through the store's transport. A reserve + commit pair is
two scripts, so its throughput is at most half of EVALSHA's even with free scripts: the
``per script`` column (2 x pairs/s / EVALSHA) is the one that can approach 1. ``server µs`` is
the server's own time per script (``INFO commandstats``), what the one shared thread spends.

Usage: ``.venv/bin/python benchmarks/bench_redis.py [--quick]``. Starts its own servers (see
``tests/redis_servers.py``); reports medians, asserts nothing.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import redis_servers

from agentguard._redis_store import RedisStore
from agentguard._store import BudgetLine

LINES = [
    BudgetLine("task:bench", {"cost_usd": Decimal("1000000"), "model_calls": 10**12}),
    BudgetLine("team:cx", {"cost_usd": Decimal("1000000")}),
    BudgetLine("org:acme"),
]
AMOUNTS = {
    "model_calls": 1,
    "input_tokens": 1200,
    "output_tokens": 400,
    "tokens": 1600,
    "cost_usd": Decimal("0.00042"),
}
ACTUAL = {**AMOUNTS, "output_tokens": 180, "tokens": 1380, "cost_usd": Decimal("0.000312")}


def _store(url: str, cluster: bool, ns: str) -> RedisStore:
    if cluster:
        return RedisStore.from_cluster(url, namespace=ns)
    return RedisStore.from_url(url, namespace=ns)


def _ops(store: RedisStore, tag: str) -> dict[str, object]:
    n = [0]

    def pair() -> None:
        n[0] += 1
        rid = f"{tag}-{n[0]}"
        store.reserve(rid, LINES, AMOUNTS)
        store.commit(rid, LINES, ACTUAL)

    return {"ping": store.client.ping, "evalsha": store.trivial, "reserve+commit": pair}


def _raw_ping(store: RedisStore) -> object:
    """PING on a connection the store keeps: the transport floor of every store call."""
    conns = store._single or store._cluster_conns()
    assert conns is not None
    conn, _ = conns.take()
    packed = [b"*1\r\n$4\r\nPING\r\n"]

    def ping() -> None:
        conn.send_packed_command(packed, check_health=False)
        conn.read_response()

    return ping


def _server_us(store: RedisStore, cluster: bool, n: int) -> dict[str, float]:
    """Server time per script (µs), from INFO commandstats of the node holding the slot."""
    node = store._single or store._cluster_conns()
    assert node is not None
    conn, _ = node.take()

    def cmd(*args: str) -> object:
        conn.send_command(*args)
        return conn.read_response()

    out = {}
    tag = uuid.uuid4().hex[:6]
    for name, fn in (
        ("reserve", lambda i: store.reserve(f"s{tag}-{i}", LINES, AMOUNTS)),
        ("commit", lambda i: store.commit(f"s{tag}-{i}", LINES, ACTUAL)),
        ("charge", lambda i: store.charge(LINES, {"steps": 1})),
        ("snapshot", lambda i: store.snapshot([ln.key for ln in LINES])),
    ):
        cmd("CONFIG", "RESETSTAT")
        for i in range(n):
            fn(i)
        stats = cmd("INFO", "commandstats")
        text = stats.decode() if isinstance(stats, bytes) else str(stats)
        line = next(x for x in text.splitlines() if x.startswith("cmdstat_evalsha:"))
        out[name] = float(line.split("usec_per_call=")[1].split(",")[0])
    node.free.append(conn)
    return out


def _latency(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    for _ in range(50):
        call()  # type: ignore[operator]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        call()  # type: ignore[operator]
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000  # µs


def _worker(args: tuple[str, bool, str, str, float, int]) -> int:
    url, cluster, ns, op, seconds, w = args
    store = _store(url, cluster, ns)
    fn = _ops(store, f"w{w}-{uuid.uuid4().hex[:6]}")[op]
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()  # type: ignore[operator]
        count += 1
    return count


def _throughput(url: str, cluster: bool, op: str, procs: int, seconds: float) -> float:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    with mp.get_context("spawn").Pool(procs) as pool:
        counts = pool.map(_worker, [(url, cluster, ns, op, seconds, w) for w in range(procs)])
    return sum(counts) / seconds


def main() -> None:
    quick = "--quick" in sys.argv
    n, seconds = (500, 0.5) if quick else (3000, 2.0)
    targets = [("single node", redis_servers.single().url, False)]
    targets.append(("cluster (3 masters)", redis_servers.cluster().url, True))
    for name, url, cluster in targets:
        store = _store(url, cluster, f"bench-{uuid.uuid4().hex[:8]}")
        ops = _ops(store, "lat")
        lat = {op: _latency(fn, n) for op, fn in ops.items()}
        raw = _latency(_raw_ping(store), n)
        print(f"\n{name}: median latency per operation (µs), one client")
        print(f"  {'ping (raw)':<16} {raw:8.1f}   {raw / lat['ping']:5.2f}x PING")
        for op, us in lat.items():
            print(f"  {op:<16} {us:8.1f}   {us / lat['ping']:5.2f}x PING   {us / raw:5.2f}x raw")
        print(f"  reserve+commit / EVALSHA(trivial): {lat['reserve+commit'] / lat['evalsha']:.2f}x")
        server = _server_us(store, cluster, max(200, n // 5))
        print("  server µs per script: " + ", ".join(f"{k} {v:.1f}" for k, v in server.items()))
        print(f"\n{name}: throughput (ops/s; reserve+commit counts one pair as one op)")
        print(
            f"  {'procs':>5} {'PING':>10} {'EVALSHA':>10} {'res+commit':>11} {'rc/EVALSHA':>11}"
            f" {'per script':>11}"
        )
        for procs in (1, 2, 4, 8):
            tp = {op: _throughput(url, cluster, op, procs, seconds) for op in ops}
            ratio = tp["reserve+commit"] / tp["evalsha"]
            print(
                f"  {procs:>5} {tp['ping']:>10.0f} {tp['evalsha']:>10.0f} "
                f"{tp['reserve+commit']:>11.0f} {ratio:>11.2f} {2 * ratio:>11.2f}"
            )


if __name__ == "__main__":
    main()
