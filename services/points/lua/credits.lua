-- Credits and the token balance: credit, set_tokens (after ledger.lua). KEYS[4] idempotency key.

local op = ARGV[1]
local cached = replay()
if cached then return cached end
local t

if op == 'credit' then
  -- KEYS[5] the reference's marker (the transaction that credited it); ARGV[6] qoints, ARGV[7]
  -- reference, ARGV[8] source, ARGV[9] memo, ARGV[10] '1' to check only.
  local ref = ARGV[7]
  local earlier = redis.call('GET', KEYS[5])
  if earlier then
    return fail('DUPLICATE_EXTERNAL_REFERENCE', {external_reference = ref, transaction_id = earlier})
  end
  local a = load()
  local ids = open_holds(a)
  local qoints = tonumber(ARGV[6])
  if a.q + qoints > MAX_BALANCE then
    return fail('BALANCE_LIMIT', {qoints = a.q, max_balance = MAX_BALANCE})
  end
  -- Check only: the credit would go through now; nothing is written. The ledger asks this before it
  -- claims the reference in its own slot, so that a refused credit binds no reference.
  if ARGV[10] == '1' then return '{"checked":true}' end
  t = tx(a, 'QOINTS_CREDITED', 0, 0, qoints, 0, 0, 0, string.format(',"external_reference":%s,"source":%s,"memo":%s',
    cjson.encode(ref), cjson.encode(ARGV[8]), cjson.encode(ARGV[9])))
  redis.call('SET', KEYS[5], ARGV[3] .. '/' .. string.format('%d', a.seq))
  commit(a)
  local stored = ARGV[5] .. '\n{"account":' .. account_json(a, ids) .. ',"tx":' .. t .. '}'
  redis.call('SET', KEYS[4], stored, 'EX', IDEM_TTL)
  return stored
end

-- set_tokens. ARGV[6] token balance.
local a = load()
local ids = open_holds(a)
a.tb = tonumber(ARGV[6])
a.maxp = math.floor((a.tb + TOKEN_OFFSET) / TOKEN_DIVISOR)
t = tx(a, 'TOKEN_BALANCE_SET', 0, 0, 0, 0, 0, 0, '')
commit(a)
local stored = ARGV[5] .. '\n{"account":' .. account_json(a, ids) .. ',"tx":' .. t .. '}'
redis.call('SET', KEYS[4], stored, 'EX', IDEM_TTL)
return stored
