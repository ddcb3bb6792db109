-- Extends the leases of one user's sessions held by one gateway.
--
-- KEYS[1]: the user's sessions hash, KEYS[2]: the user's last-seen time
-- ARGV: gateway id, now ms, new expires_at ms, ttl ms, session ids...
-- Returns the ids that were not renewed: unknown, expired, or registered by
-- another gateway (a gateway never keeps another gateway's sessions alive).
local sessions, last_seen = KEYS[1], KEYS[2]
local gateway, now, expires_at, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])

local unknown, renewed = {}, false
for i = 5, #ARGV do
  local id = ARGV[i]
  local stored = redis.call('HGET', sessions, id)
  local expires, body = nil, nil
  if stored then
    expires, body = string.match(stored, '^(%d+) (.*)$')
  end
  local live = expires and tonumber(expires) > now
  local ok, decoded = false, nil
  if live then
    ok, decoded = pcall(cjson.decode, body)
  end
  if ok and type(decoded) == 'table' and decoded.gateway_id == gateway then
    redis.call('HSET', sessions, id, expires_at .. ' ' .. body)
    renewed = true
  else
    if stored and not live then
      redis.call('HDEL', sessions, id)
    end
    table.insert(unknown, id)
  end
end
if renewed then
  if redis.call('PTTL', sessions) < ttl then
    redis.call('PEXPIRE', sessions, ttl)
  end
  local seen = tonumber(redis.call('GET', last_seen) or '0') or 0
  if seen < now then
    redis.call('SET', last_seen, ARGV[2])
  end
end
return unknown
