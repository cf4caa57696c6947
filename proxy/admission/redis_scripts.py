"""The Lua scripts the Redis store runs (buckets_redis.py): each decides and
writes its buckets in one atomic step inside Redis.

:data:`SCRIPT` takes one token from a request bucket (buckets.py's
:func:`~proxy.admission.buckets.take_token`, in microseconds);
:data:`TOKENS_SCRIPT` reserves a request's tokens together with its request
token, or settles what an answer used (token_buckets.py's arithmetic). Both
read the clock with Redis's own ``TIME`` (buckets_redis.py says why). Each
script's SHA-1 is its name for ``EVALSHA``.
"""

from __future__ import annotations

import hashlib

__all__ = ["SCRIPT", "SCRIPT_SHA", "TOKENS_SCRIPT", "TOKENS_SHA"]

# Both scripts start here: the clock, in µs.
_NOW_LUA = """\
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# A request bucket: its key's value is the time (µs, Redis clock) at which the
# bucket is full again. Numbers are Lua doubles: exact for integers below 2^53
# (µs since 1970 are ~2^51); string.format keeps every digit where tostring
# would round to 14. A debt above this limit's ceiling (state written under an
# earlier config, by this proxy before a reload or by another one) is cut to
# it, and written back so the key expires when the cut bucket is full; see
# buckets.py.
_REQUEST_BUCKET_LUA = """\
local function store_debt(key, debt)
  redis.call('SET', key, string.format('%.0f', now + debt),
             'PX', math.max(1, math.ceil(debt / 1000)))
end
local function read_debt(key, ceiling)
  local stored = redis.call('GET', key)
  if not stored then return 0, false end
  local debt = tonumber(stored) - now
  if debt < 0 then return 0, false end
  if debt > ceiling then return ceiling, true end
  return debt, false
end
"""

# KEYS[1]: the bucket. ARGV[1]: burst. ARGV[2]: microseconds per token.
# Returns {allowed 0/1, remaining, retry_after_us, reset_after_us}.
SCRIPT = (
    _NOW_LUA
    + _REQUEST_BUCKET_LUA
    + """\
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local ceiling = burst * interval
local debt, cut = read_debt(KEYS[1], ceiling)
if debt <= ceiling - interval then
  debt = debt + interval
  store_debt(KEYS[1], debt)
  return {1, burst - math.ceil(debt / interval), 0, debt}
end
if cut then store_debt(KEYS[1], debt) end
return {0, 0, debt - (ceiling - interval), debt}
"""
)
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts so


# Token budgets (README: Token budgets; the arithmetic of token_buckets.py's
# take_tokens and settle_tokens). A client's token buckets are one key holding
# "<owed minute> <owed day> <at µs> <capacity per minute> <per day>": the
# capacities of the budget the state was last reserved under, which a settle
# drains and cuts under (a reload may have changed the budget since the
# answer it settles was reserved: buckets_memory.py's TokenState keeps its
# budget for the same reason). A state of three fields (written before the
# capacities were kept) is settled under the reservation's. The key expires
# when both windows have drained.
_TOKENS_LUA = """\
local function fmt(x) return string.format('%.17g', x) end
local function drain(owed, elapsed, cap, window)
  if cap == 0 then return 0 end
  owed = owed - elapsed * cap / window
  if owed <= 0 then return 0 end
  return math.min(owed, 2 * cap)
