"""The ledger's Lua scripts: every state transition of a job or an instance is one atomic script.

Why Lua: a worker killed mid-batch, a message delivered twice, or two hosts finishing the last two instances at the
same moment must never double-count or finalize a job twice. Redis runs a script atomically, so each transition
reads and writes the counters in one step, and exactly one caller sees the job reach its end (``check_done``
returns 1 to exactly one of them). Timestamps come from the Redis server's clock (``TIME``), so hosts with skewed
clocks agree on leases.

An instance record is a string ``state|attempts|redeliveries|lease_until|busy_counted_at|size|path`` kept as a field
of its series hash (small hashes stay listpack-encoded in Redis, which is what keeps the cost per instance low).
States: ``p`` pending, ``r`` running (claimed by a fetch until ``lease_until``), ``d`` done (fetched and stored),
``s`` skipped (found on disk, valid, not fetched), ``f`` failed, ``e`` excluded (its header showed an instance the
export's de-identification profile leaves out: no longer expected, listed with the exclusions).
"""

from __future__ import annotations

COMMON = r"""
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return tonumber(x) or 0 end
local function parse(rec)
  local r = {}
  local start = 1
  for i = 1, 6 do
    local j = string.find(rec, '|', start, true)
    if not j then
      r[i] = string.sub(rec, start)
      for k = i + 1, 7 do r[k] = '' end
      return r
    end
    r[i] = string.sub(rec, start, j - 1)
    start = j + 1
  end
  r[7] = string.sub(rec, start)
  return r
end
local function pack(r) return table.concat({r[1], r[2], r[3], r[4], r[5], r[6], r[7]}, '|') end
-- The job's failures by error class (hash ``classes``), kept with every failure record written or removed, so that
-- a status reads one hash instead of every failure: add ``by`` (1 or -1) for the class of the record ``json``.
local function count_class(classes, json, by)
  local ok, rec = pcall(cjson.decode, json)
  local class = 'unknown'
  if ok and type(rec) == 'table' and type(rec.error_class) == 'string' then class = rec.error_class end
  if redis.call('HINCRBY', classes, class, by) <= 0 then redis.call('HDEL', classes, class) end
end
local function active(state) return state == 'expanding' or state == 'running' end
-- Move the done, skipped and bytes counts of the job and the series hash ``sh`` (negative: instances put back).
local function count_stored(job, sh, done, skipped, bytes)
  if done ~= 0 then
    redis.call('HINCRBY', job, 'done', done)
    redis.call('HINCRBY', job, 'bytes', bytes)
    redis.call('HINCRBY', sh, '#d', done)
  end
  if skipped ~= 0 then redis.call('HINCRBY', job, 'skipped', skipped) end
end
-- Finalize the job when everything expected is terminal. Exactly one caller gets 1.
local function check_done(job, now)
  local h = redis.call('HMGET', job, 'state', 'expected', 'done', 'failed', 'producer_done', 'rows', 'expanded',
                       'failed_rows')
  if not active(h[1]) or h[5] ~= '1' then return 0 end
  if num(h[7]) < num(h[6]) then return 0 end
  if h[1] == 'expanding' then redis.call('HSET', job, 'state', 'running') end
  if num(h[3]) + num(h[4]) < num(h[2]) then return 0 end
  local final = 'done'
  if num(h[4]) > 0 or num(h[8]) > 0 then final = 'done-with-failures' end
  redis.call('HSET', job, 'state', final, 'finished_at', tostring(now))
  return 1
end
"""

EXPAND = (
    COMMON
    + r"""
-- KEYS: job, series hash, series set. ARGV: study uid, series uid, instance uids...
-- Records instances as expected (once). Returns {to publish now: pending, or running with a lapsed lease;
-- stored: uid, size, path of each done or skipped one, for the caller to look for on disk}.
local job, sh, sset = KEYS[1], KEYS[2], KEYS[3]
local state = redis.call('HGET', job, 'state')
if state == false or state == 'cancelled' then return {{}, {}} end
local now = clock()
redis.call('HSETNX', sh, '#st', ARGV[1])
redis.call('SADD', sset, ARGV[2])
local added = 0
local out, stored = {}, {}
for i = 3, #ARGV do
  local uid = ARGV[i]
  if redis.call('HSETNX', sh, uid, 'p|0|0|0|0|0|') == 1 then
    added = added + 1
    out[#out + 1] = uid
  else
    local r = parse(redis.call('HGET', sh, uid))
    if r[1] == 'p' or (r[1] == 'r' and num(r[4]) < now) then
      out[#out + 1] = uid
    elseif r[1] == 'd' or r[1] == 's' then
      stored[#stored + 1] = uid; stored[#stored + 1] = r[6]; stored[#stored + 1] = r[7]
    end
  end
end
if added > 0 then
  redis.call('HINCRBY', job, 'expected', added)
  redis.call('HINCRBY', sh, '#e', added)
end
redis.call('HSET', job, 'updated_at', tostring(now))
if not active(state) then return {{}, {}} end
return {out, stored}
"""
)

