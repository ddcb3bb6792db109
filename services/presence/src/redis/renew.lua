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
  local live, decoded, body = lease(stored, now)
  if decoded and decoded.gateway_id == gateway then
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
  outlive(sessions, ttl)
  seen_at(last_seen, ARGV[2])
end
return unknown
