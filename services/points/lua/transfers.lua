-- Transfers (after ledger.lua). They touch two users, so two slots: (1) xfer_out on the sender
-- debits and records a PENDING transfer; (2) xfer_in on the receiver credits, at most once per
-- transfer id; (3) xfer_done on the sender marks it DONE and remembers the response. A crash between
-- the steps leaves a PENDING record that a retry of the request or the recovery sweep carries forward.
-- ARGV[6] is the transfer id.

local op, xfer_id = ARGV[1], ARGV[6]

local function xfer_extra(counterparty, memo)
  return string.format(',"counterparty":%s,"transfer_id":%s,"memo":%s', cjson.encode(counterparty),
    cjson.encode(ARGV[6]), cjson.encode(memo))
end

-- The fingerprint and the reply stored under an idempotency key (either format), or nil.
local function stored(key)
  local prev = redis.call('GET', key)
  if not prev then return nil end
  if string.byte(prev, 1) == 123 then -- '{': stored before 0011
    local p = cjson.decode(prev)
    return p.fp, p.result
  end
  local cut = string.find(prev, '\n', 1, true)
  return string.sub(prev, 1, cut - 1), string.sub(prev, cut + 1)
end

-- A decoded transfer record, encoded again with every number as a decimal string (cjson would keep
-- only 14 digits).
local function encode_record(rec)
  local function out(v)
    if type(v) == 'number' then return string.format('%d', v) end
    if type(v) ~= 'table' then return v end
    local copy = {}
    for k, x in pairs(v) do copy[k] = out(x) end
    return copy
  end
  return cjson.encode(out(rec))
end

if op == 'xfer_out' then
  -- KEYS[4] idempotency key, KEYS[5] transfer record; ARGV[7] receiver, ARGV[8] qoints, ARGV[9] memo.
  local fp, reply = stored(KEYS[4])
  if fp then
    if fp ~= ARGV[5] then return fail('REQUEST_ID_REUSED', {request_id = ARGV[4]}) end
    return cjson.encode({done = reply})
  end
  local raw = redis.call('GET', KEYS[5])
  if raw then
    local rec = cjson.decode(raw)
    if rec.fp ~= ARGV[5] then return fail('REQUEST_ID_REUSED', {request_id = ARGV[4]}) end
    if rec.state == 'REVERTED' then
      return fail('BALANCE_LIMIT', {user_id = rec.to, max_balance = MAX_BALANCE})
    end
    local a = load()
    local ids = open_holds(a)
    commit(a)
    return '{"record":' .. string.sub(raw, 1, -2) .. ',"account":' .. account_json(a, ids) .. '}}'
  end
  local a = load()
  local ids = open_holds(a)
  local qoints = tonumber(ARGV[8])
  if a.q - a.hq < qoints then
    return fail('INSUFFICIENT_QOINTS', {required = qoints, qoints_available = a.q - a.hq})
  end
  local t = tx(a, 'QOINTS_TRANSFERRED_OUT', 0, 0, -qoints, 0, 0, 0, xfer_extra(ARGV[7], ARGV[9]))
  local rec = string.format(
    '{"fp":%s,"request_id":%s,"xfer_id":%s,"from":%s,"to":%s,"qoints":%d,"memo":%s,"state":"PENDING","created":%d,"out_tx":%s}',
    cjson.encode(ARGV[5]), cjson.encode(ARGV[4]), cjson.encode(xfer_id), a.user_j, cjson.encode(ARGV[7]), qoints,
    cjson.encode(ARGV[9]), a.now, t)
  redis.call('SET', KEYS[5], rec)
  commit(a)
  return '{"record":' .. string.sub(rec, 1, -2) .. ',"account":' .. account_json(a, ids) .. '}}'

elseif op == 'xfer_in' then
  -- KEYS[4] the receiver's marker of this transfer (its ledger entry); ARGV[4] the transfer's
  -- request id, ARGV[7] sender, ARGV[8] qoints, ARGV[9] memo.
  local a = load()
  local ids = open_holds(a)
  local raw = redis.call('GET', KEYS[4])
  if raw then
    commit(a)
    return '{"tx":' .. raw .. ',"account":' .. account_json(a, ids) .. '}'
  end
  local qoints = tonumber(ARGV[8])
  if a.q + qoints > MAX_BALANCE then
    return fail('BALANCE_LIMIT', {user_id = ARGV[3], qoints = a.q, max_balance = MAX_BALANCE})
  end
  local t = tx(a, 'QOINTS_TRANSFERRED_IN', 0, 0, qoints, 0, 0, 0, xfer_extra(ARGV[7], ARGV[9]))
  redis.call('SET', KEYS[4], t)
  commit(a)
  return '{"tx":' .. t .. ',"account":' .. account_json(a, ids) .. '}'

elseif op == 'xfer_done' then
  -- KEYS[4] idempotency key, KEYS[5] transfer record; ARGV[7] the reply.
  local raw = redis.call('GET', KEYS[5])
  if raw then
    local rec = cjson.decode(raw)
    rec.state = 'DONE'
    redis.call('SET', KEYS[5], encode_record(rec), 'EX', RETENTION)
  end
  local _, reply = stored(KEYS[4])
  if reply then return reply end
  local reply_stored = ARGV[5] .. '\n' .. ARGV[7]
  redis.call('SET', KEYS[4], reply_stored, 'EX', IDEM_TTL)
  return reply_stored

elseif op == 'xfer_revert' then
  -- The receiver refused the credit (its balance limit): give the sender the qoints back, once.
  -- KEYS[4] transfer record.
  local raw = redis.call('GET', KEYS[4])
  if not raw then return '{}' end
  local rec = cjson.decode(raw)
  if rec.state == 'PENDING' then
    local a = load()
    open_holds(a) -- due expiries, written with the revert
    local t = tx(a, 'QOINTS_TRANSFER_REVERTED', 0, 0, tonumber(rec.qoints), 0, 0, 0, xfer_extra(rec.to, rec.memo),
      rec.request_id)
    rec.state = 'REVERTED'
    rec.revert_tx = cjson.decode(t)
    redis.call('SET', KEYS[4], encode_record(rec), 'EX', RETENTION)
    commit(a)
  end
  return '{"record":' .. encode_record(rec) .. '}'
end

-- xfer_record. KEYS[4] transfer record.
local raw = redis.call('GET', KEYS[4])
if not raw then return '{}' end
return '{"record":' .. raw .. '}'
