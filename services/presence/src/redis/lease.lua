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

-- Stamps a transition of the user (came online, went offline) after every
-- earlier stamp: max(now, last + 1), recorded as the last-seen time and
-- returned, so receivers keeping the newest update end at the true state.
local function stamp(last_seen, now)
  local seen = tonumber(redis.call('GET', last_seen) or '0') or 0
  local at = math.max(tonumber(now), seen + 1)
  redis.call('SET', last_seen, at)
  return at
end

-- Whether any lease in the sessions hash is live at `now`.
local function any_live(sessions, now)
  local values = redis.call('HVALS', sessions)
  for i = 1, #values do
    if lease(values[i], now) then
      return true
    end
  end
  return false
end
