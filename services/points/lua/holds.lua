-- Holds: reserve, capture, release (after ledger.lua). KEYS[4] idempotency key, KEYS[5] the hold;
-- ARGV[6] hold id, then the operation's own arguments.

local op, hold_id = ARGV[1], ARGV[6]
local cached = replay()
if cached then return cached end
local a = load()
local ids = open_holds(a)

if op == 'reserve' then -- ARGV[7] run id, ARGV[8] estimate, ARGV[9] ttl (ms)
  if #ids >= MAX_OPEN then
    return fail('TOO_MANY_OPEN_HOLDS', {open_holds = #ids, max_open_holds = MAX_OPEN})
  end
  local e = tonumber(ARGV[8])
  local avail_p = math.max(0, a.maxp - a.used - a.hp)
  local from_p = math.min(e, avail_p)
  local from_q = math.min(e - from_p, a.q - a.hq)
  if from_p + from_q < e then
    local next_at = 0
    if a.used > 0 then next_at = (math.floor(a.now / PERIOD_MS) + 1) * PERIOD_MS end
    return fail('INSUFFICIENT_POINTS', {
      required = e, points_available = avail_p, qoints_available = a.q - a.hq, next_regeneration_at = next_at})
  end
  local id_j, run_j = cjson.encode(hold_id), cjson.encode(ARGV[7])
  local t = tx(a, 'HOLD_RESERVED', 0, from_p, 0, from_q, 0, 0,
    string.format(',"hold_id":%s,"run_id":%s', id_j, run_j))
  local expires = a.now + tonumber(ARGV[9])
  local h = string.format(
    '{"id":%s,"user":%s,"run":%s,"state":"OPEN","est":%d,"p":%d,"q":%d,"created":%d,"expires":%d,"settled":0,"cost":0,"pc":0,"qc":0,"unpaid":0,"reason":"","memo":""}',
    id_j, a.user_j, run_j, e, from_p, from_q, a.now, expires)
  commit(a)
  redis.call('SET', KEYS[5], h)
  redis.call('ZADD', KEYS[2], string.format('%d', expires), hold_id)
  local stored = ARGV[5] .. '\n{"account":' .. account_json(a, ids, h) .. ',"hold":' .. h .. ',"tx":' .. t .. '}'
  redis.call('SET', KEYS[4], stored, 'EX', IDEM_TTL)
  return stored
end

-- Capture and release: the hold they name (it may have expired in this call).
local h = a.expired and a.expired[hold_id] or read_hold(KEYS[5])
if not h or h.user ~= ARGV[3] then return fail('HOLD_NOT_FOUND', {hold_id = hold_id}) end
if h.state == 'CAPTURED' or (op == 'capture' and h.state == 'RELEASED') then
  return fail('HOLD_ALREADY_SETTLED', {hold_id = h.id, state = h.state})
end

local t = 'null' -- a release of a hold that expired, or of one already released, changes nothing
if op == 'capture' then -- ARGV[7] cost
  -- Charge the actual cost: the free allowance first, then qoints down to zero. What is left is
  -- debt on the allowance when the run was started on the allowance (regeneration pays it off, as
  -- in the legacy bot), else it is recorded as unpaid. Also accepted on an EXPIRED hold.
  local held_p, held_q = 0, 0
  if h.state == 'OPEN' then held_p, held_q = h.p, h.q end
  local cost = tonumber(ARGV[7])
  local room_p = math.max(held_p, a.maxp - a.used - (a.hp - held_p))
  local room_q = a.q - (a.hq - held_q)
  local pc = math.min(cost, room_p)
  local qc = math.min(cost - pc, room_q)
  local rest = cost - pc - qc
  local unpaid = 0
  if rest > 0 then
    if h.p > 0 then pc = pc + rest else unpaid = rest end
  end
  h.state, h.settled = 'CAPTURED', a.now
  h.cost, h.pc, h.qc, h.unpaid = cost, pc, qc, unpaid
  t = tx(a, 'HOLD_CAPTURED', pc, -held_p, -qc, -held_q, cost, unpaid,
    string.format(',"hold_id":%s,"run_id":%s,"cost":%d', cjson.encode(h.id), cjson.encode(h.run), cost))
elseif h.state == 'OPEN' then -- release; ARGV[7] reason, ARGV[8] memo
  h.state, h.settled, h.reason, h.memo = 'RELEASED', a.now, ARGV[7], ARGV[8]
  t = tx(a, 'HOLD_RELEASED', 0, -h.p, 0, -h.q, 0, 0,
    string.format(',"hold_id":%s,"run_id":%s,"reason":%s,"memo":%s', cjson.encode(h.id), cjson.encode(h.run),
      cjson.encode(h.reason), cjson.encode(h.memo)))
end
local json = hold_json(h)
if t ~= 'null' then -- settled now: out of the open set, written with the retention TTL
  for i = 1, #ids do
    if ids[i] == hold_id then
      table.remove(ids, i)
      a.closed = a.closed or {}
      a.closed[#a.closed + 1] = hold_id
      break
    end
  end
  if a.expired then a.expired[hold_id] = nil end -- written here, in its final state
  redis.call('SET', KEYS[5], json, 'EX', RETENTION)
end
commit(a)
local stored = ARGV[5] .. '\n{"account":' .. account_json(a, ids) .. ',"hold":' .. json .. ',"tx":' .. t .. '}'
redis.call('SET', KEYS[4], stored, 'EX', IDEM_TTL)
return stored
