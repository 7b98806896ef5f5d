"""RedisStore: reserve + commit latency and throughput on a private single node and a private
3-master cluster, as ratios to a bare PING and a bare EVALSHA of a trivial script measured in the
same run; then throughput with 1, 2, 4 and 8 client processes.

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
        print(f"\n{name}: median latency per operation (µs), one client")
        for op, us in lat.items():
            print(f"  {op:<16} {us:8.1f}   {us / lat['ping']:5.2f}x PING")
        print(f"  reserve+commit / EVALSHA(trivial): {lat['reserve+commit'] / lat['evalsha']:.2f}x")
        print(f"\n{name}: throughput (ops/s; reserve+commit counts one pair as one op)")
        print(f"  {'procs':>5} {'PING':>10} {'EVALSHA':>10} {'res+commit':>11} {'rc/EVALSHA':>11}")
        for procs in (1, 2, 4, 8):
            tp = {op: _throughput(url, cluster, op, procs, seconds) for op in ops}
            ratio = tp["reserve+commit"] / tp["evalsha"]
            print(
                f"  {procs:>5} {tp['ping']:>10.0f} {tp['evalsha']:>10.0f} "
                f"{tp['reserve+commit']:>11.0f} {ratio:>11.2f}"
            )


if __name__ == "__main__":
    main()
