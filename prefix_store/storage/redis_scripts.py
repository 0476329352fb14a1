"""Lua scripts of the Redis store: each version bump or delete is one atomic step on the server.

Each script also publishes the change (in the same step, so a writer that dies after it cannot lose
the event) and keeps blob reference counts: a blob no record references gets a time-to-live (the
grace period) instead of being deleted at once; a record that references it again removes the TTL.
A script first looks for the result of its operation id, so a client that retries after losing the
reply (transport errors are retried) gets the first outcome instead of a second version bump.

Keys the scripts touch beyond ``KEYS`` (old blobs) are built from the blob prefix: this requires a
standalone Redis (or one hash slot), which is what the store supports.
"""

from __future__ import annotations

_COMMON = """
local function unreference(refs_key, blob_prefix, sha, grace)
  if redis.call('HINCRBY', refs_key, sha, -1) <= 0 then
    redis.call('HDEL', refs_key, sha)
    if grace > 0 then
      redis.call('EXPIRE', blob_prefix .. sha, grace)
    else
      redis.call('DEL', blob_prefix .. sha)
    end
  end
end
-- condition: '' (none) or the JSON of a Precondition ({"exists": bool}, {"versions": [...]});
-- current: the task's current version, nil when it does not exist
local function precondition_holds(condition, current)
  if condition == '' then return true end
  local wanted = cjson.decode(condition)
  if wanted['exists'] ~= nil and wanted['exists'] ~= (current ~= nil) then return false end
  if wanted['versions'] == nil then return true end
  for _, version in ipairs(wanted['versions']) do
    if version == current then return true end
  end
  return false
end
-- a tenant's usage hash (prefixes, bytes), counted from its records when missing (a store from before it
-- was kept: once per tenant)
local function usage(usage_key, index_key, record_prefix)
  if redis.call('EXISTS', usage_key) == 0 then
    local prefixes, bytes = 0, 0
    for _, task in ipairs(redis.call('ZRANGE', index_key, 0, -1)) do
      local raw = redis.call('GET', record_prefix .. task)
      if raw then
        prefixes = prefixes + 1
        bytes = bytes + cjson.decode(raw)['bytes']
      end
    end
    redis.call('HSET', usage_key, 'prefixes', prefixes, 'bytes', bytes)
  end
  local kept = redis.call('HMGET', usage_key, 'prefixes', 'bytes')
  return tonumber(kept[1]), tonumber(kept[2])
end
-- a limit ('' = none) a write would pass: it grows the figure beyond the limit
local function over(limit, before, after)
  return limit ~= '' and after > tonumber(limit) and after > before
end
local function finish(op_key, result)
  redis.call('SET', op_key, cjson.encode(result), 'EX', 600)
  return result
end
"""

# KEYS: record, tenant index, refs hash, sequence hash, new blob, operation id, tenant usage
# ARGV: precondition ('' = none, else its JSON), tenant, task_id, sha256, num_virtual_tokens, bytes,
#       created_at, source_format, blob key prefix, grace seconds, channel, origin, kind,
#       the tenant's record key prefix, max prefixes ('' = none), max bytes ('' = none)
PUT = (
    _COMMON
    + """
local done = redis.call('GET', KEYS[6])
if done then return cjson.decode(done) end
local old = redis.call('GET', KEYS[1])
local old_record = nil
if old then old_record = cjson.decode(old) end
local current = old_record and old_record['version'] or nil
if not precondition_holds(ARGV[1], current) then return {'MISMATCH', current or ''} end
local prefixes, bytes = usage(KEYS[7], KEYS[2], ARGV[14])
local new_prefixes = prefixes + (old_record and 0 or 1)
local new_bytes = bytes + tonumber(ARGV[6]) - (old_record and old_record['bytes'] or 0)
if over(ARGV[15], prefixes, new_prefixes) then return {'QUOTA', 'prefixes', ARGV[15], prefixes} end
if over(ARGV[16], bytes, new_bytes) then return {'QUOTA', 'bytes', ARGV[16], bytes} end
if redis.call('EXISTS', KEYS[5]) == 0 then return {'NOBLOB'} end
local sequence = redis.call('HINCRBY', KEYS[4], ARGV[2] .. '/' .. ARGV[3], 1)
local version = sequence .. '-' .. string.sub(ARGV[4], 1, 12)
local record = cjson.encode({
  tenant = ARGV[2], task_id = ARGV[3], version = version, sha256 = ARGV[4],
  num_virtual_tokens = tonumber(ARGV[5]), bytes = tonumber(ARGV[6]),
  created_at = tonumber(ARGV[7]), source_format = ARGV[8], kind = ARGV[13]})
redis.call('SET', KEYS[1], record)
redis.call('ZADD', KEYS[2], 0, ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('PERSIST', KEYS[5])
redis.call('HSET', KEYS[7], 'prefixes', new_prefixes, 'bytes', new_bytes)
if old_record then unreference(KEYS[3], ARGV[9], old_record['sha256'], tonumber(ARGV[10])) end
redis.call('PUBLISH', ARGV[11], cjson.encode({
  tenant = ARGV[2], task_id = ARGV[3], version = version, deleted = false, origin = ARGV[12]}))
return finish(KEYS[6], {'OK', record, old_record and 1 or 0})
"""
)

# KEYS: record, tenant index, refs hash, operation id, tenant usage
# ARGV: precondition ('' = none, else its JSON), tenant, task_id, blob key prefix, grace seconds, channel,
#       origin, the tenant's record key prefix
DELETE = (
    _COMMON
    + """
local done = redis.call('GET', KEYS[4])
if done then return cjson.decode(done) end
local old = redis.call('GET', KEYS[1])
local old_record = nil
if old then old_record = cjson.decode(old) end
local current = old_record and old_record['version'] or nil
if not precondition_holds(ARGV[1], current) then return {'MISMATCH', current or ''} end
if not old_record then return {'NOTFOUND'} end
local prefixes, bytes = usage(KEYS[5], KEYS[2], ARGV[8])
redis.call('HSET', KEYS[5], 'prefixes', prefixes - 1, 'bytes', bytes - old_record['bytes'])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
unreference(KEYS[3], ARGV[4], old_record['sha256'], tonumber(ARGV[5]))
redis.call('PUBLISH', ARGV[6], cjson.encode({
  tenant = ARGV[2], task_id = ARGV[3], version = old_record['version'], deleted = true, origin = ARGV[7]}))
return finish(KEYS[4], {'OK', old_record['version']})
"""
)

# KEYS: tenant usage, tenant index; ARGV: the tenant's record key prefix
USAGE = (
    _COMMON
    + """
local prefixes, bytes = usage(KEYS[1], KEYS[2], ARGV[1])
return {prefixes, bytes}
"""
)
