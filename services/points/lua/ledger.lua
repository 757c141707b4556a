-- The points ledger: every mutation of one user's account is one call of this script, so it is
-- atomic (Redis runs a script alone) and costs one round trip (EVALSHA). All preconditions are
-- checked before the first write; a call that fails writes nothing.
--
-- KEYS[1] account hash, KEYS[2] open-holds zset (hold id -> expire ms), KEYS[3] ledger zset
-- (seq -> transaction JSON), KEYS[4] idempotency key ('' for reads). All share the user's hash tag
-- {<user_id>}; the other keys this script touches (holds, transfer records, reference markers) are
-- built from P.pfx and carry the same tag, so each call stays in one Redis Cluster slot.
-- ARGV[1] JSON parameters (now, economy, user, pfx); ARGV[2] JSON request (op and its fields).
--
-- Numbers: Lua numbers are doubles, exact for integers below 2^53; the service bounds every
-- amount far below that. cjson writes at most 14 significant digits, so every number leaving this
-- script is written as a decimal string (fmt / out); Python reads the numeric fields with int().

local P = cjson.decode(ARGV[1])
local R = cjson.decode(ARGV[2])
local NOW = P.now
local PFX = P.pfx
local K_ACCT, K_OPEN, K_TX, K_IDEM = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function fmt(n) return string.format('%d', n) end

local function out(v)
  if type(v) == 'number' then return fmt(v) end
  if type(v) ~= 'table' then return v end
  local copy = {}
  for k, x in pairs(v) do copy[k] = out(x) end
  return copy
end

local function fail(reason, meta) return cjson.encode({error = reason, meta = out(meta or {})}) end

-- Idempotency ------------------------------------------------------------------------------------

local function replay()
  if K_IDEM == '' then return nil end
  local prev = redis.call('GET', K_IDEM)
  if not prev then return nil end
  local p = cjson.decode(prev)
  if p.fp ~= R.fp then return fail('REQUEST_ID_REUSED', {request_id = R.request_id}) end
  return p.result
end

local function remember(result)
  local encoded = cjson.encode(out(result))
  if K_IDEM ~= '' then
    redis.call('SET', K_IDEM, cjson.encode({fp = R.fp, result = encoded}), 'EX', P.idem_ttl)
  end
  return encoded
end

-- Account ----------------------------------------------------------------------------------------

local FIELDS = {'tb', 'used', 'hp', 'q', 'hq', 'unpaid', 'exp', 'period', 'seq', 'updated'}

local function load()
  local raw = redis.call('HMGET', K_ACCT, unpack(FIELDS))
  local a = {txs = {}, holds = {}, unopen = {}, open_add = {}, dirty = false}
  for i, f in ipairs(FIELDS) do a[f] = tonumber(raw[i]) or 0 end
  if not raw[8] then a.period = nil end
  return a
end

local function maxp(a) return math.floor((a.tb + P.token_offset) / P.token_divisor) end
local function step(a) return math.ceil(maxp(a) / P.regen_periods) end
local function avail_p(a) return math.max(0, maxp(a) - a.used - a.hp) end
local function avail_q(a) return a.q - a.hq end

-- Regeneration: for every period boundary crossed since the account was last evaluated,
-- points_used falls by ceil(max_points / 18), floored at 0. A clock that goes back changes nothing.
local function regen(a)
  local period = math.floor(NOW / P.period_ms)
  if a.period ~= nil and period > a.period and a.used > 0 then
    a.used = math.max(0, a.used - (period - a.period) * step(a))
  end
  if a.period == nil or period > a.period then a.period = period end
end

local function tx(a, kind, d, extra)
  a.used = a.used + (d.used or 0)
  a.hp = a.hp + (d.hp or 0)
  a.q = a.q + (d.q or 0)
  a.hq = a.hq + (d.hq or 0)
  a.exp = a.exp + (d.exp or 0)
  a.unpaid = a.unpaid + (d.unpaid or 0)
  a.seq = a.seq + 1
  a.dirty = true
  local t = {
    id = P.user .. '/' .. fmt(a.seq), seq = a.seq, kind = kind, at = NOW,
    d_used = d.used or 0, d_hp = d.hp or 0, d_q = d.q or 0, d_hq = d.hq or 0,
    d_exp = d.exp or 0, d_unpaid = d.unpaid or 0,
    used = a.used, q = a.q, exp = a.exp, unpaid = a.unpaid, tb = a.tb, maxp = maxp(a),
    request_id = R.request_id or '',
  }
  for k, v in pairs(extra or {}) do t[k] = v end
  table.insert(a.txs, t)
  return t
end

-- Holds ------------------------------------------------------------------------------------------

