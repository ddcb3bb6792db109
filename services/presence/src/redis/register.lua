-- Registers (or refreshes) one session, atomically with the per-user limit,
-- so two presence instances registering the same user at once cannot both
-- take the last slot.
--
-- KEYS[1]: the user's sessions hash (session id -> "<expires_at_ms> <json>")
-- KEYS[2]: the user's last-seen time
-- ARGV: session id, device id, "<expires_at_ms> <json>", now ms, ttl ms,
--       limit, restore ("1": replace only sessions of the same device that
--       connected earlier), connected_at ms
-- Returns {1, last seen} when registered while the user had a live session,
-- {2, stamp} when registered and the user came online with it (decided
-- here, atomically with the write), {-1, 0} over the limit, {-2, 0}
-- superseded.
local sessions, last_seen = KEYS[1], KEYS[2]
local id, device, value = ARGV[1], ARGV[2], ARGV[3]
local now, ttl, limit, restore = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local connected_at = tonumber(ARGV[8])

local stale, live, was_online = {}, 0, false
local fields = redis.call('HGETALL', sessions)
for i = 1, #fields, 2 do
  local other = fields[i]
  local alive, decoded = lease(fields[i + 1], now)
  was_online = was_online or alive
  if not decoded then
    -- Expired (or unreadable): dropped below, never counted.
    table.insert(stale, other)
  elseif other ~= id then
    if decoded.device_id == device then
      if restore and (tonumber(decoded.connected_at_ms) or 0) >= connected_at then
        return {-2, 0}
      end
      table.insert(stale, other)
    else
      live = live + 1
    end
  end
end
if live >= limit then
  return {-1, 0}
end
for _, other in ipairs(stale) do
  redis.call('HDEL', sessions, other)
end
redis.call('HSET', sessions, id, value)
-- The new lease is the newest: the key lives at least as long.
outlive(sessions, ttl)
if not was_online then
  return {2, stamp(last_seen, now)}
end
seen_at(last_seen, ARGV[4])
return {1, tonumber(redis.call('GET', last_seen))}
