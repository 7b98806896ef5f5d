"""The Lua scripts of :class:`~agentguard.RedisStore`: one per operation, all keys in one slot.

Numbers: Lua numbers are doubles, exact only below 2**53, and ``cjson`` writes at most 14
significant digits. Every amount is kept in *units* — 10**-18 USD for money (``cost_usd``), 1
for integer counters (tokens, calls) — as a pair ``hi * 10**12 + lo`` with ``0 <= lo < 10**12``:
two plain numbers the scripts add with one carry, compare as pairs, and never format (exact up
to 2**53 * 10**12 units: $9 billion per key; a ``hi`` of 10**14 or more is stored as a string so
``cjson`` keeps every digit). The client splits amounts and limits before sending them.

A budget line is one string, JSON: ``{"c": {counter: lo}, "C": {counter: hi}, "r": {...},
"R": {...}}`` — committed (``c`` / ``C``) and reserved (``r`` / ``R``); zeros are left out, and
``hi`` only appears when it is not zero (its ``lo`` then stays, ``0`` included).

Reservation record (one string): ``h`` followed by the JSON ``[[budget keys], [counter, hi, lo,
...]]`` while held (built by the client); the lease's deadline is its score in the leases sorted
set, moved forward by ``RENEW``. After it, a one-letter tombstone for ``dedupe_ttl``: ``x``
reclaimed after its lease, ``r`` released, ``d`` committed.

Cost model (server time is the shared resource): each script reads every budget line it touches
once (``GET`` + ``cjson.decode``, in C), adds numbers in Lua (no string arithmetic), and writes
each changed line back once (``cjson.encode`` + ``SET``). The reply is one bulk string, JSON:
``[status, a, b, c, d, line...]`` (commit: ``[status, late, line...]``) with each line's
document spliced in as stored, which the client decodes with one ``json.loads``. What a script
costs is mostly moving values between Redis and Lua — formatting a number (``cjson.encode``,
``tostring``) ≈ 0.5 µs, each ``redis.call`` ≈ 1.5 µs on a small VM — not the Lua around it: see
``benchmarks/bench_redis_lua.py`` and *Sizing* in ``docs/redis.md``.
"""

from __future__ import annotations

