-- The points ledger: every operation on one user's account is one call of one script, so it is
-- atomic (Redis runs a script alone) and costs one round trip (EVALSHA). All preconditions are
-- checked before the first write; a call that fails writes nothing.
--
-- A script is this file (the functions every operation shares) followed by the file of its group
-- of operations: holds.lua (reserve, capture, release), reads.lua (account, hold, txs), credits.lua
-- (credit, set_tokens) or transfers.lua (xfer_*). The fixed parameters are constants: ledger.py
-- writes their values in place of the names PERIOD_MS, REGEN_PERIODS, TOKEN_OFFSET, TOKEN_DIVISOR,
-- MAX_OPEN, IDEM_TTL, RETENTION and MAX_BALANCE once, at start-up (another economy is another
-- script, with its own SHA): nothing is sent or decoded per call to get them.
--
-- KEYS[1] account hash, KEYS[2] open holds zset (hold id -> expire ms), KEYS[3] ledger zset
-- (seq -> transaction JSON), then the keys of the operation (see each op). All of them share the
-- user's hash tag {<user_id>}; the only keys built here, those of holds that expire in this call,
-- carry the same tag, so each call stays in one Redis Cluster slot.
-- ARGV[1] op, ARGV[2] now (ms), ARGV[3] user id, ARGV[4] request id, ARGV[5] request fingerprint,
-- then the operation's own arguments, flat.
--
-- Cost (docs/decisions/0011-ledger-speed.md): a call reads the account's fields and the open holds'
-- ids and expiry times, then only what it changes (the hold it settles, the holds that expire), and
-- writes only what changed (the account fields that differ, one ledger entry, the hold, the open set,
-- the reply). Records are written with string.format templates; the open holds a reply lists are
-- copied into it as stored, never decoded. Lua makes every function of a script anew on each call,
-- at a cost that grows with the local variables of the script that it uses (its upvalues), so the
-- functions here use their arguments and the globals (KEYS, ARGV, redis, cjson, string, ...) and
-- hardly any local of the script; the operations are plain code in if-branches, not functions.
--
-- Numbers: Lua numbers are doubles, exact for integers below 2^53; the service bounds every amount
-- far below that. Records are written with '%d' (exact, unlike cjson, which keeps 14 digits).
-- Records written before 0011 hold decimal strings instead ("p":"10"); both read alike (tonumber
-- here, int() in Python).
--
-- Replies are JSON. A mutation's reply is stored under its idempotency key as "<fingerprint>\n<reply>"
-- (fingerprints are hex digests) and returned just so, new or repeated: the same bytes every time
-- (the reader skips a first line that does not start with '{'). Replies stored before 0011
-- ({"fp": ..., "result": "<reply>"}) replay as they were.

-- A refusal: {"error": reason, "meta": {...}}, every number in meta as a decimal string.
local function fail(reason, meta)
  for k, v in pairs(meta) do
    if type(v) == 'number' then meta[k] = string.format('%d', v) end
  end
  return cjson.encode({error = reason, meta = meta})
end

-- Idempotency ------------------------------------------------------------------------------------

-- The first reply to this request id (KEYS[4]), a REQUEST_ID_REUSED refusal, or nil if it is new.
-- A reply stored since 0011 is returned as stored, with its fingerprint line.
local function replay()
  local prev = redis.call('GET', KEYS[4])
  if not prev then return nil end
  local fp
  if string.byte(prev, 1) == 123 then -- '{': stored before 0011, {"fp": ..., "result": "<reply>"}
    local p = cjson.decode(prev)
    fp, prev = p.fp, p.result
  else
    fp = string.sub(prev, 1, string.find(prev, '\n', 1, true) - 1)
  end
  if fp ~= ARGV[5] then return fail('REQUEST_ID_REUSED', {request_id = ARGV[4]}) end
  return prev
end

-- Account ----------------------------------------------------------------------------------------

