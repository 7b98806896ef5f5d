"""The Lua scripts of :class:`~agentguard.RedisStore`: one per operation, all keys in one slot.

Numbers: Lua numbers are doubles, exact only below 2**53. Every amount is therefore kept and
passed as a decimal string of *units* — 10**-18 USD for money (``cost_usd``), 1 for integer
counters (tokens, calls) — and split into ``hi * 10**12 + lo`` with ``0 <= lo < 10**12`` for
arithmetic (``split`` / ``join``): exact up to 9 * 10**27 units ($9 billion per key). Numbers
go back to Redis through ``%.0f``, never ``tostring`` (which keeps 14 digits).

Budget hash fields: ``c<counter>`` committed and ``r<counter>`` reserved, each a units string
(``"0"`` once it drops back to zero: rewriting a field is cheaper than deleting it, and the
reply leaves zeros out).

Reservation record (one string): ``h`` followed by the JSON ``[deadline_ms, [budget keys],
[counter, units, ...]]`` while held (the lease's live deadline is its score in the leases
sorted set, moved by ``RENEW``; the one in the record is the first); after it, a one-letter tombstone for ``dedupe_ttl``:
``x`` reclaimed after its lease, ``r`` released, ``d`` committed.

Cost model: each script reads every budget hash it touches once (``HGETALL``), works on Lua
tables, and writes each changed hash back once (one multi-field ``HSET``). The reply is one
bulk string, JSON: ``[status, a, b, c, d, balance...]`` (commit: ``[status, late,
balance...]``) where each balance is two flat lists ``[field, units, ...]``: the hash as the
script read it, then the fields it wrote (the client lays the second over the first and drops
zeros; an empty list comes back as ``{}``: cjson cannot tell an empty array from an empty
object). Building nothing else for the reply keeps server time — the shared resource — low.
"""

from __future__ import annotations

