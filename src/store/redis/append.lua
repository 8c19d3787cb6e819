-- Appends the events of several publish requests (a group commit: every topic in one slot) to
-- their topics' streams and announces them on each topic's channel. The gateway sends each
-- topic's requests as one run of events, in arrival order.
--
-- KEYS[2t-1]  topic t's stream (t = 1..T)
-- KEYS[2t]    topic t's tombstone: its last id, kept a while after an idle stream expired
-- KEYS[2T+k]  the events' own keys, in run order: per event its idempotency key (if it has one),
--             then the label streams it is filed under (if any)
-- ARGV[1]     MAXLEN (0 = keep everything)
-- ARGV[2]     '~' (approximate trimming) or '='
-- ARGV[3]     idempotency window in milliseconds
-- ARGV[4]     max age in milliseconds (0 = no limit)
-- ARGV[5]     idle TTL in milliseconds (0 = topics live forever)
-- ARGV[6]     largest payload announced with its event (bytes)
-- ARGV[7]     most payload bytes announced by one call
-- ARGV[8]     'PUBLISH' (one Redis) or 'SPUBLISH' (a cluster: sent only to the shard owning the
--             channel, whose name shares the topic's hash slot)
-- ARGV[9]     'prev' (announcements name each run's previous entry) or 'notified' (they do not:
--             see below)
-- ARGV[10]    T, the number of topics
-- ARGV[10+t]  topic t's live channel
-- then, per run (one per topic, t = 1..T): t; its event count n; its flags: '' when no event
--             has a type, an idempotency key or labels, else per event a digit, 1 if it has a
--             key plus 2 if it has labels; when some event has labels, their numbers, one per
--             labelled event, comma-separated; when n > 1 its events as announced (see below;
--             '' when one is too large to announce); and per event its data, after its type
--             ('' = message) when the flags are not ''
--
-- A label stream holds, for each event filed under the label, an entry with the event's id
-- (and no payload): a reader of a label finds its events without reading the others. It is
-- trimmed to the topic's oldest retained event whenever the label is used again. It has no
-- expiry of its own: the topic's stream may keep its events however long the label is unused,
-- and a label that outlived them holds only ids that no read after a retained cursor reaches.
--
-- Runs are applied one after the other, each on its own: a run's events are consecutive in its
-- stream, in order, and a run that fails (say, its key holds something other than a stream)
-- fails alone. Returns per run one string: "<id>\n<id>…" (one id per event: a reply element per
-- event cost the gateway more to read than the rest of the event; a repeated idempotency key
-- returns the first id and appends nothing) or, when an append failed, "!<message>\n<id>…" with
-- the ids of the events before it (maybe none; the message on one line). A table per run cost
-- Redis more to turn into its reply than a run's PUBLISH.
--
-- A run of one event is announced as "<prev id>\n<id>\n<type>\n<data>": prev is the stream's
-- newest entry before this one, so a node can tell whether it saw every entry in between (direct
-- XADDs included). Looking it up (XREVRANGE, whose reply carries the whole entry) cost more than
-- the rest of a one-event run; with 'notified' it is not looked up and prev is written as "+"
-- (not an id, so a node of an older version reads the stream instead). That is for a Redis that
-- sends an `xadd` keyspace notification for every XADD to the node's subscription connection,
-- where they arrive in order with the announcements: a run's notifications come right before its
-- announcement, so a node that counts exactly as many as the run announces knows nothing else was
-- appended between the entries it got before and these; any other XADD shows up as a notification
-- without an announcement, and the node reads the stream. (The one case a count cannot tell:
-- notifications switched off by hand between someone's direct XADD and a run of one within 5 ms,
-- whose announcement then seems to follow the direct XADD's notification. Runs after it are read.)
-- A large event, or any event once the call has announced its share of bytes, is announced as "<prev id>\n<id>" only, and nodes read it from the stream: every node subscribed
-- to the topic receives every announcement, and Redis drops a subscriber whose pending output
-- passes its pub/sub buffer limit (32 MB by default), which a large batch would otherwise do to
-- them all.
--
-- A run of several events is announced once, after its last event, as
-- "*\n<prev id>\n<count>\n<id>\n…<id>\n<events>": the ids appended, then the events as the
-- gateway wrote them ("<type>\n<bytes>\n<data>" each), or nothing when they are announced by id
-- only (too large, over the call's share, or some of the run was not appended). Built here
-- event by event, the announcement cost Redis what a PUBLISH per event does: every string and
-- table slot made in Lua is an allocation its garbage collector then walks. The leading "*" is
-- not an id, so a node that knows only the one-event form reads the stream instead.
--
-- The newest entry is looked up, and the stream trimmed and its TTL renewed, once per topic per
-- call, not per event: those are most of a lone event's cost. A run of plain events is trimmed by
-- its last XADD (MAXLEN), which costs the call a few arguments instead of a command: every
-- redis.call from Lua costs about what a small command does, whatever the command.
--
-- A stream recreated after it expired carries its tombstone on as its max-deleted-entry-id, so
-- the gap rule treats the old history as deleted: a client at the old last id resumes without a
-- notice, an older one is told of the gap.
local maxlen = tonumber(ARGV[1])
local trim = ARGV[2]
local window = ARGV[3]
local max_age = tonumber(ARGV[4])
local idle_ttl = tonumber(ARGV[5])
local inline_max = tonumber(ARGV[6])
local budget = tonumber(ARGV[7])
local publish = ARGV[8]
local notified = ARGV[9] == 'notified'
local topics = tonumber(ARGV[10])
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return redis.error_reply('ERR unknown publish command')
end

-- Per topic touched: {prev = newest id, recreated = tombstone or false, last = id or nil}.
local state = {}
local function topic_state(t)
  local s = state[t]
  if s then
    return s
  end
  local stream = KEYS[2 * t - 1]
  -- Every field made at once: a table grown field by field is reallocated as it grows.
  s = {prev = '0-0', recreated = false, last = false, labels = false, trimmed = false}
  local found = false
  if notified then
    s.prev = '+'
  else
    local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    found = #newest > 0
    if found then
      s.prev = newest[1][1]
    end
  end
  if not found and idle_ttl > 0 and redis.call('EXISTS', stream) == 0 then
    s.recreated = redis.call('GET', KEYS[2 * t])
  end
  state[t] = s
  return s
end

local function older(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  return ams and (tonumber(ams) < tonumber(bms) or (ams == bms and tonumber(aseq) < tonumber(bseq)))
end

-- Announces one appended event (a run of one; see the header), with its payload while the call's
-- share of announced bytes lasts.
local function announce_one(channel, prev, id, etype, data)
  if #data <= inline_max and #data <= budget then
    budget = budget - #data
    redis.call(publish, channel, prev .. '\n' .. id .. '\n' .. etype .. '\n' .. data)
  else
    redis.call(publish, channel, prev .. '\n' .. id)
  end
end

-- Applies one run, adding its ids to `ids`. `at` is its first event's argument, `keyed` the
-- number of idempotency keys used before it. A run of several events is announced by the
-- caller (even when it fails after appending some): `many` gets the newest id before it and the
-- positions in `ids` of events already there (repeated idempotency keys), which were not appended.
local function apply(t, n, flags, counts, at, keyed, ids, many)
  local s = topic_state(t)
  local stream, channel = KEYS[2 * t - 1], ARGV[10 + t]
  if many then
    many.prev = s.prev
  end
  local plain = flags == ''
  if plain and not s.recreated then
    -- Most runs: events with neither a type, a key nor labels, on a stream not just recreated.
    local count = #ids
    for i = 0, n - 1 do
      local data, id = ARGV[at + i], nil
      if i == n - 1 and maxlen > 0 then
        id = redis.call('XADD', stream, 'MAXLEN', trim, ARGV[1], '*', 'data', data)
        s.trimmed = true
      else
        id = redis.call('XADD', stream, '*', 'data', data)
      end
      if not many then
        announce_one(channel, s.prev, id, '', data)
      end
      s.prev = id
      s.last = id
      count = count + 1
      ids[count] = id
    end
    return
  end
  local labelled = 0
  for i = 0, n - 1 do
    local etype, data
    if plain then
      etype, data = '', ARGV[at + i]
    else
      etype, data = ARGV[at + 2 * i], ARGV[at + 2 * i + 1]
    end
    local key, existing, first_label, labels = nil, false, 0, 0
    local f = plain and 0 or string.byte(flags, i + 1) - 48
    if f % 2 == 1 then
      keyed = keyed + 1
      key = KEYS[2 * topics + keyed]
      existing = redis.call('GET', key)
    end
    if f >= 2 then
      labelled = labelled + 1
      labels = counts[labelled]
      first_label = 2 * topics + keyed + 1
      keyed = keyed + labels
    end
    if existing then
      ids[#ids + 1] = existing
      if many then
        many.repeated = many.repeated or {}
        many.repeated[#ids] = true
      end
    else
      local id
      if etype ~= '' then
        id = redis.call('XADD', stream, '*', 'data', data, 'event', etype)
      else
        id = redis.call('XADD', stream, '*', 'data', data)
      end
      if s.recreated then
        local old = s.recreated
        s.recreated = false
        if older(old, id) then
          redis.call('XSETID', stream, id, 'ENTRIESADDED', 1, 'MAXDELETEDID', old)
        end
      end
      if key then
        redis.call('SET', key, id, 'PX', window)
      end
      for k = first_label, first_label + labels - 1 do
        redis.call('XADD', KEYS[k], id, 'l', '')
        s.labels = s.labels or {}
        s.labels[KEYS[k]] = true
      end
      if not many then
        announce_one(channel, s.prev, id, etype, data)
      end
      s.prev = id
      s.last = id
      ids[#ids + 1] = id
    end
  end
end

-- Announces what a run of n events appended (see the header): `joined` is its ids as
-- replied, `events` the events as the gateway wrote them.
local function announce_many(t, n, n_text, ids, joined, many, events)
  if not many.prev then
    return
  end
  local count = #ids - 1
  if many.repeated then
    local appended = {}
    for i = 2, #ids do
      if not many.repeated[i] then
        appended[#appended + 1] = ids[i]
      end
    end
    count, joined = #appended, table.concat(appended, '\n')
  end
  if count == 0 then
    return
  end
  if count < n or #events == 0 or #events > budget then
    events = ''
  else
    budget = budget - #events
  end
  -- n as sent, when it is the count: a number made a string costs a formatted print.
  local head = '*\n' .. many.prev .. '\n' .. (count == n and n_text or count) .. '\n'
  redis.call(publish, ARGV[10 + t], head .. joined .. '\n' .. events)
end

local replies = {}
local at = 11 + topics
local keyed = 0
while at <= #ARGV do
  local t, n, flags = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), ARGV[at + 2]
  local first = at + 3
  local keys_used, stride, counts = 0, 1, nil
  if flags ~= '' then
    keys_used, stride = #string.gsub(flags, '[02]', ''), 2
    if string.find(flags, '[23]') then
      counts = {}
      for c in string.gmatch(ARGV[first], '%d+') do
        counts[#counts + 1] = tonumber(c)
        keys_used = keys_used + tonumber(c)
      end
      first = first + 1
    end
  end
  local events, many = nil, nil
  if n > 1 then
    events, many = ARGV[first], {prev = false, repeated = false}
    first = first + 1
  end
  local ids = {'ok'}
  local ok, result = pcall(apply, t, n, flags, counts, first, keyed, ids, many)
  local joined = #ids == 2 and ids[2] or table.concat(ids, '\n', 2)
  if many then
    announce_many(t, n, ARGV[at + 1], ids, joined, many, events)
  end
  if ok then
    replies[#replies + 1] = joined
  else
    local message = type(result) == 'table' and result.err or tostring(result)
    replies[#replies + 1] = '!' .. string.gsub(message, '\n', ' ') .. '\n' .. joined
  end
  keyed = keyed + keys_used
  at = first + stride * n
end

for t, s in pairs(state) do
  if s.last then
    local stream = KEYS[2 * t - 1]
    if maxlen > 0 and not s.trimmed then
      redis.call('XTRIM', stream, 'MAXLEN', trim, ARGV[1])
    end
    if max_age > 0 then
      local ms = tonumber(string.match(s.last, '^(%d+)-'))
      redis.call('XTRIM', stream, 'MINID', trim, string.format('%.0f-0', ms - max_age))
    end
    if idle_ttl > 0 then
      redis.call('PEXPIRE', stream, idle_ttl)
      redis.call('SET', KEYS[2 * t], s.last, 'PX', idle_ttl * 2)
    end
    if s.labels then
      local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
      for label in pairs(s.labels) do
        if #oldest > 0 then
          redis.call('XTRIM', label, 'MINID', trim, oldest[1][1])
        end
      end
    end
  end
end
return replies
