"""RedisStore: reserve and commit latency and throughput on a private single node and a private
3-master cluster, as ratios to baselines measured in the same run.

Baselines: ``ping`` is redis-py's ``client.ping()`` (a PING round trip through the client a user
has); ``ping (raw)`` is one PING on a connection the store keeps (the transport floor, without
redis-py's per-command machinery); ``evalsha`` is ``store.trivial()``, a trivial script
(``return 1``) through the store's own transport.

Goals (issue 6): reserve + commit <= 2.3x a PING round trip; >= 0.9x raw EVALSHA throughput with
4 client processes.

Floors, to tell the store's own cost from what any store of this shape must pay:
``evalsha+args`` is the trivial script sent with a reserve's keys and arguments (packed per call,
as the store does: the transport of one operation, no work); ``floor`` is a script that only
reads, decodes, re-encodes and writes each of the reserve's three budget lines and returns them
(``GET`` + ``cjson.decode`` + ``cjson.encode`` + ``SET`` per line, the least a read-modify-write
of these lines costs whatever the encoding: ``bench_redis_lua.py`` times the hash variants),
with the reply decoded by ``json.loads``. ``floor+floor`` is the floor of reserve + commit.

Throughput is defined **per operation**: each reserve and each commit is one ``EVALSHA``, so a
worker alternating reserve and commit counts two operations per model call; its ops/s is
compared with the ops/s of workers sending the trivial script, at 1, 2, 4 and 8 processes
started together. ``server µs`` is the server's own time per script (``INFO commandstats``) —
what the one shared server thread spends.

The machine is shared: every figure is the median of interleaved repeats (each repeat measures
every operation once, in turn), and the ratios are taken between medians of the same run.

Usage: ``.venv/bin/python benchmarks/bench_redis.py [--quick]``. Starts its own servers (see
``tests/redis_servers.py``); reports, asserts nothing.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import redis_servers

from agentguard import _redis_store
from agentguard._redis_store import RedisStore, _Req
from agentguard._store import Amount, BudgetLine

FLOOR = r"""
local parts = {}
for i = 3, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local doc = v and cjson.encode(cjson.decode(v)) or '{}'
  redis.call('SET', KEYS[i], doc, 'KEEPTTL')
  parts[#parts + 1] = doc
end
return '[' .. table.concat(parts, ',') .. ']'
"""
_redis_store._SCRIPTS["floor"] = FLOOR  # benchmark-only script, loaded on NOSCRIPT like the rest

LINES = [
    BudgetLine("task:bench", {"cost_usd": Decimal("1000000"), "model_calls": 10**12}),
    BudgetLine("team:cx", {"cost_usd": Decimal("1000000")}),
    BudgetLine("org:acme"),
]
AMOUNTS: dict[str, Amount] = {
    "model_calls": 1,
    "input_tokens": 1200,
    "output_tokens": 400,
    "tokens": 1600,
    "cost_usd": Decimal("0.00042"),
}
ACTUAL: dict[str, Amount] = {
    **AMOUNTS,
    "output_tokens": 180,
    "tokens": 1380,
    "cost_usd": Decimal("0.000312"),
}


def _store(url: str, cluster: bool, ns: str) -> RedisStore:
    if cluster:
        store = RedisStore.from_cluster(url, namespace=ns)
    else:
        store = RedisStore.from_url(url, namespace=ns)
    store._shas["floor"] = _redis_store._sha1(FLOOR)
    return store


class _Ops:
    """The operations measured, on one store: each call is one round trip."""

    def __init__(self, store: RedisStore, tag: str) -> None:
        self.store, self.tag, self.n, self.held = store, tag, 0, False
        shape = store._reserve_req(f"{tag}-shape", LINES, AMOUNTS)
        self.args_req = _Req("trivial", shape.keys, shape.args)
        self.floor_req = _Req("floor", shape.keys, shape.args)

    def reserve_commit(self) -> None:
        """Alternately a reserve and the commit of it: one EVALSHA per call."""
        if self.held:
            self.store.commit(f"{self.tag}-{self.n}", LINES, ACTUAL)
        else:
            self.n += 1
            self.store.reserve(f"{self.tag}-{self.n}", LINES, AMOUNTS)
        self.held = not self.held

    def pair(self) -> None:
        self.n += 1
        rid = f"{self.tag}-p{self.n}"
        self.store.reserve(rid, LINES, AMOUNTS)
        self.store.commit(rid, LINES, ACTUAL)

    def evalsha_args(self) -> None:
        self.store._call(self.args_req)

    def floor(self) -> None:
        json.loads(self.store._call(self.floor_req))

    def floor_pair(self) -> None:
        self.floor()
        self.floor()

    def table(self) -> dict[str, Callable[[], Any]]:
        return {
            "ping": self.store.client.ping,
            "evalsha": self.store.trivial,
            "evalsha+args": self.evalsha_args,
            "floor": self.floor,
            "reserve|commit": self.reserve_commit,
            "floor+floor": self.floor_pair,
            "reserve+commit": self.pair,
        }


def _raw_ping(store: RedisStore) -> Callable[[], Any]:
    """PING on a connection the store keeps: the transport floor of every store call."""
    conns = store._single or store._cluster_conns()
    assert conns is not None
    conn, _ = conns.take()
    packed = [b"*1\r\n$4\r\nPING\r\n"]

    def ping() -> None:
        conn.send_packed_command(packed, check_health=False)
        conn.read_response()

    return ping


def _server_us(store: RedisStore, n: int) -> dict[str, float]:
    """Server time per script (µs), from INFO commandstats of the node holding the slot."""
    node = store._single or store._cluster_conns()
    assert node is not None
    conn, _ = node.take()

    def cmd(*args: str) -> object:
        conn.send_command(*args)
        return conn.read_response()

    out = {}
    tag = uuid.uuid4().hex[:6]
    ops = _Ops(store, f"s{tag}")
    for name, fn in (
        ("trivial", lambda i: store.trivial()),
        ("trivial+args", lambda i: ops.evalsha_args()),
        ("floor", lambda i: ops.floor()),
        ("reserve", lambda i: store.reserve(f"s{tag}-{i}", LINES, AMOUNTS)),
        ("commit", lambda i: store.commit(f"s{tag}-{i}", LINES, ACTUAL)),
        ("charge", lambda i: store.charge(LINES, {"steps": 1})),
        ("snapshot", lambda i: store.snapshot([ln.key for ln in LINES])),
    ):
        for i in range(5):  # loads the script (a NOSCRIPT, then SCRIPT LOAD) on first use
            fn(n + i)
        cmd("CONFIG", "RESETSTAT")
        for i in range(n):
            fn(i)
        stats = cmd("INFO", "commandstats")
        text = stats.decode() if isinstance(stats, bytes) else str(stats)
        line = next(x for x in text.splitlines() if x.startswith("cmdstat_evalsha:"))
        out[name] = float(line.split("usec_per_call=")[1].split(",")[0])
        # script-cache misses would show as EVAL / SCRIPT calls next to EVALSHA
        misses = [
            x.split(":")[0]
            for x in text.splitlines()
            if x.startswith(("cmdstat_eval:", "cmdstat_script"))
        ]
        if misses:
            out[name + " (cache misses: " + ",".join(misses) + ")"] = 0.0
    node.free.append(conn)
    return out


def _latency(fn: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000  # µs


# -- throughput: a fixed pool of worker processes, each with its own store ---------------------

_WORKER_OPS: dict[tuple[str, bool, str], _Ops] = {}


def _worker(args: tuple[str, bool, str, str, float, float]) -> int:
    url, cluster, ns, op, start_at, seconds = args
    ops = _WORKER_OPS.get((url, cluster, ns))
    if ops is None:
        ops = _WORKER_OPS[(url, cluster, ns)] = _Ops(
            _store(url, cluster, ns), f"w-{uuid.uuid4().hex[:8]}"
        )
        for _ in range(20):  # connect, load the scripts
            ops.store.trivial()
    fn = ops.table()[op]
    if ops.held:  # never leave a reservation open between measurements
        ops.reserve_commit()
    while time.time() < start_at:
        time.sleep(0.001)
    count = 0
    end = start_at + seconds
    while time.time() < end:
        fn()
        count += 1
    return count


def _throughput(
    pool: Any, url: str, cluster: bool, ns: str, op: str, procs: int, s: float
) -> float:
    start_at = time.time() + 0.3  # every worker starts together
    counts = pool.map(_worker, [(url, cluster, ns, op, start_at, s)] * procs, chunksize=1)
    return float(sum(counts)) / s


def main() -> None:
    quick = "--quick" in sys.argv
    n, seconds, repeats = (300, 0.5, 3) if quick else (1000, 1.5, 5)
    targets = [("single node", redis_servers.single().url, False)]
    targets.append(("cluster (3 masters)", redis_servers.cluster().url, True))
    ctx = mp.get_context("spawn")
    with ctx.Pool(8) as pool:
        for name, url, cluster in targets:
            store = _store(url, cluster, f"bench-{uuid.uuid4().hex[:8]}")
            ops = _Ops(store, "lat").table()
            ops["ping (raw)"] = _raw_ping(store)
            for fn in ops.values():  # warm up: connections, scripts
                for _ in range(100):
                    fn()
            rounds: dict[str, list[float]] = {op: [] for op in ops}
            for _ in range(repeats):  # interleaved: every op once per round
                for op, fn in ops.items():
                    rounds[op].append(_latency(fn, n))
            lat = {op: statistics.median(v) for op, v in rounds.items()}
            ping, raw, ev = lat["ping"], lat["ping (raw)"], lat["evalsha"]
            print(f"\n{name}: latency, one client (µs, median of {repeats} interleaved rounds)")
            for op in (
                "ping (raw)",
                "ping",
                "evalsha",
                "evalsha+args",
                "floor",
                "reserve|commit",
                "floor+floor",
                "reserve+commit",
            ):
                us = lat[op]
                print(
                    f"  {op:<16} {us:8.1f}   {us / ping:5.2f}x PING   {us / raw:5.2f}x raw PING"
                    f"   {us / ev:5.2f}x EVALSHA"
                )
            print(
                f"  goal: reserve+commit <= 2.3x PING -> {lat['reserve+commit'] / ping:.2f}x"
                f" (floor+floor: {lat['floor+floor'] / ping:.2f}x;"
                f" 2x evalsha+args: {2 * lat['evalsha+args'] / ping:.2f}x)"
            )
            server = _server_us(store, max(200, n // 2))
            print("  server µs per script: " + ", ".join(f"{k} {v:.1f}" for k, v in server.items()))
            print(
                f"\n{name}: throughput per operation (ops/s; a reserve and a commit are one op"
                f" each), median of {repeats} interleaved repeats"
            )
            print(
                f"  {'procs':>5} {'EVALSHA':>9} {'+args':>9} {'floor':>9} {'res|commit':>10}"
                f" {'ratio':>6} {'args':>6} {'floor':>6}   ratio per repeat"
            )
            ns = f"bench-{uuid.uuid4().hex[:8]}"
            for procs in (1, 2, 4, 8):
                tp: dict[str, list[float]] = {}
                for _ in range(repeats):
                    for op in ("evalsha", "evalsha+args", "floor", "reserve|commit"):
                        tp.setdefault(op, []).append(
                            _throughput(pool, url, cluster, ns, op, procs, seconds)
                        )
                e, a, f, r = (
                    statistics.median(tp[op])
                    for op in ("evalsha", "evalsha+args", "floor", "reserve|commit")
                )
                each = " ".join(
                    f"{y / x:.2f}" for x, y in zip(tp["evalsha"], tp["reserve|commit"], strict=True)
                )
                print(
                    f"  {procs:>5} {e:>9.0f} {a:>9.0f} {f:>9.0f} {r:>10.0f}"
                    f" {r / e:>6.2f} {a / e:>6.2f} {f / e:>6.2f}   {each}"
                )
            print("  goal: >= 0.9x EVALSHA at 4 processes")
            store.close()


if __name__ == "__main__":
    main()
