"""Where a RedisStore script's server time goes: each step of the reserve / commit scripts
timed alone on a private server, as the server's own µs per ``EVALSHA`` (``INFO
commandstats``), next to a trivial script.

Each case is a small script on the benchmark's three budget lines (the documents a reserve +
commit on ``bench_redis.LINES`` leaves, five counters each); every case runs ``n`` times per
round and the figure is the median of interleaved rounds (the machine is shared). ``lean
reserve`` is the reserve rewritten without helper functions or ``(hi, lo)`` bookkeeping —
the same reads, writes and JSON — to separate the cost of Lua code from the cost of moving
values between Redis and Lua.

Usage: ``.venv/bin/python benchmarks/bench_redis_lua.py [--quick]``. Reports, asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
import redis_servers
from bench_redis import ACTUAL, AMOUNTS, LINES

from agentguard import _redis_lua as lua
from agentguard._redis_store import RedisStore

# the reserve without helpers: same GET / cjson / SET / TIME / ZADD, inline arithmetic
LEAN_RESERVE = r"""
local B = 1000000000000
local call, A = redis.call, ARGV
local st = call('GET', KEYS[2])
if st then return '[-1]' end
local n = tonumber(A[5])
local C, H, L = {}, {}, {}
for j = 1, n do
  local b = 3 * j + 3
  C[j], H[j], L[j] = A[b], tonumber(A[b + 1]), tonumber(A[b + 2])
end
local parts = {'[1'}
for li = 3, #KEYS do
  local v = call('GET', KEYS[li])
  local t = v and cjson.decode(v) or {}
  t.r, t.R = t.r or {}, t.R or {}
  for k = 1, n do
    local c = C[k]
    local l = (t.r[c] or 0) + L[k]
    local h = (t.R[c] or 0) + H[k]
    if l >= B then h, l = h + 1, l - B end
    t.r[c] = l
    if h > 0 then t.R[c] = h end
  end
  local doc = cjson.encode(t)
  call('SET', KEYS[li], doc, 'KEEPTTL')
  parts[#parts + 1] = doc
end
local now = call('TIME')
call('SET', KEYS[2], 'h' .. A[4])
call('ZADD', KEYS[1], now[1] * 1000 + tonumber(A[1]), KEYS[2])
return table.concat(parts, ',') .. ']'
"""

CASES = {
    "trivial (return 1)": "return 1",
    "prelude + return 1": lua.PRELUDE + "\nreturn 1",
    "TIME": "redis.call('TIME') return 1",
    "GET record (missing)": "redis.call('GET', KEYS[2]) return 1",
    "ZADD lease + ZREM": (
        "redis.call('ZADD', KEYS[1], 1, KEYS[2]) redis.call('ZREM', KEYS[1], KEYS[2]) return 1"
    ),
    "3x GET line": "for i = 3, 5 do redis.call('GET', KEYS[i]) end return 1",
    "3x GET + cjson.decode": (
        "for i = 3, 5 do cjson.decode(redis.call('GET', KEYS[i])) end return 1"
    ),
    "3x GET + decode + encode": (
        "for i = 3, 5 do cjson.encode(cjson.decode(redis.call('GET', KEYS[i]))) end return 1"
    ),
    "3x GET + decode + encode + SET": (
        "for i = 3, 5 do local d = cjson.encode(cjson.decode(redis.call('GET', KEYS[i])))"
        " redis.call('SET', KEYS[i], d, 'KEEPTTL') end return 1"
    ),
    "3x HGETALL (10 fields)": ("for i = 6, 8 do redis.call('HGETALL', KEYS[i]) end return 1"),
    "3x HGETALL + HSET 5 fields (as read)": (
        "for i = 6, 8 do local f = redis.call('HGETALL', KEYS[i])"
        " redis.call('HSET', KEYS[i], unpack(f, 1, 10)) end return 1"
    ),
    "15x HINCRBY (5 fields x 3 hashes)": (
        "for i = 6, 8 do for f = 1, 5 do redis.call('HINCRBY', KEYS[i], 'f' .. f, 0) end end"
        " return 1"
    ),
    "1000x tonumber('1')": "local x = 0 for i = 1, 1000 do x = x + tonumber('1') end return 1",
    "1000x empty loop": "local x = 0 for i = 1, 1000 do x = x + i end return 1",
    "lean reserve (no helpers)": LEAN_RESERVE,
    "reserve (shipped)": lua.RESERVE,
}


HASHES = {
    "3x HGETALL (10 fields)",
    "3x HGETALL + HSET 5 fields (as read)",
    "15x HINCRBY (5 fields x 3 hashes)",
}


def main() -> None:
    quick = "--quick" in sys.argv
    n, rounds = (300, 3) if quick else (1000, 5)
    srv = redis_servers.single()
    client = redis.Redis(port=srv.port)
    ns = "{lua}:"
    store = RedisStore.from_url(srv.url, namespace="lua", renew_leases=False)
    for i in range(3):  # documents as a running store leaves them
        store.reserve(f"seed{i}", LINES, AMOUNTS)
        store.commit(f"seed{i}", LINES, ACTUAL)
    req = store._reserve_req("x", LINES, AMOUNTS)
    hashes = [ns + f"h{i}" for i in range(3)]
    for h in hashes:
        client.hset(h, mapping={f"f{f}": 10**12 + f for f in range(10)})
    nk = len(req.keys)
    shas = {name: client.script_load(src) for name, src in CASES.items()}
    out: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(rounds):
        for name, sha in shas.items():
            client.config_resetstat()
            for _ in range(n):
                keys = [req.keys[0], f"{ns}r:{uuid.uuid4().hex}", *req.keys[2:]]  # a fresh id
                if name in HASHES:  # hash cases: the three hashes are KEYS[6..8]
                    client.evalsha(sha, nk + 3, *keys, *hashes, *req.args)
                else:
                    client.evalsha(sha, nk, *keys, *req.args)
            stats = client.info("commandstats")["cmdstat_evalsha"]
            out[name].append(float(stats["usec_per_call"]))
    base = statistics.median(out["trivial (return 1)"])
    print(f"server µs per EVALSHA, median of {rounds} interleaved rounds of {n}")
    for name, vals in out.items():
        med = statistics.median(vals)
        print(f"  {name:36} {med:8.2f}   +{med - base:7.2f} over trivial")
    store.close()


if __name__ == "__main__":
    main()
