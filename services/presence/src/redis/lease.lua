-- Shared by the presence scripts: prepended to each when it is loaded.

-- A stored "<expires_at_ms> <json>" value at `now`: whether its lease is
-- live, and when it is, the decoded session (nil if unreadable) and its json.
local function lease(stored, now)
  if not stored then
    return false, nil, nil
  end
  local expires, body = string.match(stored, '^(%d+) (.*)$')
  if not (expires and tonumber(expires) > now) then
    return false, nil, nil
  end
  local ok, decoded = pcall(cjson.decode, body)
  if ok and type(decoded) == 'table' then
    return true, decoded, body
  end
  return true, nil, body
end

-- Keeps the sessions hash at least as long as its newest lease (`ttl` ms).
local function outlive(sessions, ttl)
  if redis.call('PTTL', sessions) < ttl then
    redis.call('PEXPIRE', sessions, ttl)
  end
end

-- Records that the user was seen at `stamp` (ms, as sent) unless a later
-- time is recorded already.
local function seen_at(last_seen, stamp)
  local seen = tonumber(redis.call('GET', last_seen) or '0') or 0
  if seen < tonumber(stamp) then
    redis.call('SET', last_seen, stamp)
  end
end