local HOLD_NUMBERS = {'est', 'p', 'q', 'created', 'expires', 'settled', 'cost', 'pc', 'qc', 'unpaid'}

local function hold_key(id) return PFX .. ':hold:' .. id end

local function get_hold(a, id)
  if a.holds[id] then return a.holds[id] end
  local raw = redis.call('GET', hold_key(id))
  if not raw then return nil end
  local h = cjson.decode(raw)
  for _, f in ipairs(HOLD_NUMBERS) do h[f] = tonumber(h[f]) or 0 end
  return h
end

-- Holds past their expire time give back what they hold, as a release would.
local function expire_due(a)
  local due = redis.call('ZRANGEBYSCORE', K_OPEN, '-inf', fmt(NOW))
  for _, id in ipairs(due) do
    local h = get_hold(a, id)
    if h and h.state == 'OPEN' then
      h.state = 'EXPIRED'
      h.settled = h.expires
      tx(a, 'HOLD_EXPIRED', {hp = -h.p, hq = -h.q}, {hold_id = id, run_id = h.run, request_id = ''})
      a.holds[id] = h
    end
    a.unopen[id] = true
  end
end

local function open_ids(a)
  local ids = {}
  local stored = redis.call('ZRANGE', K_OPEN, 0, -1)
  for _, id in ipairs(stored) do
    if not a.unopen[id] then table.insert(ids, id) end
  end
  for id in pairs(a.open_add) do table.insert(ids, id) end
  return ids
end

-- Reading and writing ----------------------------------------------------------------------------

local function normalize()
  local a = load()
  regen(a)
  expire_due(a)
  return a
end

local function commit(a)
  if not a.dirty then return end
  a.updated = NOW
  redis.call('HSET', K_ACCT,
    'tb', fmt(a.tb), 'used', fmt(a.used), 'hp', fmt(a.hp), 'q', fmt(a.q), 'hq', fmt(a.hq),
    'unpaid', fmt(a.unpaid), 'exp', fmt(a.exp), 'period', fmt(a.period), 'seq', fmt(a.seq),
    'updated', fmt(a.updated))
  for _, t in ipairs(a.txs) do redis.call('ZADD', K_TX, fmt(t.seq), cjson.encode(out(t))) end
  for id, h in pairs(a.holds) do
    if h.state == 'OPEN' then
      redis.call('SET', hold_key(id), cjson.encode(out(h)))
    else
      redis.call('SET', hold_key(id), cjson.encode(out(h)), 'EX', P.retention)
    end
  end
  for id in pairs(a.unopen) do redis.call('ZREM', K_OPEN, id) end
  for id, expires in pairs(a.open_add) do redis.call('ZADD', K_OPEN, fmt(expires), id) end
  -- Written: from now on the stored open set is the truth.
  a.unopen, a.open_add, a.dirty = {}, {}, false
end

local function account(a)
  local holds = {}
  for _, id in ipairs(open_ids(a)) do
    local h = get_hold(a, id)
    if h then table.insert(holds, h) end
  end
  table.sort(holds, function(x, y) return x.created < y.created end)
  local next_at, next_points = 0, 0
  if a.used > 0 then
    next_at = (math.floor(NOW / P.period_ms) + 1) * P.period_ms
    next_points = math.min(a.used, step(a))
  end
  return {
    user = P.user, tb = a.tb, maxp = maxp(a), used = a.used, hp = a.hp, avail_p = avail_p(a),
    q = a.q, hq = a.hq, avail_q = avail_q(a), unpaid = a.unpaid, exp = a.exp,
    next_at = next_at, next_points = next_points, updated = a.updated, now = NOW, holds = holds,
  }
end

-- Operations -------------------------------------------------------------------------------------

local ops = {}

-- Reads (GetAccount, GetHold, ListTransactions) also apply due expiries, which are real changes.
function ops.read()
  local a = normalize()
  commit(a)
  local result = {account = account(a)}
  if R.hold_id then
    result.hold = get_hold(a, R.hold_id) or cjson.null
  end
  if R.page_size then
    local max = R.before and ('(' .. fmt(R.before)) or '+inf'
    local rows = redis.call('ZREVRANGEBYSCORE', K_TX, max, '-inf', 'LIMIT', 0, R.page_size + 1)
    result.txs = rows
  end
  return cjson.encode(out(result))
end