PRELUDE = r"""
local B = 1000000000000
local call, tonumber, next, byte, sub = redis.call, tonumber, next, string.byte, string.sub
local decode, encode = cjson.decode, cjson.encode
local S, R, D, order, dirty = {}, {}, {}, {}, {}
-- a budget line as a table {c =, C =, r =, R =} (a side may be absent); read once per script
local function load(key)
  local t = S[key]
  if t then return t end
  local v = call('GET', key)
  if v then
    t = decode(v)
    R[key] = v
  else
    t = {}
  end
  S[key] = t
  order[#order + 1] = key
  return t
end
-- add (h, l) units to counter c on side p / P ('c'/'C' committed, 'r'/'R' reserved);
-- |l| < B, so one carry; a total below zero is kept as zero
local function add(t, p, P, c, h, l)
  local lo, hs = t[p], t[P]
  if not lo then lo = {}; t[p] = lo end
  local nl, nh = (lo[c] or 0) + l, h
  if hs then
    local x = hs[c]
    if x then nh = nh + tonumber(x) end
  end
  if nl >= B then nh, nl = nh + 1, nl - B elseif nl < 0 then nh, nl = nh - 1, nl + B end
  if nh <= 0 then
    if hs then hs[c] = nil end
    if nh < 0 or nl == 0 then nl = nil end
    lo[c] = nl
  else
    if not hs then hs = {}; t[P] = hs end
    hs[c] = nh < 1e14 and nh or string.format('%.0f', nh)
    lo[c] = nl
  end
  dirty[t] = true
end
-- write each changed line once: SET (KEEPTTL), or DEL when nothing is left
local function flush()
  for j = 1, #order do
    local key = order[j]
    local t = S[key]
    if dirty[t] then
      dirty[t] = nil
      if t.c and next(t.c) == nil then t.c = nil end
      if t.C and next(t.C) == nil then t.C = nil end
      if t.r and next(t.r) == nil then t.r = nil end
      if t.R and next(t.R) == nil then t.R = nil end
      if next(t) == nil then
        call('DEL', key)
        D[key] = '{}'
      else
        local doc = encode(t)
        call('SET', key, doc, 'KEEPTTL')
        D[key] = doc
      end
    end
  end
end
-- the reply: the head (JSON text of a list, without its closing bracket), then each budget
-- document as stored, spliced in as is
local function reply(head, first)
  local parts = {}
  for i = first, #KEYS do
    local key = KEYS[i]
    local d = D[key] or R[key]
    if not d and not S[key] then load(key); d = R[key] end
    parts[#parts + 1] = d or '{}'
  end
  if #parts == 0 then return head .. ']' end
  if head == '[' then return '[' .. table.concat(parts, ',') .. ']' end
  return head .. ',' .. table.concat(parts, ',') .. ']'
end
-- a held record ('h' .. JSON): free its reserved amounts; false if not held
local function free(v)
  if not v or byte(v, 1) ~= 104 then return false end
  local h = decode(sub(v, 2))
  local a = h[2]
  local keys = h[1]
  for k = 1, #keys do
    local t = load(keys[k])
    for j = 1, #a, 3 do add(t, 'r', 'R', a[j], -a[j + 1], -a[j + 2]) end
  end
  return true
end
-- free up to 64 leases whose deadline passed; returns how many there were
local function reclaim(leases, now, tomb)
  local ids = call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for _, rec in ipairs(ids) do
    if free(call('GET', rec)) then call('SET', rec, 'x', 'PX', tomb) end
    call('ZREM', leases, rec)
  end
  return #ids
end
local function now_ms()
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- amounts: ARGV[i] = n, then n triples (counter, hi, lo); returns counters, his, los, the
-- index by counter and the next i
local function amounts(i)
  local n = tonumber(ARGV[i])
  local C, H, L, idx = {}, {}, {}, {}
  local b = i + 1
  for j = 1, n do
    local c = ARGV[b]
    C[j], H[j], L[j], idx[c] = c, tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), j
    b = b + 3
  end
  return C, H, L, idx, b
end
-- limits of each line from ARGV[i]: nlimits, triples (counter, hi, lo), expire-at (ms, '0' =
-- none). Returns the expiries when every limit holds, else nil and the refusal (JSON head).
local function check(first, i, H, L, idx, enforce)
  local exp = {}
  for li = first, #KEYS do
    local nl = tonumber(ARGV[i]); i = i + 1
    if nl > 0 and enforce then
      local t = load(KEYS[li])
      local tc, tC, tr, tR = t.c, t.C, t.r, t.R
      for _ = 1, nl do
        local c = ARGV[i]
        local k = idx[c]
        if k then
          local uh, ul = 0, 0
          if tC then uh = tonumber(tC[c]) or 0 end
          if tR then uh = uh + (tonumber(tR[c]) or 0) end
          if tc then ul = tc[c] or 0 end
          if tr then ul = ul + (tr[c] or 0) end
          if ul >= B then uh, ul = uh + 1, ul - B end
          local nh, nl2 = uh + H[k], ul + L[k]
          if nl2 >= B then nh, nl2 = nh + 1, nl2 - B end
          local lh = tonumber(ARGV[i + 1])
          if nh > lh or (nh == lh and nl2 > tonumber(ARGV[i + 2])) then
            if uh >= 1e14 then uh = string.format('%.0f', uh) end
            local head = encode({0, li - first + 1, c, uh, ul})
            return nil, sub(head, 1, -2)
          end
        end
        i = i + 3
      end
    else
      i = i + 3 * nl
    end
    exp[li] = ARGV[i]; i = i + 1
  end
  return exp, nil
end
local function expire(key, at)
  if at ~= '0' then call('PEXPIREAT', key, at) end
end
"""

# KEYS: leases, record, budget keys...
# ARGV: lease_ms, retry, tomb_ms, record body (JSON), amounts..., lines...
RESERVE = (
    PRELUDE
    + r"""
local leases, rec = KEYS[1], KEYS[2]
local st = call('GET', rec)
if st then
  if byte(st, 1) == 104 and ARGV[2] == '1' then return reply('[1,0,"",0,0', 3) end
  return '[-1]'
end
local C, H, L, idx, i = amounts(5)
local n = #C
local exp, denied = check(3, i, H, L, idx, true)
if denied then
  -- expired leases (a dead worker's) are reclaimed before a refusal, then checked again;
  -- snapshots (each task start) and lease renewals reclaim them too
  if reclaim(leases, now_ms(), ARGV[3]) > 0 then exp, denied = check(3, i, H, L, idx, true) end
  if denied then flush(); return reply(denied, 3) end
end
for li = 3, #KEYS do
  local t = load(KEYS[li])
  for k = 1, n do add(t, 'r', 'R', C[k], H[k], L[k]) end
end
flush()
for li = 3, #KEYS do expire(KEYS[li], exp[li]) end
call('SET', rec, 'h' .. ARGV[4])
call('ZADD', leases, now_ms() + tonumber(ARGV[1]), rec)
return reply('[1,0,"",0,0', 3)
"""
)