end
-- What key's windows owe now, drained and cut under cap_m and cap_d, or, when
-- kept is true, under the capacities the state keeps (if it keeps them); and
-- the capacities used.
local function read_tokens(key, cap_m, cap_d, kept)
  local state = redis.call('GET', key)
  if not state then return 0, 0, cap_m, cap_d end
  local m, d, at, cm, cd = string.match(state, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
  if not at then m, d, at = string.match(state, '^(%S+) (%S+) (%S+)$') end
  if not at then return 0, 0, cap_m, cap_d end
  if kept and cd then cap_m, cap_d = tonumber(cm), tonumber(cd) end
  local elapsed = now - tonumber(at)
  return drain(tonumber(m), elapsed, cap_m, 60000000),
         drain(tonumber(d), elapsed, cap_d, 86400000000), cap_m, cap_d
end
local function write_tokens(key, m, d, cap_m, cap_d)
  local drained = 0
  if cap_m > 0 then drained = m * 60000000 / cap_m end
  if cap_d > 0 then drained = math.max(drained, d * 86400000000 / cap_d) end
  if drained <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('SET', key, fmt(m) .. ' ' .. fmt(d) .. ' ' .. string.format('%.0f', now)
             .. ' ' .. fmt(cap_m) .. ' ' .. fmt(cap_d),
             'PX', math.max(1, math.ceil(drained / 1000)))
end
"""

# The token buckets' one script, in two modes (one script, not two: Redis may
# forget its scripts at any time (a restart, SCRIPT FLUSH), and a call it
# answers NOSCRIPT is sent again after the rest of its pipeline; were the two
# modes two scripts, a reconciliation could then land after a reservation
# queued behind it).
#
# ARGV[1] 'reserve': one reservation, atomically: the request bucket (as
# SCRIPT) and the token buckets. KEYS[1]: request bucket, KEYS[2]: token
# buckets. ARGV[2..]: burst (0: no request limit), µs per request token,
# capacity per minute, per day (0: that window is not limited), cost in each,
# and 1 to charge the tokens even when they do not fit (enforce: false).
# Nothing is written unless both pass. Returns {allowed, remaining,
# retry_after_us, reset_after_us} of the request bucket, then tokens fit 0/1
# and the tokens owed per minute and per day before and after, as strings (a
# Lua number in a reply is cut to an integer).
#
# ARGV[1] 'settle': what an answer really used, once it ended. KEYS[1]: token
# buckets; ARGV[2..]: capacity per minute, per day of the reservation's budget
# (used when the state keeps none: see _TOKENS_LUA), tokens to add to each
# (negative: a refund; 0 for a window the reservation did not charge).
TOKENS_SCRIPT = (
    _NOW_LUA
    + _REQUEST_BUCKET_LUA
    + _TOKENS_LUA
    + """\
if ARGV[1] == 'settle' then
  local m, d, cap_m, cap_d = read_tokens(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), true)
  if cap_m > 0 then m = math.min(math.max(m + tonumber(ARGV[4]), 0), 2 * cap_m) end
  if cap_d > 0 then d = math.min(math.max(d + tonumber(ARGV[5]), 0), 2 * cap_d) end
  write_tokens(KEYS[1], m, d, cap_m, cap_d)
  return 1
end
local burst = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local cap_m, cap_d = tonumber(ARGV[4]), tonumber(ARGV[5])
local cost_m, cost_d = tonumber(ARGV[6]), tonumber(ARGV[7])
local m, d = read_tokens(KEYS[2], cap_m, cap_d, false)
local req = {1, 0, 0, 0}
local debt = nil
if burst > 0 then
  local ceiling = burst * interval
  local owed, cut = read_debt(KEYS[1], ceiling)
  if owed > ceiling - interval then
    if cut then store_debt(KEYS[1], owed) end
    return {0, 0, owed - (ceiling - interval), owed, 0, fmt(m), fmt(d), fmt(m), fmt(d)}
  end
  debt = owed + interval
  req = {1, burst - math.ceil(debt / interval), 0, debt}
end
local fits = (cap_m == 0 or m + cost_m <= cap_m) and (cap_d == 0 or d + cost_d <= cap_d)
local am, ad = m, d
if fits or ARGV[8] == '1' then
  if cap_m > 0 then am = math.min(m + cost_m, 2 * cap_m) end
  if cap_d > 0 then ad = math.min(d + cost_d, 2 * cap_d) end
  write_tokens(KEYS[2], am, ad, cap_m, cap_d)
  if debt then store_debt(KEYS[1], debt) end
end
return {req[1], req[2], req[3], req[4], fits and 1 or 0, fmt(m), fmt(d), fmt(am), fmt(ad)}
"""
)
TOKENS_SHA = hashlib.sha1(TOKENS_SCRIPT.encode()).hexdigest()  # noqa: S324