ROW_DONE = (
    COMMON
    + r"""
-- KEYS: job, expanded set, row failures, failures by class. ARGV: row key, failure json ('' when the expansion
-- succeeded).
local job, expanded, failures, classes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', job) == 0 then return 0 end
redis.call('HSET', job, 'updated_at', tostring(clock()))
if redis.call('SADD', expanded, ARGV[1]) == 1 then
  redis.call('HINCRBY', job, 'expanded', 1)
  if ARGV[2] ~= '' then
    redis.call('HINCRBY', job, 'failed_rows', 1)
    redis.call('HSET', failures, ARGV[1], ARGV[2])
    count_class(classes, ARGV[2], 1)
  end
end
return check_done(job, clock())
"""
)

PRODUCER_DONE = (
    COMMON
    + r"""
-- KEYS: job. Every row is queued; from now on the counters alone can say the job is complete.
redis.call('HSET', KEYS[1], 'producer_done', '1')
return check_done(KEYS[1], clock())
"""
)

CLAIM = (
    COMMON
    + r"""
-- KEYS: job, series hash, failures, failures by class. ARGV: series uid, redelivered (0/1), lease seconds, max
-- redeliveries, uids...
-- Returns {job state, finalized, lease, then per uid: code, attempts, busy_counted_at}. The lease value written into
-- every claimed record is the claim's token: only its holder can renew it (RENEW compares it).
-- Codes: c claimed, t terminal (done/skipped/failed/excluded), h held by a live fetch, x poison (failed now),
-- u unknown.
local job, sh, failures, classes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local state = redis.call('HGET', job, 'state')
if not active(state) then return {state or '', 0, ''} end
local now = clock()
local redelivered = ARGV[2] == '1'
local lease = tostring(now + num(ARGV[3]))
local max_red = num(ARGV[4])
local out = {state, 0, lease}
local poisoned = 0
for i = 5, #ARGV do
  local uid = ARGV[i]
  local rec = redis.call('HGET', sh, uid)
  if rec == false then
    out[#out + 1] = 'u'; out[#out + 1] = 0; out[#out + 1] = 0
  else
    local r = parse(rec)
    local code = 'c'
    if r[1] == 'd' or r[1] == 's' or r[1] == 'f' or r[1] == 'e' then
      code = 't'
    elseif r[1] == 'r' then
      if redelivered or num(r[4]) < now then
        r[3] = tostring(num(r[3]) + 1)
        if num(r[3]) > max_red then code = 'x' end
      else
        code = 'h'
      end
    end
    if code == 'c' then
      r[1] = 'r'; r[4] = lease
      redis.call('HSET', sh, uid, pack(r))
      redis.call('HSETNX', job, 'started_at', tostring(now))
      redis.call('HSET', job, 'updated_at', tostring(now))
    elseif code == 'x' then
      r[1] = 'f'; r[4] = '0'
      redis.call('HSET', sh, uid, pack(r))
      redis.call('HINCRBY', sh, '#f', 1)
      redis.call('HSET', failures, uid, cjson.encode({
        study_uid = redis.call('HGET', sh, '#st'), series_uid = ARGV[1], instance_uid = uid,
        error_class = 'request-rejected', attempts = num(r[2]), at = now,
        message = 'the worker holding this instance was lost ' .. r[3] .. ' times (poison message); not retried',
        error = 'PoisonInstanceError'}))
      poisoned = poisoned + 1
    end
    out[#out + 1] = code; out[#out + 1] = num(r[2]); out[#out + 1] = r[5]
  end
end
if poisoned > 0 then
  redis.call('HINCRBY', job, 'failed', poisoned)
  redis.call('HINCRBY', classes, 'request-rejected', poisoned)
  out[2] = check_done(job, now)
end
return out
"""
)

