"""The Lua scripts of the Redis store: each multi-key step is one script, so it is atomic on
the server and never half done; each is sent once (EVALSHA after that).

Owns: the scripts' text and what their KEYS and ARGV are. Must never: read a clock but Redis's
own (`TIME`: one clock for every replica), or take a key not named in KEYS.
"""

from __future__ import annotations

# the server's clock, the same for every replica (Redis 7 replicates a script's effects)
_NOW_MS = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)"
# A budget window is a sorted set of "<id>|<cents>" (KEYS[1]) and its running total (KEYS[2]):
# entries leaving the window come off the total as they leave, so a check costs what left since
# the last one, not the window's size (a sum over 5,000 entries held Redis ~3 ms per call). A
# missing total (an older layout, or one lost) is rebuilt once from the window.
_SETTLED = """
local function amount_of(m) return tonumber(string.match(m, '|(.*)$')) end
local function settled(window)
  local cutoff = now - window
  local total = redis.call('GET', KEYS[2])
  if total then
    total = tonumber(total)
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)) do
      total = total - amount_of(m)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
    total = 0
    for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do total = total + amount_of(m) end
  end
  if total < 0 or redis.call('ZCARD', KEYS[1]) == 0 then total = 0 end
  return total
end
local function keep(total, window)
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) return end
  redis.call('SET', KEYS[2], string.format('%.17g', total), 'PX', window)
end"""
SCRIPTS = {
    # KEYS grant, index, routes; ARGV id, b64 route, sealed, state, expires_at, last_used, the
    # expected version ("" for any): the new version, or 0 when the stored one is not the expected
    "write_grant": """
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'version') ~= ARGV[7] then return 0 end
redis.call('HSET', KEYS[1], 'sealed', ARGV[3], 'state', ARGV[4], 'expires_at', ARGV[5], 'last_used', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'version', 1)""",
    "touch_grant": """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
return 1""",
    "delete_grant": """
local gone = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return gone""",
    # KEYS clients, client_tokens; ARGV name, token hash, record: 1 added, 0 name taken, -1 token taken
    "add_client": """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1""",
    "remove_client": """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
local token_hash = cjson.decode(record)['token_hash']
if redis.call('HGET', KEYS[2], token_hash) == ARGV[1] then redis.call('HDEL', KEYS[2], token_hash) end
return redis.call('HDEL', KEYS[1], ARGV[1])""",
    "acquire_lease": """
local holder = redis.call('GET', KEYS[1])
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0""",
    "release_if_own": """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0""",
    # ARGV amount, limit, window ms, member: {1 recorded or 0 refused, cents used before it}
    # KEYS window, total; ARGV amount, limit, window ms, member: {1 recorded or 0 refused, used before}
    "reserve_budget": _NOW_MS
    + _SETTLED
    + """
local window = tonumber(ARGV[3])
local used = settled(window)
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  keep(used, window)
  return {0, string.format('%.17g', used)}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
keep(used + tonumber(ARGV[1]), window)
return {1, string.format('%.17g', used)}""",
    # KEYS window, total; ARGV window ms: the cents used in the window
    "budget_used": _NOW_MS
    + _SETTLED
    + """
local window = tonumber(ARGV[1])
local used = settled(window)
keep(used, window)
return string.format('%.17g', used)""",
    # KEYS window, total; ARGV member: a reservation given back, once
    "refund_budget": """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local total = redis.call('GET', KEYS[2])
if total then
  total = tonumber(total) - tonumber(string.match(ARGV[1], '|(.*)$'))
  if total < 0 or redis.call('ZCARD', KEYS[1]) == 0 then total = 0 end
  redis.call('SET', KEYS[2], string.format('%.17g', total), 'KEEPTTL')
end
return 1""",
    # ARGV limit, window ms, member: 0 admitted, else the ms until the oldest hit leaves the window
    "hit_rate": _NOW_MS
    + """
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] == nil then return window end
  return tonumber(oldest[2]) + window - now
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 0""",
}
