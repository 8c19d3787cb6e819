-- Appends events to one topic's stream and announces each one on the topic's channel, atomically.
--
-- KEYS[1]    the stream
-- KEYS[2]    the stream's tombstone: its last id, kept a while after an idle stream expired
-- KEYS[2+i]  event i's idempotency key (the stream key again when the event has none)
-- ARGV[1]    the live channel
-- ARGV[2]    MAXLEN (0 = keep everything)
-- ARGV[3]    '~' (approximate trimming) or '='
-- ARGV[4]    idempotency window in milliseconds
-- ARGV[5]    max age in milliseconds (0 = no limit)
-- ARGV[6]    idle TTL in milliseconds (0 = topics live forever)
-- ARGV[7]    largest payload announced with its event (bytes)
-- ARGV[8]    most payload bytes announced by one call
-- ARGV[9]    'PUBLISH' (one Redis) or 'SPUBLISH' (a cluster: sent only to the shard owning the
--            channel, whose name shares the topic's hash slot)
-- ARGV[10..] per event: type ('' = message), data, '1' if it has an idempotency key else '0'
--
-- Each announcement is "<prev id>\n<id>\n<type>\n<data>": prev is the stream's newest entry before
-- this one, so a node can tell whether it saw every entry in between (direct XADDs included).
-- A large event, or any event once the call has announced its share of bytes, is announced as
-- "<prev id>\n<id>" only, and nodes read it from the stream: every node subscribed to the topic
-- receives every announcement, and Redis drops a subscriber whose pending output passes its
-- pub/sub buffer limit (32 MB by default), which a large batch would otherwise do to them all.
-- Returns one id per event; a repeated idempotency key returns the first id and appends nothing.
--
-- A stream recreated after it expired carries its tombstone on as its max-deleted-entry-id, so
-- the gap rule treats the old history as deleted: a client at the old last id resumes without a
-- notice, an older one is told of the gap.
local stream, tombstone = KEYS[1], KEYS[2]
local channel = ARGV[1]
local maxlen = tonumber(ARGV[2])
local window = ARGV[4]
local max_age = tonumber(ARGV[5])
local idle_ttl = tonumber(ARGV[6])
local inline_max = tonumber(ARGV[7])
local budget = tonumber(ARGV[8])
local publish = ARGV[9]
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return redis.error_reply('ERR unknown publish command')
end

local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local prev = '0-0'
local recreated = false
if #newest > 0 then
  prev = newest[1][1]
elseif idle_ttl > 0 and redis.call('EXISTS', stream) == 0 then
  recreated = redis.call('GET', tombstone)
end

local function ms_of(id)
  return tonumber(string.match(id, '^(%d+)-'))
end

local ids = {}
local last = nil
local count = (#ARGV - 9) / 3
for i = 1, count do
  local base = 9 + (i - 1) * 3
  local etype, data, keyed = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3] == '1'
  local existing = false
  if keyed then
    existing = redis.call('GET', KEYS[2 + i])
  end
  if existing then
    ids[i] = existing
  else
    local args
    if maxlen > 0 then
      args = {'XADD', stream, 'MAXLEN', ARGV[3], maxlen, '*', 'data', data}
    else
      args = {'XADD', stream, '*', 'data', data}
    end
    if etype ~= '' then
      args[#args + 1] = 'event'
      args[#args + 1] = etype
    end
    local id = redis.call(unpack(args))
    if recreated then
      local old = recreated
      recreated = false
      local oms, oseq = string.match(old, '^(%d+)-(%d+)$')
      local nms, nseq = string.match(id, '^(%d+)-(%d+)$')
      if oms and (tonumber(oms) < tonumber(nms) or (oms == nms and tonumber(oseq) < tonumber(nseq))) then
        redis.call('XSETID', stream, id, 'ENTRIESADDED', 1, 'MAXDELETEDID', old)
      end
    end
    if keyed then
      redis.call('SET', KEYS[2 + i], id, 'PX', window)
    end
    if #data <= inline_max and #data <= budget then
      budget = budget - #data
      redis.call(publish, channel, prev .. '\n' .. id .. '\n' .. etype .. '\n' .. data)
    else
      redis.call(publish, channel, prev .. '\n' .. id)
    end
    prev = id
    last = id
    ids[i] = id
  end
end
if last then
  if max_age > 0 then
    redis.call('XTRIM', stream, 'MINID', ARGV[3], string.format('%.0f-0', ms_of(last) - max_age))
  end
  if idle_ttl > 0 then
    redis.call('PEXPIRE', stream, idle_ttl)
    redis.call('SET', tombstone, last, 'PX', idle_ttl * 2)
  end
end
return ids
