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
-- ARGV[8]  retention.idle_ttl in ms (0: none)
--
-- The stream is not left absent: it is made again, empty, with the deleted one's last id as its
-- last and max-deleted id (an entry added past it and deleted at once). Redis then never gives a
-- new event an id at or below one a client may hold (an absent stream starts again from the
-- clock, which can be in the same millisecond), and an old cursor is told of the gap. An empty
-- stream is deleted again as nothing: it holds no events.
--
-- {next SCAN cursor ('0': done), the highest id the topic had or '' (first call only)}
local upto = ''
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    if redis.call('XLEN', KEYS[1]) > 0 then
      local info = redis.call('XINFO', 'STREAM', KEYS[1])
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
          upto = info[i + 1]
        end
      end
    end
  else
    upto = redis.call('GET', KEYS[2]) or ''
  end
  if upto ~= '' then
    -- Before the keys go: a node then learns of the removal before any event of a new stream.
    redis.call(ARGV[6], ARGV[5], '#removed\n' .. upto)
    redis.call('DEL', KEYS[1], KEYS[2])
    local ms, seq = string.match(upto, '^(%d+)-(%d+)$')
    local fence
    if #seq < 15 then
      fence = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
    else
      fence = string.format('%d', tonumber(ms) + 1) .. '-0'
    end
    redis.call('XADD', KEYS[1], fence, 'f', '')
    redis.call('XDEL', KEYS[1], fence)
    -- Nothing of the new stream was removed: a client at the fence resumes without a notice.
    redis.call('XSETID', KEYS[1], fence, 'ENTRIESADDED', 0, 'MAXDELETEDID', fence)
    local idle_ttl = tonumber(ARGV[8])
    if idle_ttl > 0 then
      redis.call('PEXPIRE', KEYS[1], idle_ttl)
      redis.call('SET', KEYS[2], fence, 'PX', idle_ttl * 2)
    end
  end
end
local step = redis.call('SCAN', ARGV[2], 'MATCH', ARGV[3], 'COUNT', tonumber(ARGV[7]))
for _, key in ipairs(step[2]) do
  if key ~= ARGV[4] then
    redis.call('UNLINK', key)
  end
end
return {step[1], upto}