PRELUDE = r"""
local B = 1000000000000
local fmt, sub, byte = string.format, string.sub, string.byte
local function f(n) return fmt('%.0f', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- a units string as (hi, lo), 0 <= lo < B; and back (a negative total is kept as 0)
local function split(s)
  if not s then return 0, 0 end
  local n = #s
  if byte(s, 1) == 45 then
    local h, l = split(sub(s, 2))
    h, l = -h, -l
    if l < 0 then h, l = h - 1, l + B end
    return h, l
  end
  if n <= 12 then return 0, tonumber(s) end
  return tonumber(sub(s, 1, n - 12)), tonumber(sub(s, n - 11))
end
local function join(h, l)
  if h < 0 then return '0' end
  if h == 0 then return f(l) end
  return f(h) .. fmt('%012.0f', l)
end
-- budget documents: read once, changed in Lua, written back once by flush()
-- (S: decoded, R: as read, D: as written)
local S, R, D, dirty, order = {}, {}, {}, {}, {}
local function load(key)
  local t = S[key]
  if t then return t end
  local v = redis.call('GET', key)
  if v then
    t = cjson.decode(v)
    R[key] = v
  else
    t = {c = {}, r = {}}
  end
  S[key] = t
  order[#order + 1] = key
  return t
end
-- add units u to counter c on side p (t.c committed, t.r reserved); w is u as a number when
-- that is exact (fewer than 16 characters), else nil
local EXACT = 9007199254740992
local function add(key, p, c, u, w)
  local t = load(key)[p]
  local old = t[c]
  local v
  if w and (not old or #old < 16) then
    local n = (tonumber(old) or 0) + w
    if n < EXACT then v = n > 0 and f(n) or '0' end
  end
  if not v then
    local h, l = split(old)
    local hi, lo = split(u)
    h, l = h + hi, l + lo
    if l >= B then h, l = h + 1, l - B elseif l < 0 then h, l = h - 1, l + B end
    v = join(h, l)
  end
  if v == '0' then v = nil end
  if v ~= old then t[c] = v; dirty[key] = true end
end
local function exact(u)
  if #u < 16 then return tonumber(u) end
  return nil
end
local function flush()
  for _, key in ipairs(order) do
    if dirty[key] then
      local t = S[key]
      if next(t.c) == nil and next(t.r) == nil then
        redis.call('DEL', key)
        D[key] = '{}'
      else
        local doc = cjson.encode(t)
        redis.call('SET', key, doc, 'KEEPTTL')
        D[key] = doc
      end
    end
  end
end
-- the reply: the head list, then each budget document as JSON text, spliced in as is
local function reply(head, first)
  local parts = {}
  for i = first, #KEYS do
    local key = KEYS[i]
    load(key)
    parts[#parts + 1] = D[key] or R[key] or '{}'
  end
  if #parts == 0 then return cjson.encode(head) end
  if #head == 0 then return '[' .. table.concat(parts, ',') .. ']' end
  local h = cjson.encode(head)
  return sub(h, 1, -2) .. ',' .. table.concat(parts, ',') .. ']'
end
-- a held record ('h' .. JSON): free its reserved amounts; false if not held
local function free(v)
  if not v or byte(v, 1) ~= 104 then return false end
  local h = cjson.decode(sub(v, 2))
  local a = h[3]
  for j = 1, #a, 2 do
    local c, u, w = a[j], '-' .. a[j + 1], exact(a[j + 1])
    if w then w = -w end
    for _, key in ipairs(h[2]) do add(key, 'r', c, u, w) end
  end
  return h
end
local function reclaim(leases, now, tomb)
  local ids = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for _, rec in ipairs(ids) do
    if free(redis.call('GET', rec)) then redis.call('SET', rec, 'x', 'PX', tomb) end
    redis.call('ZREM', leases, rec)
  end
end
-- amounts: ARGV[i] = n, then n pairs (counter, units); returns the counters, the units,
-- the units as exact numbers (nil when too long), the index by counter, the next i
local function amounts(i)
  local n = tonumber(ARGV[i])
  local C, U, W, idx = {}, {}, {}, {}
  for j = 1, n do
    local b = i + 2 * j - 1
    local c, u = ARGV[b], ARGV[b + 1]
    C[j], U[j], W[j], idx[c] = c, u, exact(u), j
  end
  return C, U, W, idx, i + 1 + 2 * n
end
-- limits of each line from ARGV[i]: nlimits, pairs (counter, units), expire-at (ms, '0' =
-- none). Returns the expiries when every limit holds, else nil and the refusal.
local function check(first, i, U, W, idx, enforce)
  local exp = {}
  for li = first, #KEYS do
    local nl = tonumber(ARGV[i]); i = i + 1
    if nl > 0 and enforce then
      local t = load(KEYS[li])
      for _ = 1, nl do
        local c = ARGV[i]
        local k = idx[c]
        if k then
          local lim, cu, ru, w = ARGV[i + 1], t.c[c], t.r[c], W[k]
          local fits = false
          -- exact doubles: used + amount below 2**53, the limit short (exact) or long (>= 1e16)
          if w and (not cu or #cu < 16) and (not ru or #ru < 16) then
            local n = (tonumber(cu) or 0) + (tonumber(ru) or 0) + w
            if n < EXACT and n > -EXACT then
              if #lim < 16 then
                fits = n <= tonumber(lim)
              elseif #lim > 16 and byte(lim, 1) ~= 45 then
                fits = true
              end
            end
          end
          if not fits then
            local lh, ll = split(lim)
            local ch, cl = split(cu)
            local rh, rl = split(ru)
            local ah, al = split(U[k])
            local uh, ul = ch + rh, cl + rl
            if ul >= B then uh, ul = uh + 1, ul - B end
            local nh, nl2 = uh + ah, ul + al
            if nl2 >= B then nh, nl2 = nh + 1, nl2 - B end
            if nh > lh or (nh == lh and nl2 > ll) then
              return nil, {0, li - first + 1, c, join(uh, ul), ''}
            end
          end
        end
        i = i + 2
      end
    else
      i = i + 2 * nl
    end
    exp[li] = ARGV[i]; i = i + 1
  end
  return exp, nil
end
local function expire(key, at)
  if at ~= '0' then redis.call('PEXPIREAT', key, at) end
end
"""