# KEYS: leases, record, stats, budget keys...
# ARGV: tomb_ms, amounts (n, then counter / hi / lo triples), then one expire-at per line
COMMIT = (
    PRELUDE
    + r"""
local leases, rec, stats = KEYS[1], KEYS[2], KEYS[3]
local st = call('GET', rec)
if st == 'd' then return reply('[2,0', 4) end
-- late: the lease ran out and was reclaimed before this commit (its spend still counts)
local late = 0
if st and byte(st, 1) == 104 then
  free(st)
  call('ZREM', leases, rec)
elseif st == 'x' then
  late = 1
end
local C, H, L, idx, i = amounts(2)
local n = #C
for li = 4, #KEYS do
  local t = load(KEYS[li])
  for k = 1, n do add(t, 'c', 'C', C[k], H[k], L[k]) end
end
flush()
for li = 4, #KEYS do expire(KEYS[li], ARGV[i]); i = i + 1 end
call('SET', rec, 'd', 'PX', ARGV[1])
if late == 1 then call('HINCRBY', stats, 'late_commits', 1) end
return reply(late == 1 and '[1,1' or '[1,0', 4)
"""
)

# KEYS: leases, record.  ARGV: tomb_ms
RELEASE = (
    PRELUDE
    + r"""
local leases, rec = KEYS[1], KEYS[2]
if free(call('GET', rec)) then
  flush()
  call('SET', rec, 'r', 'PX', ARGV[1])
  call('ZREM', leases, rec)
end
return '[1]'
"""
)

# KEYS: leases, records...  ARGV: lease_ms, tomb_ms. Moves the deadline of each lease still
# held (a reclaimed one is no longer in the sorted set: XX leaves it out) to now + lease_ms,
# then reclaims expired leases (other workers').
RENEW = (
    PRELUDE
    + r"""
local now = now_ms()
local deadline = now + tonumber(ARGV[1])
local n = 0
for i = 2, #KEYS do
  n = n + call('ZADD', KEYS[1], 'XX', 'CH', deadline, KEYS[i])
end
reclaim(KEYS[1], now, ARGV[2])
flush()
return n
"""
)

# KEYS: op marker, budget keys...  ARGV: check, tomb_ms, amounts..., lines...
CHARGE = (
    PRELUDE
    + r"""
local marker = KEYS[1]
if call('EXISTS', marker) == 1 then return reply('[2,0,"",0,0', 2) end
local C, H, L, idx, i = amounts(3)
local n = #C
local exp, denied = check(2, i, H, L, idx, ARGV[1] == '1')
if denied then return reply(denied, 2) end
for li = 2, #KEYS do
  local t = load(KEYS[li])
  for k = 1, n do add(t, 'c', 'C', C[k], H[k], L[k]) end
end
flush()
for li = 2, #KEYS do expire(KEYS[li], exp[li]) end
call('SET', marker, '1', 'PX', ARGV[2])
return reply('[1,0,"",0,0', 2)
"""
)

# KEYS: leases, budget keys...  ARGV: tomb_ms
SNAPSHOT = (
    PRELUDE
    + r"""
reclaim(KEYS[1], now_ms(), ARGV[1])
flush()
return reply('[', 2)
"""
)

# KEYS: a budget key  ARGV: ttl_ms — a closed task's line (nothing will charge it again) expires
# after ttl_ms, unless a reservation still holds part of it. Reply: [1, the line's document]
# when its expiry was set, [0] when there is no such line, [-1] when it is held
RETIRE = r"""
local v = redis.call('GET', KEYS[1])
if not v then return '[0]' end
local t = cjson.decode(v)
if (t.r and next(t.r)) or (t.R and next(t.R)) then return '[-1]' end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return '[1,' .. v .. ']'
"""

# a trivial script of the same shape, for the benchmark's baseline
TRIVIAL = "return 1"