RENEW = (
    COMMON
    + r"""
-- KEYS: job, series hash. ARGV: the lease token of the claim, lease seconds, uids...
-- The heartbeat of a running fetch: every record still running under this claim's token gets a new lease (the new
-- token); the job's activity clock moves. Returns {new token, how many were renewed}: fewer than asked means another
-- fetch took some over after our lease lapsed, and the caller must stop.
local job, sh = KEYS[1], KEYS[2]
local now = clock()
local token = tostring(now + num(ARGV[2]))
local renewed = 0
for i = 3, #ARGV do
  local rec = redis.call('HGET', sh, ARGV[i])
  if rec ~= false then
    local r = parse(rec)
    if r[1] == 'r' and r[4] == ARGV[1] then
      r[4] = token
      redis.call('HSET', sh, ARGV[i], pack(r))
      renewed = renewed + 1
    end
  end
end
if renewed > 0 then redis.call('HSET', job, 'updated_at', tostring(now)) end
return {token, renewed}
"""
)

SETTLE = (
    COMMON
    + r"""
-- KEYS: job, series hash, failures, exclusions, failures by class. ARGV: series uid, then groups of 7: uid, outcome,
-- attempts, busy_counted_at, size, path, failure (or exclusion) json. Outcomes: d done, s skipped (on disk already),
-- f failed, e excluded (no longer expected), p back to pending. A terminal instance is never changed again here.
local job, sh, failures, exclusions, classes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = clock()
local done, skipped, failed, excluded, bytes = 0, 0, 0, 0, 0
for i = 2, #ARGV, 7 do
  local uid, outcome = ARGV[i], ARGV[i + 1]
  local rec = redis.call('HGET', sh, uid)
  if rec ~= false then
    local r = parse(rec)
    if r[1] == 'p' or r[1] == 'r' then
      r[2] = ARGV[i + 2]; r[5] = ARGV[i + 3]; r[4] = '0'
      if outcome == 'd' or outcome == 's' then
        r[1] = outcome; r[6] = ARGV[i + 4]; r[7] = ARGV[i + 5]
        done = done + 1
        bytes = bytes + num(ARGV[i + 4])
        if outcome == 's' then skipped = skipped + 1 end
      elseif outcome == 'f' then
        r[1] = 'f'
        failed = failed + 1
        redis.call('HSET', failures, uid, ARGV[i + 6])
        count_class(classes, ARGV[i + 6], 1)
      elseif outcome == 'e' then
        r[1] = 'e'
        excluded = excluded + 1
        redis.call('HSET', exclusions, ARGV[1] .. '/' .. uid, ARGV[i + 6])
      else
        r[1] = 'p'
      end
      redis.call('HSET', sh, uid, pack(r))
    end
  end
end
if excluded > 0 then
  redis.call('HINCRBY', job, 'expected', -excluded)
  redis.call('HINCRBY', sh, '#e', -excluded)
end
count_stored(job, sh, done, skipped, bytes)
if failed > 0 then
  redis.call('HINCRBY', job, 'failed', failed)
  redis.call('HINCRBY', sh, '#f', failed)
end
redis.call('HSET', job, 'updated_at', tostring(now))
if done + failed + excluded == 0 then return 0 end
return check_done(job, now)
"""
)

PAUSE = (
    COMMON
    + r"""
-- KEYS: job. ARGV: reason. Returns 1 when the job was active and is now paused.
local state = redis.call('HGET', KEYS[1], 'state')
if not active(state) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'paused', 'paused_from', state, 'pause_reason', ARGV[1],
           'paused_at', tostring(clock()))
return 1
"""
)

RESUME = (
    COMMON
    + r"""
-- KEYS: job. Returns {resumed (0/1), finalized (0/1)}.
local job = KEYS[1]
if redis.call('HGET', job, 'state') ~= 'paused' then return {0, 0} end
local now = clock()
local from = redis.call('HGET', job, 'paused_from')
if from ~= 'expanding' then from = 'running' end
local paused = now - num(redis.call('HGET', job, 'paused_at'))
redis.call('HINCRBYFLOAT', job, 'paused_seconds', paused)
redis.call('HSET', job, 'state', from, 'pause_reason', '')
return {1, check_done(job, now)}
"""
)

CANCEL = (
    COMMON
    + r"""
-- KEYS: job. Returns 1 when the job was active or paused and is now cancelled.
local state = redis.call('HGET', KEYS[1], 'state')
if not (active(state) or state == 'paused') then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', tostring(clock()))
return 1
"""
)

