-- Files an entry in a shared list until a time, drops the entries past theirs, and has the list
-- expire with its last entry.
--
-- KEYS[1]  the list, a sorted set: entry → until when (unix ms)
-- ARGV[1]  the entry
-- ARGV[2]  until when
-- ARGV[3]  now (unix ms)
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #last == 2 then
  redis.call('PEXPIREAT', KEYS[1], last[2])
end
return 1