function ops.reserve()
  local cached = replay()
  if cached then return cached end
  local a = normalize()
  local open = #open_ids(a)
  if open >= P.max_open then
    return fail('TOO_MANY_OPEN_HOLDS', {open_holds = open, max_open_holds = P.max_open})
  end
  local e = R.estimate
  local from_p = math.min(e, avail_p(a))
  local from_q = math.min(e - from_p, avail_q(a))
  if from_p + from_q < e then
    local acct = account(a)
    return fail('INSUFFICIENT_POINTS', {
      required = e, points_available = acct.avail_p, qoints_available = acct.avail_q,
      next_regeneration_at = acct.next_at})
  end
  local h = {
    id = R.hold_id, user = P.user, run = R.run_id, state = 'OPEN', est = e, p = from_p, q = from_q,
    created = NOW, expires = NOW + R.ttl_ms, settled = 0, cost = 0, pc = 0, qc = 0, unpaid = 0,
    reason = '', memo = '',
  }
  local t = tx(a, 'HOLD_RESERVED', {hp = from_p, hq = from_q}, {hold_id = h.id, run_id = h.run})
  a.holds[h.id] = h
  a.open_add[h.id] = h.expires
  commit(a)
  return remember({account = account(a), hold = h, tx = t})
end

local function settled_hold(a)
  local h = get_hold(a, R.hold_id)
  if not h or h.user ~= P.user then return nil, fail('HOLD_NOT_FOUND', {hold_id = R.hold_id}) end
  return h, nil
end

-- Charge the actual cost: the free allowance first, then qoints down to zero. What is left is
-- debt on the allowance when the run was started on the allowance (regeneration pays it off, as
-- in the legacy bot), else it is recorded as unpaid. Also accepted on an EXPIRED hold.
function ops.capture()
  local cached = replay()
  if cached then return cached end
  local a = normalize()
  local h, err = settled_hold(a)
  if err then return err end
  if h.state == 'CAPTURED' or h.state == 'RELEASED' then
    return fail('HOLD_ALREADY_SETTLED', {hold_id = h.id, state = h.state})
  end
  local held_p, held_q = 0, 0
  if h.state == 'OPEN' then held_p, held_q = h.p, h.q end
  local cost = R.cost
  local room_p = math.max(held_p, maxp(a) - a.used - (a.hp - held_p))
  local room_q = a.q - (a.hq - held_q)
  local pc = math.min(cost, room_p)
  local qc = math.min(cost - pc, room_q)
  local rest = cost - pc - qc
  local unpaid = 0
  if rest > 0 then
    if h.p > 0 then pc = pc + rest else unpaid = rest end
  end
  h.state = 'CAPTURED'
  h.settled = NOW
  h.cost, h.pc, h.qc, h.unpaid = cost, pc, qc, unpaid
  local t = tx(a, 'HOLD_CAPTURED',
    {used = pc, hp = -held_p, q = -qc, hq = -held_q, exp = cost, unpaid = unpaid},
    {hold_id = h.id, run_id = h.run, cost = cost})
  a.holds[h.id] = h
  a.unopen[h.id] = true
  commit(a)
  return remember({account = account(a), hold = h, tx = t})
end

function ops.release()
  local cached = replay()
  if cached then return cached end
  local a = normalize()
  local h, err = settled_hold(a)
  if err then return err end
  if h.state == 'CAPTURED' then
    return fail('HOLD_ALREADY_SETTLED', {hold_id = h.id, state = h.state})
  end
  local t = cjson.null
  if h.state == 'OPEN' then
    h.state = 'RELEASED'
    h.settled = NOW
    h.reason = R.reason
    h.memo = R.memo
    t = tx(a, 'HOLD_RELEASED', {hp = -h.p, hq = -h.q},
      {hold_id = h.id, run_id = h.run, reason = R.reason, memo = R.memo})
    a.holds[h.id] = h
    a.unopen[h.id] = true
  end
  commit(a)
  return remember({account = account(a), hold = h, tx = t})
end

function ops.credit()
  local cached = replay()
  if cached then return cached end
  local marker = PFX .. ':extref:' .. R.ref
  local earlier = redis.call('GET', marker)
  if earlier then
    return fail('DUPLICATE_EXTERNAL_REFERENCE', {external_reference = R.ref, transaction_id = earlier})
  end
  local a = normalize()
  if a.q + R.qoints > P.max_balance then
    return fail('BALANCE_LIMIT', {qoints = a.q, max_balance = P.max_balance})
  end
  -- check_only: the credit would go through now; nothing is written. The ledger asks this before it
  -- claims the reference in its own slot, so that a refused credit binds no reference.
  if R.check_only then return cjson.encode({checked = true}) end
  local t = tx(a, 'QOINTS_CREDITED', {q = R.qoints},
    {external_reference = R.ref, source = R.source, memo = R.memo})
  redis.call('SET', marker, t.id)
  commit(a)
  return remember({account = account(a), tx = t})
end

function ops.set_tokens()
  local cached = replay()
  if cached then return cached end
  local a = normalize()
  a.tb = R.token_balance
  local t = tx(a, 'TOKEN_BALANCE_SET', {}, {})
  commit(a)
  return remember({account = account(a), tx = t})