REOPEN = (
    COMMON
    + r"""
-- KEYS: job, expanded set, row failures, failures by class. ARGV: new state, 'expanding' (a re-run) or 'running'
-- (retry-failed).
-- A re-run reopens any job, paused ones included (running the same export again resumes it), and makes every row
-- expand again. Retry-failed reopens an ended job, and holds any job open until the caller's PRODUCER_DONE.
-- Returns the state after the call.
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
if state == false then return '' end
local now = clock()
if state == 'paused' then
  if ARGV[1] ~= 'expanding' then return state end
  redis.call('HINCRBYFLOAT', job, 'paused_seconds', now - num(redis.call('HGET', job, 'paused_at')))
  redis.call('HSET', job, 'pause_reason', '')
end
if ARGV[1] == 'expanding' then
  for _, json in ipairs(redis.call('HVALS', KEYS[3])) do count_class(KEYS[4], json, -1) end
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', job, 'state', 'expanding', 'producer_done', '0', 'expanded', '0', 'failed_rows', '0',
             'finished_at', '', 'reported_at', '')
  return 'expanding'
end
-- retry-failed: the job cannot finalize (producer_done 0) until every failed instance is back in pending and the
-- caller says so (PRODUCER_DONE), whatever the workers settle meanwhile.
redis.call('HSET', job, 'producer_done', '0', 'updated_at', tostring(now))
if state == 'done' or state == 'done-with-failures' or state == 'cancelled' then
  redis.call('HSET', job, 'state', 'running', 'finished_at', '', 'reported_at', '')
  return 'running'
end
return state
"""
)

WAIT_UNTIL = (
    COMMON
    + r"""
-- KEYS: job. ARGV: epoch seconds. Work of the job was deferred until then (a retry delay, a closed window, a held
-- source): the watchdog does not call the job stalled before it.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = num(redis.call('HGET', KEYS[1], 'wait_until'))
if num(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'wait_until', ARGV[1]) end
return 1
"""
)

TOUCH = (
    COMMON
    + r"""
-- KEYS: job. The job is alive (a heartbeat without claims): move its activity clock. Never creates a job.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'updated_at', tostring(clock()))
return 1
"""
)

CHECK = (
    COMMON
    + r"""
-- KEYS: job. Finalize the job if it is complete (after a control operation that changed nothing).
return check_done(KEYS[1], clock())
"""
)

UNFAIL = (
    COMMON
    + r"""
-- KEYS: job, series hash, failures, failures by class. ARGV: instance uids. Failed instances go back to pending
-- with a fresh budget. Returns the uids moved.
local job, sh, failures, classes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local out = {}
for i = 1, #ARGV do
  local rec = redis.call('HGET', sh, ARGV[i])
  if rec ~= false then
    local r = parse(rec)
    if r[1] == 'f' then
      redis.call('HSET', sh, ARGV[i], 'p|0|0|0|0|0|')
      local json = redis.call('HGET', failures, ARGV[i])
      if json ~= false then count_class(classes, json, -1) end
      redis.call('HDEL', failures, ARGV[i])
      out[#out + 1] = ARGV[i]
    end
  end
end
if #out > 0 then
  redis.call('HINCRBY', job, 'failed', -#out)
  redis.call('HINCRBY', sh, '#f', -#out)
end
return out
"""
)

UNSTORE = (
    COMMON
    + r"""
-- KEYS: job, series hash. ARGV: pairs of instance uid and the path it was stored at. A done (or skipped) instance
-- whose file has left the output goes back to pending with a fresh budget, and out of the done, skipped and bytes
-- counts; one stored elsewhere since (another path) is left alone. Only while the job is active. Returns the uids
-- moved.
local job, sh = KEYS[1], KEYS[2]
if not active(redis.call('HGET', job, 'state')) then return {} end
local out = {}
local done, skipped, bytes = 0, 0, 0
for i = 1, #ARGV, 2 do
  local rec = redis.call('HGET', sh, ARGV[i])
  if rec ~= false then
    local r = parse(rec)
    if (r[1] == 'd' or r[1] == 's') and r[7] == ARGV[i + 1] then
      done = done + 1
      bytes = bytes + num(r[6])
      if r[1] == 's' then skipped = skipped + 1 end
      redis.call('HSET', sh, ARGV[i], 'p|0|0|0|0|0|')
      out[#out + 1] = ARGV[i]
    end
  end
end
count_stored(job, sh, -done, -skipped, -bytes)
if done > 0 then redis.call('HSET', job, 'updated_at', tostring(clock())) end
return out
"""
)

UNFAIL_ROW = (
    COMMON
    + r"""
-- KEYS: job, expanded set, row failures, failures by class. ARGV: row key. A row whose expansion failed is
-- expanded again.
local job, expanded, failures, classes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local json = redis.call('HGET', failures, ARGV[1])
if json == false then return 0 end
count_class(classes, json, -1)
redis.call('HDEL', failures, ARGV[1])
if redis.call('SREM', expanded, ARGV[1]) == 1 then redis.call('HINCRBY', job, 'expanded', -1) end
redis.call('HINCRBY', job, 'failed_rows', -1)
return 1
"""
)