-- The account as of now (ARGV[2]), regeneration applied: its fields by name; as stored by position
-- (a[1] .. a[10], nil if absent: commit writes only what differs); and for this call: now, user_j
-- (the user id as a JSON string), pfx (the user's key prefix, 'pts:{<user_id>}'), maxp, and txs
-- (seq, JSON, ... of the ledger entries it makes).
local function load()
  local raw = redis.call('HMGET', KEYS[1], 'tb', 'used', 'hp', 'q', 'hq', 'unpaid', 'exp', 'period', 'seq', 'updated')
  local tb, used, hp, q, hq = tonumber(raw[1]), tonumber(raw[2]), tonumber(raw[3]), tonumber(raw[4]), tonumber(raw[5])
  local unpaid, exp, period, seq, updated = tonumber(raw[6]), tonumber(raw[7]), tonumber(raw[8]), tonumber(raw[9]),
    tonumber(raw[10])
  local now = tonumber(ARGV[2])
  local a = { -- one constructor, so the table is made at its size
    tb, used, hp, q, hq, unpaid, exp, period, seq, updated, -- as stored
    tb = tb or 0, used = used or 0, hp = hp or 0, q = q or 0, hq = hq or 0, unpaid = unpaid or 0, exp = exp or 0,
    period = period, seq = seq or 0, updated = updated or 0, maxp = math.floor(((tb or 0) + TOKEN_OFFSET) / TOKEN_DIVISOR),
    now = now, user_j = cjson.encode(ARGV[3]), pfx = string.sub(KEYS[1], 1, -6), txs = {},
  }
  -- Regeneration: for every period boundary crossed since the account was last evaluated,
  -- points_used falls by ceil(max_points / 18), floored at 0. A clock that goes back changes nothing.
  local current = math.floor(now / PERIOD_MS)
  if not period then
    a.period = current
  elseif current > period then
    if a.used > 0 then a.used = math.max(0, a.used - (current - period) * math.ceil(a.maxp / REGEN_PERIODS)) end
    a.period = current
  end
  return a
end

-- A ledger entry: applies the deltas to the account and returns the entry's JSON. extra: more
-- members, each with its leading comma; rid: the request id to record (default: this request's).
local function tx(a, kind, used, hp, q, hq, exp, unpaid, extra, rid)
  a.used, a.hp, a.q, a.hq = a.used + used, a.hp + hp, a.q + q, a.hq + hq
  a.exp, a.unpaid, a.seq = a.exp + exp, a.unpaid + unpaid, a.seq + 1
  local t = string.format(
    '{"id":%s/%d","seq":%d,"kind":"%s","at":%d,"d_used":%d,"d_hp":%d,"d_q":%d,"d_hq":%d,"d_exp":%d,"d_unpaid":%d,"used":%d,"q":%d,"exp":%d,"unpaid":%d,"tb":%d,"maxp":%d,"request_id":%s%s}',
    string.sub(a.user_j, 1, -2), a.seq, a.seq, kind, a.now, used, hp, q, hq, exp, unpaid, a.used, a.q, a.exp,
    a.unpaid, a.tb, a.maxp, cjson.encode(rid or ARGV[4]), extra)
  local txs = a.txs
  txs[#txs + 1] = a.seq
  txs[#txs + 1] = t
  return t
end

-- Holds ------------------------------------------------------------------------------------------

local function hold_json(h)
  return string.format(
    '{"id":%s,"user":%s,"run":%s,"state":"%s","est":%d,"p":%d,"q":%d,"created":%d,"expires":%d,"settled":%d,"cost":%d,"pc":%d,"qc":%d,"unpaid":%d,"reason":%s,"memo":%s}',
    cjson.encode(h.id), cjson.encode(h.user), cjson.encode(h.run), h.state, h.est, h.p, h.q, h.created, h.expires,
    h.settled, h.cost, h.pc, h.qc, h.unpaid, cjson.encode(h.reason), cjson.encode(h.memo))
end

-- A hold as stored (its numbers as numbers, whichever way they were written), or nil.
local function read_hold(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local h = cjson.decode(raw)
  h.est, h.p, h.q = tonumber(h.est) or 0, tonumber(h.p) or 0, tonumber(h.q) or 0
  h.created, h.expires, h.settled = tonumber(h.created) or 0, tonumber(h.expires) or 0, tonumber(h.settled) or 0
  h.cost, h.pc, h.qc, h.unpaid = tonumber(h.cost) or 0, tonumber(h.pc) or 0, tonumber(h.qc) or 0, tonumber(h.unpaid) or 0
  return h
end

-- The ids of the open holds, by expire time. A hold past its expire time is given back, as a release
-- would, with a HOLD_EXPIRED entry: it goes into a.expired (id -> hold) and its id into a.closed,
-- written at commit with the call's other changes (a refused call writes nothing).
local function open_holds(a)
  local flat = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local ids = {}
  for i = 1, #flat, 2 do
    local id = flat[i]
    if tonumber(flat[i + 1]) > a.now then
      ids[#ids + 1] = id
    else
      local h = read_hold(a.pfx .. ':hold:' .. id)
      if h and h.state == 'OPEN' then
        h.state = 'EXPIRED'
        h.settled = h.expires
        tx(a, 'HOLD_EXPIRED', 0, -h.p, 0, -h.q, 0, 0,
          string.format(',"hold_id":%s,"run_id":%s', cjson.encode(id), cjson.encode(h.run)), '')
        a.expired = a.expired or {}
        a.expired[id] = h
      end
      a.closed = a.closed or {}
      a.closed[#a.closed + 1] = id
    end
  end
  return ids
end

-- Writing ------------------------------------------------------------------------------------------

-- Writes the account fields that differ from what was loaded, the ledger entries, the holds that
-- expired and the ids that left the open set. Nothing when the call made no ledger entry.
local function commit(a)
  if #a.txs == 0 then return end
  a.updated = a.now
  local names = {'tb', 'used', 'hp', 'q', 'hq', 'unpaid', 'exp', 'period', 'seq', 'updated'}
  local fields = {KEYS[1]}
  for i = 1, 10 do
    local v = a[names[i]]
    if v ~= a[i] then
      fields[#fields + 1] = names[i]
      fields[#fields + 1] = string.format('%d', v)
    end
  end
  redis.call('HSET', unpack(fields))
  redis.call('ZADD', KEYS[3], unpack(a.txs))
  if a.expired then
    for id, h in pairs(a.expired) do
      redis.call('SET', a.pfx .. ':hold:' .. id, hold_json(h), 'EX', RETENTION)
    end
  end
  if a.closed then redis.call('ZREM', KEYS[2], unpack(a.closed)) end
  a.txs = {}
end

-- Replies ------------------------------------------------------------------------------------------

-- The account after this call with its open holds: those of ids, as stored, and the JSON of a hold
-- this call opened, if any (the reader sorts them by creation time).
local function account_json(a, ids, opened)
  local listed = opened or ''
  if #ids > 0 then
    local keys = {}
    for i = 1, #ids do keys[i] = a.pfx .. ':hold:' .. ids[i] end
    local found = redis.call('MGET', unpack(keys))
    local holds = {}
    for i = 1, #ids do
      if found[i] then holds[#holds + 1] = found[i] end
    end
    holds[#holds + 1] = opened
    listed = table.concat(holds, ',')
  end
  local next_at, next_points = 0, 0
  if a.used > 0 then
    next_at = (math.floor(a.now / PERIOD_MS) + 1) * PERIOD_MS
    next_points = math.min(a.used, math.ceil(a.maxp / REGEN_PERIODS))
  end
  return string.format(
    '{"user":%s,"tb":%d,"maxp":%d,"used":%d,"hp":%d,"avail_p":%d,"q":%d,"hq":%d,"avail_q":%d,"unpaid":%d,"exp":%d,"next_at":%d,"next_points":%d,"updated":%d,"holds":[%s]}',
    a.user_j, a.tb, a.maxp, a.used, a.hp, math.max(0, a.maxp - a.used - a.hp), a.q, a.hq, a.q - a.hq, a.unpaid,
    a.exp, next_at, next_points, a.updated, listed)
end
