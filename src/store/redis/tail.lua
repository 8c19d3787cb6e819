-- Where a new reader starts: the newest entry's id, else the last generated id of an emptied
-- stream, else the tombstone of an expired one, else '0-0' for a stream that does not exist.
--
-- KEYS[1]  the stream
-- KEYS[2]  the stream's tombstone
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then
  return newest[1][1]
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('GET', KEYS[2]) or '0-0'
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then
    return info[i + 1]
  end
end
return '0-0'