end

-- Transfers touch two users, so two slots: (1) xfer_out on the sender debits and records a
-- PENDING transfer; (2) xfer_in on the receiver credits, at most once per transfer id;
-- (3) xfer_done on the sender marks it DONE and remembers the response. A crash between the steps
-- leaves a PENDING record that a retry of the request or the recovery sweep carries forward.

function ops.xfer_out()
  if K_IDEM ~= '' then
    local prev = redis.call('GET', K_IDEM)
    if prev then
      local p = cjson.decode(prev)
      if p.fp ~= R.fp then return fail('REQUEST_ID_REUSED', {request_id = R.request_id}) end
      return cjson.encode({done = p.result})
    end
  end
  local rec_key = PFX .. ':xfer:' .. R.xfer_id
  local raw = redis.call('GET', rec_key)
  if raw then
    local rec = cjson.decode(raw)
    if rec.fp ~= R.fp then return fail('REQUEST_ID_REUSED', {request_id = R.request_id}) end
    if rec.state == 'REVERTED' then
      return fail('BALANCE_LIMIT', {user_id = rec.to, max_balance = P.max_balance})
    end
    local a = normalize()
    commit(a)
    rec.account = out(account(a))
    return cjson.encode({record = rec})
  end
  local a = normalize()
  if avail_q(a) < R.qoints then
    return fail('INSUFFICIENT_QOINTS', {required = R.qoints, qoints_available = avail_q(a)})
  end
  local t = tx(a, 'QOINTS_TRANSFERRED_OUT', {q = -R.qoints},
    {counterparty = R.to, transfer_id = R.xfer_id, memo = R.memo})
  local rec = out({
    fp = R.fp, request_id = R.request_id, xfer_id = R.xfer_id, from = P.user, to = R.to,
    qoints = R.qoints, memo = R.memo, state = 'PENDING', created = NOW, out_tx = t,
  })
  redis.call('SET', rec_key, cjson.encode(rec))
  commit(a)
  rec.account = out(account(a))
  return cjson.encode({record = rec})
end

function ops.xfer_in()
  local marker = PFX .. ':xfer_in:' .. R.xfer_id
  local a = normalize()
  local raw = redis.call('GET', marker)
  if raw then
    commit(a)
    return cjson.encode({tx = cjson.decode(raw), account = out(account(a))})
  end
  if a.q + R.qoints > P.max_balance then
    return fail('BALANCE_LIMIT', {user_id = P.user, qoints = a.q, max_balance = P.max_balance})
  end
  local t = tx(a, 'QOINTS_TRANSFERRED_IN', {q = R.qoints},
    {counterparty = R.from, transfer_id = R.xfer_id, memo = R.memo})
  redis.call('SET', marker, cjson.encode(out(t)))
  commit(a)
  return cjson.encode({tx = out(t), account = out(account(a))})
end

function ops.xfer_done()
  local rec_key = PFX .. ':xfer:' .. R.xfer_id
  local raw = redis.call('GET', rec_key)
  if raw then
    local rec = cjson.decode(raw)
    rec.state = 'DONE'
    redis.call('SET', rec_key, cjson.encode(rec), 'EX', P.retention)
  end
  local stored = redis.call('GET', K_IDEM)
  if stored then return cjson.decode(stored).result end
  redis.call('SET', K_IDEM, cjson.encode({fp = R.fp, result = R.result}), 'EX', P.idem_ttl)
  return R.result
end

-- The receiver refused the credit (its balance limit): give the sender the qoints back, once.
function ops.xfer_revert()
  local rec_key = PFX .. ':xfer:' .. R.xfer_id
  local raw = redis.call('GET', rec_key)
  if not raw then return cjson.encode({}) end
  local rec = cjson.decode(raw)
  if rec.state ~= 'PENDING' then return cjson.encode({record = rec}) end
  local a = normalize()
  local t = tx(a, 'QOINTS_TRANSFER_REVERTED', {q = tonumber(rec.qoints)},
    {counterparty = rec.to, transfer_id = R.xfer_id, memo = rec.memo, request_id = rec.request_id})
  rec.state = 'REVERTED'
  rec.revert_tx = out(t)
  redis.call('SET', rec_key, cjson.encode(rec), 'EX', P.retention)
  commit(a)
  return cjson.encode({record = rec})
end

function ops.xfer_record()
  local raw = redis.call('GET', PFX .. ':xfer:' .. R.xfer_id)
  if not raw then return cjson.encode({}) end
  return cjson.encode({record = cjson.decode(raw)})
end

local op = ops[R.op]
if not op then return fail('UNKNOWN_OP', {op = R.op}) end
return op()
