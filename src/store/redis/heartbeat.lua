-- A presence node's heartbeat: renews the node until Redis's clock reaches now + ttl, and
-- answers whether the node was unknown (it must write its entries again) and which nodes ran
-- out of time (to be reaped). Redis's clock, so the nodes' clocks need not agree.
--
-- KEYS[1]  the nodes (a sorted set: node -> when its time runs out, in ms)
-- ARGV[1]  the node
-- ARGV[2]  its time to live, in ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local expired = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, 32)
return {added, expired}
