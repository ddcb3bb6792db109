-- Removes one session; when it was there, the user was seen now. Says,
-- atomically with the removal, whether the user has no live session left
-- (went offline: stamped after every earlier transition), even when this
-- session's lease had expired already (its gateway held the stream until
-- now, and the user's contacts were never told).
--
-- KEYS[1]: the user's sessions hash, KEYS[2]: the user's last-seen time
-- ARGV: session id, now ms
-- Returns {1, stamp} when offline now, {0, last seen} otherwise.
local now = tonumber(ARGV[2])
local removed = redis.call('HDEL', KEYS[1], ARGV[1]) == 1
if not any_live(KEYS[1], now) then
  return {1, stamp(KEYS[2], now)}
end
if removed then
  seen_at(KEYS[2], ARGV[2])
end
return {0, tonumber(redis.call('GET', KEYS[2]) or '0') or 0}
