-- Fences a stream after lost history: the stream's next id is made to come after `above`, an id
-- some node delivered that the stream no longer has (a failover promoted a replica that had not
-- received it, and whose clock may be behind). Redis gives a new entry an id above the stream's
-- last generated one, so setting that to `above` is enough; a stream that is gone altogether is
-- made again, empty, at `above` (and expires as an idle topic would).
--
-- KEYS[1]  the stream
-- ARGV[1]  the id new entries must come after
-- ARGV[2]  retention.idle_ttl in ms (0: none)
--
-- 1 if the stream was fenced, 0 if it was past `above` already.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local above = ARGV[1]
local above_ms, above_seq = parse(above)
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local last = '0-0'
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
  local ms, seq = parse(last)
  if ms > above_ms or (ms == above_ms and seq >= above_seq) then
    return 0
  end
  redis.call('XSETID', KEYS[1], above)
  return 1
end
redis.call('XADD', KEYS[1], above, 'f', '')
redis.call('XDEL', KEYS[1], above)
local idle_ttl = tonumber(ARGV[2])
if idle_ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], idle_ttl)
end
return 1
