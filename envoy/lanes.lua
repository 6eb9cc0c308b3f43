-- whisper-gateway: a batch key's requests, held back while their model is busy with interactive
-- ones (control_plane/decide/lanes.py), else counted in the model's batch lane.

local reply = openai_errors.reply
-- On a batch key's request, with CONTEXT.batch_lanes: the model's batch lane (BATCH_LANE_PREFIX
-- and the model, names.py batch_lane()), whose requests in flight the quota filter after this
-- one counts (control_plane/builders/quotas.py); its 429s are BATCH_LANE_LIMIT's.
local BATCH_LANE_HEADER = NAMES.BATCH_LANE_HEADER
local BATCH_LANE_PREFIX, BATCH_LANE_LIMIT = NAMES.BATCH_LANE_PREFIX, NAMES.BATCH_LANE_LIMIT
local METADATA_NAMESPACE, BATCH_LANE_KEY = NAMES.METADATA_NAMESPACE, NAMES.BATCH_LANE_KEY

-- The lane step: true when the request goes on; nil once it answered 429 (a batch request while
-- its model's batch lane is closed).
local function assign(h, headers, grant, model)
  if not (grant and grant.class == "batch") then return true end
  if CONTEXT.batch_closed[model] then -- control_plane/decide/lanes.py
    return reply(h, 429, "The model `" .. model .. "` is busy with interactive requests; this key's batch requests "
      .. "wait until its backlog drains.", BATCH_LANE_LIMIT, nil, "rate_limit_exceeded", CONTEXT.batch_closed[model])
  end
  if CONTEXT.batch_lanes then
    local lane = BATCH_LANE_PREFIX .. model -- control_plane/names.py batch_lane()
    headers:replace(BATCH_LANE_HEADER, lane)
    h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, BATCH_LANE_KEY, lane)
  end
  return true
end

return {assign = assign}
