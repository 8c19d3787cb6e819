-- Deletes a topic, one call per SCAN step: the first call tells every node's readers and
-- removes the stream and its tombstone; each call removes one step's worth of the topic's other
-- keys (idempotency keys, labels), leaving its presence entries (live subscriptions) alone.
--
-- KEYS[1]  the stream
-- KEYS[2]  the stream's tombstone
-- ARGV[1]  '1' on the first call
-- ARGV[2]  the SCAN cursor
-- ARGV[3]  the MATCH pattern of the topic's other keys (glob characters escaped)
-- ARGV[4]  the topic's presence key, kept
-- ARGV[5]  the topic's live channel
-- ARGV[6]  PUBLISH, or SPUBLISH in a cluster
-- ARGV[7]  SCAN COUNT
--
-- {next SCAN cursor ('0': done), the highest id the topic had or '' (first call only)}
local upto = ''
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        upto = info[i + 1]
      end
    end
  else
    upto = redis.call('GET', KEYS[2]) or ''
  end
  if upto ~= '' then
    -- Before the keys go: a node then learns of the removal before any event of a new stream.
    redis.call(ARGV[6], ARGV[5], '#removed\n' .. upto)
  end
  redis.call('DEL', KEYS[1], KEYS[2])
end
local step = redis.call('SCAN', ARGV[2], 'MATCH', ARGV[3], 'COUNT', tonumber(ARGV[7]))
for _, key in ipairs(step[2]) do
  if key ~= ARGV[4] then
    redis.call('UNLINK', key)
  end
end
return {step[1], upto}