# KEYS: leases, record, budget keys...
# ARGV: lease_ms, retry, tomb_ms, amounts..., lines...
RESERVE = (
    PRELUDE
    + r"""
local leases, rec = KEYS[1], KEYS[2]
local now = now_ms()
reclaim(leases, now, ARGV[3])
local st = redis.call('GET', rec)
if st then
  flush()
  if byte(st, 1) == 104 and ARGV[2] == '1' then return reply({1, 0, '', '', ''}, 3) end
  return '[-1]'
end
local C, U, W, idx, i = amounts(4)
local exp, denied = check(3, i, U, W, idx, true)
if denied then flush(); return reply(denied, 3) end
local keys, held = {}, {}
for k = 1, #C do
  held[#held + 1] = C[k]; held[#held + 1] = ARGV[4 + 2 * k]
end
for li = 3, #KEYS do keys[#keys + 1] = KEYS[li] end
for k = 1, #C do
  local c, u, w = C[k], U[k], W[k]
  for li = 3, #KEYS do add(KEYS[li], 'r', c, u, w) end
end
flush()
for li = 3, #KEYS do expire(KEYS[li], exp[li]) end
local deadline = now + tonumber(ARGV[1])
redis.call('SET', rec, 'h' .. cjson.encode({f(deadline), keys, held}))
redis.call('ZADD', leases, deadline, rec)
return reply({1, 0, '', '', ''}, 3)
"""
)

# KEYS: leases, record, stats, budget keys...
# ARGV: tomb_ms, amounts (n, then counter / units pairs), then one expire-at per line
COMMIT = (
    PRELUDE
    + r"""
local leases, rec, stats = KEYS[1], KEYS[2], KEYS[3]
local st = redis.call('GET', rec)
if st == 'd' then return reply({2, 0}, 4) end
local late = 0
if st and byte(st, 1) == 104 then
  free(st)
  -- the lease's deadline is its score (renewals move it), not the one in the record
  local dl = redis.call('ZSCORE', leases, rec)
  if dl and tonumber(dl) < now_ms() then late = 1 end
  redis.call('ZREM', leases, rec)
elseif st == 'x' then
  late = 1
end
local C, U, W, idx, i = amounts(2)
for k = 1, #C do
  local c, u, w = C[k], U[k], W[k]
  for li = 4, #KEYS do add(KEYS[li], 'c', c, u, w) end
end
flush()
for li = 4, #KEYS do expire(KEYS[li], ARGV[i]); i = i + 1 end
redis.call('SET', rec, 'd', 'PX', ARGV[1])
if late == 1 then redis.call('HINCRBY', stats, 'late_commits', 1) end
return reply({1, late}, 4)
"""
)

# KEYS: leases, record.  ARGV: tomb_ms
RELEASE = (
    PRELUDE
    + r"""
local leases, rec = KEYS[1], KEYS[2]
if free(redis.call('GET', rec)) then
  flush()
  redis.call('SET', rec, 'r', 'PX', ARGV[1])
  redis.call('ZREM', leases, rec)
end
return '[1]'
"""
)

# KEYS: leases, records...  ARGV: lease_ms. Moves the deadline of each lease still held (a
# reclaimed one is no longer in the sorted set: XX leaves it out) to now + lease_ms.
RENEW = r"""
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local n = 0
for i = 2, #KEYS do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', deadline, KEYS[i])
end
return n
"""

# KEYS: op marker, budget keys...  ARGV: check, tomb_ms, amounts..., lines...
CHARGE = (
    PRELUDE
    + r"""
local marker = KEYS[1]
if redis.call('EXISTS', marker) == 1 then return reply({2, 0, '', '', ''}, 2) end
local C, U, W, idx, i = amounts(3)
local exp, denied = check(2, i, U, W, idx, ARGV[1] == '1')
if denied then return reply(denied, 2) end
for k = 1, #C do
  local c, u, w = C[k], U[k], W[k]
  for li = 2, #KEYS do add(KEYS[li], 'c', c, u, w) end
end
flush()
for li = 2, #KEYS do expire(KEYS[li], exp[li]) end
redis.call('SET', marker, '1', 'PX', ARGV[2])
return reply({1, 0, '', '', ''}, 2)
"""
)

# KEYS: leases, budget keys...  ARGV: tomb_ms
SNAPSHOT = (
    PRELUDE
    + r"""
reclaim(KEYS[1], now_ms(), ARGV[1])
flush()
return reply({}, 2)
"""
)

# a trivial script of the same shape, for the benchmark's baseline
TRIVIAL = "return 1"
