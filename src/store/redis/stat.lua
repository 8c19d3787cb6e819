-- What a topic's stream holds now.
--
-- KEYS[1]  the stream
-- KEYS[2]  the stream's tombstone
--
-- {exists (0/1), length, first id or '', last id or '', last generated id or '', removed any (0/1)}
if redis.call('EXISTS', KEYS[1]) == 0 then
  local last = redis.call('GET', KEYS[2])
  if last then
    return {0, 0, '', '', last, 1}
  end
  return {0, 0, '', '', '', 0}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local facts = {}
for i = 1, #info, 2 do
  facts[info[i]] = info[i + 1]
end
local function id_of(entry)
  if entry then
    return entry[1]
  end
  return ''
end
local removed = 0
if facts['entries-added'] > facts['length'] or facts['max-deleted-entry-id'] ~= '0-0' then
  removed = 1
end
return {1, facts['length'], id_of(facts['first-entry']), id_of(facts['last-entry']),
  facts['last-generated-id'], removed}
