"""The Lua scripts of :class:`~agentguard.RedisStore`: one per operation, all keys in one slot.

Numbers: Lua numbers are doubles, exact only below 2**53. Every counter is therefore kept as a
pair of hash fields, ``hi`` and ``lo`` with ``0 <= lo < 10**12``; the value is
``hi * 10**12 + lo`` units. Money (``cost_usd``) is counted in units of 10**-18 USD, so ``hi`` is
micro-dollars (exact up to $9 billion per key) and ``lo`` the remainder; integer counters
(tokens, calls) only ever use ``hi``. Numbers go back to Redis through ``%.0f``, never
``tostring`` (which keeps 14 digits).

Budget hash fields: ``c<counter>`` / ``C<counter>`` committed hi / lo, ``r<counter>`` /
``R<counter>`` reserved hi / lo. Reservation record (hash): ``s`` state (``h`` held,
``x`` reclaimed after its lease, ``r`` released, ``d`` committed), ``d`` lease deadline (ms),
``k`` the budget keys (JSON), ``a<counter>`` / ``A<counter>`` the held amount.
"""

from __future__ import annotations

PRELUDE = r"""
local B = 1000000000000
local function f(n) return string.format('%.0f', n) end
local function num(v) return tonumber(v) or 0 end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function hadd(key, p, c, hi, lo)
  local fh, fl = p .. c, string.upper(p) .. c
  local v = redis.call('HMGET', key, fh, fl)
  local h, l = num(v[1]) + hi, num(v[2]) + lo
  if l >= B then h, l = h + 1, l - B elseif l < 0 then h, l = h - 1, l + B end
  if h < 0 or (h == 0 and l == 0) then
    redis.call('HDEL', key, fh, fl)
  elseif l == 0 then
    redis.call('HSET', key, fh, f(h))
    if v[2] then redis.call('HDEL', key, fl) end
  else
    redis.call('HSET', key, fh, f(h), fl, f(l))
  end
end
local function free(rec)
  local r = redis.call('HGETALL', rec)
  local h = {}
  for i = 1, #r, 2 do h[r[i]] = r[i + 1] end
  if h.s ~= 'h' then return false end
  for _, key in ipairs(cjson.decode(h.k)) do
    for fld, v in pairs(h) do
      if string.sub(fld, 1, 1) == 'a' then
        local c = string.sub(fld, 2)
        hadd(key, 'r', c, -tonumber(v), -num(h['A' .. c]))
      end
    end
  end
  return true
end
local function settle(rec, state, tomb)
  redis.call('DEL', rec)
  redis.call('HSET', rec, 's', state)
  redis.call('PEXPIRE', rec, tomb)
end
local function reclaim(leases, now, tomb)
  local ids = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for _, rec in ipairs(ids) do
    if free(rec) then settle(rec, 'x', tomb) end
    redis.call('ZREM', leases, rec)
  end
end
local function balances(first)
  local out = {}
  for i = first, #KEYS do out[#out + 1] = redis.call('HGETALL', KEYS[i]) end
  return out
end
-- amounts: ARGV[i] = n, then n triples (counter, hi, lo); returns C, H, L, index, next i
local function amounts(i)
  local n = tonumber(ARGV[i])
  local C, H, L, idx = {}, {}, {}, {}
  for j = 1, n do
    local b = i + 3 * (j - 1)
    C[j], H[j], L[j] = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    idx[C[j]] = j
  end
  return C, H, L, idx, i + 1 + 3 * n
end
-- limits of each line from ARGV[i]: nlimits, triples, expire-at (ms, '0' = none).
-- Returns nil and the expiries when every limit holds, else the refusal.
local function check(first, i, H, L, idx, enforce)
  local exp = {}
  for li = first, #KEYS do
    local nl = tonumber(ARGV[i]); i = i + 1
    for _ = 1, nl do
      local c, lh, ll = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]); i = i + 3
      local k = idx[c]
      if k and enforce then
        local v = redis.call('HMGET', KEYS[li], 'c' .. c, 'C' .. c, 'r' .. c, 'R' .. c)
        local uh, ul = num(v[1]) + num(v[3]), num(v[2]) + num(v[4])
        if ul >= B then uh, ul = uh + 1, ul - B end
        local nh, nl2 = uh + H[k], ul + L[k]
        if nl2 >= B then nh, nl2 = nh + 1, nl2 - B end
        if nh > lh or (nh == lh and nl2 > ll) then
          return nil, {0, li - first + 1, c, f(uh), f(ul)}
        end
      end
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
local tomb = ARGV[3]
local now = now_ms()
reclaim(leases, now, tomb)
local st = redis.call('HGET', rec, 's')
if st then
  if st == 'h' and ARGV[2] == '1' then return {1, 0, '', '0', '0', balances(3)} end
  return {-1}
end
local C, H, L, idx, i = amounts(4)
local exp, denied = check(3, i, H, L, idx, true)
if denied then denied[6] = balances(3); return denied end
local keys = {}
for li = 3, #KEYS do
  keys[#keys + 1] = KEYS[li]
  for k = 1, #C do hadd(KEYS[li], 'r', C[k], H[k], L[k]) end
  expire(KEYS[li], exp[li])
end
local deadline = now + tonumber(ARGV[1])
redis.call('HSET', rec, 's', 'h', 'd', f(deadline), 'k', cjson.encode(keys))
for k = 1, #C do redis.call('HSET', rec, 'a' .. C[k], f(H[k]), 'A' .. C[k], f(L[k])) end
redis.call('ZADD', leases, deadline, rec)
return {1, 0, '', '0', '0', balances(3)}
"""
)

