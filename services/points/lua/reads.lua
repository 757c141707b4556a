-- Reads: account, hold, txs (after ledger.lua). They also apply due expiries, which are real changes.

local op = ARGV[1]
local a = load()
local ids = open_holds(a)
commit(a)

if op == 'account' then
  return '{"account":' .. account_json(a, ids) .. '}'
elseif op == 'hold' then -- KEYS[4] the hold, ARGV[6] its id: as stored (null if there is none)
  local h = a.expired and a.expired[ARGV[6]] -- it expired in this call
  return '{"hold":' .. ((h and hold_json(h)) or redis.call('GET', KEYS[4]) or 'null') .. '}'
end
-- txs. ARGV[6] page size, ARGV[7] the seq to list before ('' from the newest): newest first, one
-- more than the page size (so the reader can tell whether there is a next page).
local max = '+inf'
if ARGV[7] ~= '' then max = '(' .. ARGV[7] end
local rows = redis.call('ZREVRANGEBYSCORE', KEYS[3], max, '-inf', 'LIMIT', 0, tonumber(ARGV[6]) + 1)
return '{"txs":[' .. table.concat(rows, ',') .. ']}'
