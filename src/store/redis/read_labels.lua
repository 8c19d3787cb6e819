-- Reads a page of the events filed under some labels after a cursor, with what the gap rule
-- needs, in one atomic step: read.lua's answer, but only labelled events.
--
-- KEYS[1]    the stream
-- KEYS[2]    the stream's tombstone
-- KEYS[3..]  the label streams (entries with the ids of the stream's events filed under them)
-- ARGV[1]    the cursor
-- ARGV[2]    page size
--
-- The cursor is a position in the stream, decided as read.lua decides it. The events are the
-- stream's entries whose ids the label streams hold after the cursor (after a gap: from the
-- oldest retained entry), merged, at most a page. When the cursor's entry exists: {1, {the
-- cursor's entry, events…}}. Otherwise: {0, events, the five facts, events}.
local stream, cursor, count = KEYS[1], ARGV[1], tonumber(ARGV[2])

-- The stream's entries filed under a label from `start` (an XRANGE start: `(<id>` after an id,
-- `<id>` from one), in order, at most a page.
local function labelled(start)
  local ids, seen = {}, {}
  for k = 3, #KEYS do
    for _, entry in ipairs(redis.call('XRANGE', KEYS[k], start, '+', 'COUNT', count)) do
      local id = entry[1]
      if not seen[id] then
        seen[id] = true
        ids[#ids + 1] = id
      end
    end
  end
  local function key(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms), tonumber(seq)
  end
  table.sort(ids, function(a, b)
    local ams, aseq = key(a)
    local bms, bseq = key(b)
    return ams < bms or (ams == bms and aseq < bseq)
  end)
  local events = {}
  for _, id in ipairs(ids) do
    if #events >= count then
      break
    end
    local entry = redis.call('XRANGE', stream, id, id)
    if #entry > 0 then
      events[#events + 1] = entry[1]
    end
  end
  return events
end

local own = redis.call('XRANGE', stream, cursor, cursor)
if #own > 0 then
  local page = labelled('(' .. cursor)
  table.insert(page, 1, own[1])
  return {1, page}
end
if redis.call('EXISTS', stream) == 0 then
  local last = redis.call('GET', KEYS[2])
  if last then
    return {0, {}, last, last, '1', '0', '', {}}
  end
  return {0, {}, '', '', '', '', '', {}}
end
local info = redis.call('XINFO', 'STREAM', stream)
local facts = {}
for i = 1, #info, 2 do
  facts[info[i]] = info[i + 1]
end
local after = labelled('(' .. (cursor == '0' and '0-0' or cursor))
-- After a gap, from the oldest retained entry: a label may still hold ids trimmed from the
-- stream (it is trimmed when next used), which must not fill the page.
local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
local head = {}
if #oldest > 0 then
  head = labelled(oldest[1][1])
end
return {0, after, facts['last-generated-id'], facts['max-deleted-entry-id'],
  tostring(facts['entries-added']), tostring(facts['length']), facts['recorded-first-entry-id'],
  head}
