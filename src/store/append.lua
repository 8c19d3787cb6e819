-- Appends events to one topic's stream and announces each one on the topic's channel, atomically.
--
-- KEYS[1]    the stream
-- KEYS[1+i]  event i's idempotency key (the stream key again when the event has none)
-- ARGV[1]    the live channel
-- ARGV[2]    MAXLEN (0 = keep everything)
-- ARGV[3]    '~' (approximate trimming) or '='
-- ARGV[4]    idempotency window in milliseconds
-- ARGV[5..]  per event: type ('' = message), data, '1' if it has an idempotency key else '0'
--
-- Each announcement is "<prev id>\n<id>\n<type>\n<data>": prev is the stream's newest entry before
-- this one, so a node can tell whether it saw every entry in between (direct XADDs included).
-- Returns one id per event; a repeated idempotency key returns the first id and appends nothing.
local stream = KEYS[1]
local channel = ARGV[1]
local maxlen = tonumber(ARGV[2])
local window = ARGV[4]

local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local prev = '0-0'
if #newest > 0 then
  prev = newest[1][1]
end

local ids = {}
local count = (#ARGV - 4) / 3
for i = 1, count do
  local base = 4 + (i - 1) * 3
  local etype, data, keyed = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3] == '1'
  local existing = false
  if keyed then
    existing = redis.call('GET', KEYS[1 + i])
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
    if keyed then
      redis.call('SET', KEYS[1 + i], id, 'PX', window)
    end
    redis.call('PUBLISH', channel, prev .. '\n' .. id .. '\n' .. etype .. '\n' .. data)
    prev = id
    ids[i] = id
  end
end
return ids
