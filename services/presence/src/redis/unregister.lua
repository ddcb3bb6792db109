-- Removes one session; when it was there, the user was seen now.
--
-- KEYS[1]: the user's sessions hash, KEYS[2]: the user's last-seen time
-- ARGV: session id, now ms
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  seen_at(KEYS[2], ARGV[2])
end
return 0
