-- Reads a page after a cursor, with what the gap rule needs, in one atomic step.
--
-- KEYS[1]  the stream
-- KEYS[2]  the stream's tombstone (its last id, kept a while after it expired)
-- ARGV[1]  the cursor
-- ARGV[2]  page size
--
-- When the cursor's entry exists: {1, entries from the cursor on (inclusive), page size + 1}.
-- Otherwise: {0, entries after the cursor, last-generated-id, max-deleted-entry-id,
-- entries-added, length, recorded-first-entry-id, oldest entries}, the five facts '' when the
-- stream does not exist. An expired stream with a tombstone reads as emptied: its last id is both
-- the last generated and the highest deleted one. The caller applies the rule
-- (ssegate::store::classify).
local stream, cursor, count = KEYS[1], ARGV[1], tonumber(ARGV[2])
local page = redis.call('XRANGE', stream, cursor, '+', 'COUNT', count + 1)
if #page > 0 and page[1][1] == cursor then
  return {1, page}
end
if redis.call('EXISTS', stream) == 0 then
  local last = redis.call('GET', KEYS[2])
  if last then
    return {0, page, last, last, '1', '0', '', {}}
  end
  return {0, page, '', '', '', '', '', {}}
end
local info = redis.call('XINFO', 'STREAM', stream)
local facts = {}
for i = 1, #info, 2 do
  facts[info[i]] = info[i + 1]
end
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', count)
return {0, page, facts['last-generated-id'], facts['max-deleted-entry-id'],
  tostring(facts['entries-added']), tostring(facts['length']), facts['recorded-first-entry-id'], head}
