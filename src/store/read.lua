-- Reads a page after a cursor, with what the gap rule needs, in one atomic step.
--
-- KEYS[1]  the stream
-- ARGV[1]  the cursor
-- ARGV[2]  page size
--
-- When the cursor's entry exists: {1, entries from the cursor on (inclusive), page size + 1}.
-- Otherwise: {0, entries after the cursor, max-deleted-entry-id, last-generated-id, oldest entries},
-- with both ids '' when the stream does not exist. The caller applies the rule.
local stream, cursor, count = KEYS[1], ARGV[1], tonumber(ARGV[2])
local page = redis.call('XRANGE', stream, cursor, '+', 'COUNT', count + 1)
if #page > 0 and page[1][1] == cursor then
  return {1, page}
end
if redis.call('EXISTS', stream) == 0 then
  return {0, page, '', '', {}}
end
local info = redis.call('XINFO', 'STREAM', stream)
local max_deleted, last_generated = '', ''
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then
    max_deleted = info[i + 1]
  elseif info[i] == 'last-generated-id' then
    last_generated = info[i + 1]
  end
end
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', count)
return {0, page, max_deleted, last_generated, head}