# KEYS: leases, record, stats, budget keys...
# ARGV: tomb_ms, amounts..., then one expire-at per line
COMMIT = (
    PRELUDE
    + r"""
local leases, rec, stats = KEYS[1], KEYS[2], KEYS[3]
local st = redis.call('HGET', rec, 's')
if st == 'd' then return {2, 0, balances(4)} end
local late = 0
if st == 'h' then
  local deadline = tonumber(redis.call('HGET', rec, 'd'))
  free(rec)
  if deadline < now_ms() then late = 1 end
elseif st == 'x' then
  late = 1
end
local C, H, L, idx, i = amounts(2)
for li = 4, #KEYS do
  for k = 1, #C do hadd(KEYS[li], 'c', C[k], H[k], L[k]) end
  expire(KEYS[li], ARGV[i]); i = i + 1
end
settle(rec, 'd', ARGV[1])
redis.call('ZREM', leases, rec)
if late == 1 then redis.call('HINCRBY', stats, 'late_commits', 1) end
return {1, late, balances(4)}
"""
)

# KEYS: leases, record.  ARGV: tomb_ms
RELEASE = (
    PRELUDE
    + r"""
local leases, rec = KEYS[1], KEYS[2]
if free(rec) then
  settle(rec, 'r', ARGV[1])
  redis.call('ZREM', leases, rec)
end
return 1
"""
)

# KEYS: op marker, budget keys...  ARGV: check, tomb_ms, amounts..., lines...
CHARGE = (
    PRELUDE
    + r"""
local marker = KEYS[1]
if redis.call('EXISTS', marker) == 1 then return {2, 0, '', '0', '0', balances(2)} end
local C, H, L, idx, i = amounts(3)
local exp, denied = check(2, i, H, L, idx, ARGV[1] == '1')
if denied then denied[6] = balances(2); return denied end
for li = 2, #KEYS do
  for k = 1, #C do hadd(KEYS[li], 'c', C[k], H[k], L[k]) end
  expire(KEYS[li], exp[li])
end
redis.call('SET', marker, '1', 'PX', ARGV[2])
return {1, 0, '', '0', '0', balances(2)}
"""
)

# KEYS: leases, budget keys...  ARGV: tomb_ms
SNAPSHOT = (
    PRELUDE
    + r"""
reclaim(KEYS[1], now_ms(), ARGV[1])
return balances(2)
"""
)

# a trivial script of the same shape, for the benchmark's baseline
TRIVIAL = "return 1"
