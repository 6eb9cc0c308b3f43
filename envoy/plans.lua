-- whisper-gateway: a key's plan: each upload's cost charged by the quota filters after this one,
-- an upload no share of the plan could pass answered here, and the quota filters' counts shown on
-- the response as OpenAI's x-ratelimit-* headers.

local reply = openai_errors.reply
-- The key's plan and the upload's cost in whole audio-seconds, as dynamic metadata: the quota
-- filters after this one charge them (control_plane/builders/quotas.py), and say on a 429 which
-- limit refused it (LIMITED_HEADER: REQUESTS_LIMIT, AUDIO_SECONDS_LIMIT, ...).
local LIMITED_HEADER = NAMES.LIMITED_HEADER
local METADATA_NAMESPACE = NAMES.METADATA_NAMESPACE
local PLAN_KEY, COST_KEY = NAMES.PLAN_KEY, NAMES.COST_KEY
local REQUESTS_LIMIT, AUDIO_SECONDS_LIMIT = NAMES.REQUESTS_LIMIT, NAMES.AUDIO_SECONDS_LIMIT

-- The charge step (`grant`: false without keys): the key's plan and the upload's cost for the
-- quota filters; true when the request goes on. Each of the CONTEXT.envoys gateways holds
-- 1/envoys of a budget, so an upload that costs more than that share of a whole window could
-- never pass them: it is answered here, saying why (429; nil).
local function charge(h, grant, seconds)
  local plan = grant and grant.plan and CONTEXT.plans[grant.plan]
  if not plan then return true end
  local cost, envoys = math.max(1, math.ceil(seconds)), CONTEXT.envoys or 1
  for _, limit in ipairs({{"audio_seconds_per_minute", "minute"}, {"audio_seconds_per_day", "day"}}) do
    local allowed = plan[limit[1]]
    if allowed and cost * envoys > allowed then
      return reply(h, 429, string.format("This upload is %d audio-seconds; the API key's plan allows %d per %s"
        .. (envoys > 1 and ", %d through each of the %d gateways." or "."), cost, allowed, limit[2],
        math.floor(allowed / envoys), envoys), AUDIO_SECONDS_LIMIT, "file", "rate_limit_exceeded")
    end
  end
  local metadata = h:streamInfo():dynamicMetadata()
  metadata:set(METADATA_NAMESPACE, PLAN_KEY, grant.plan)
  metadata:set(METADATA_NAMESPACE, COST_KEY, cost)
  return true
end

-- The quota filters' `x-ratelimit-limit`, `-remaining` and `-reset`, appended as the response
-- passes back through them (audio-seconds first, then requests: builders/quotas.py), become
-- OpenAI's `x-ratelimit-*-requests` and `x-ratelimit-*-audio-seconds`; a 429 of theirs gets
-- Retry-After: when enough of its window has refilled for this request.
local WINDOW_S, DAY_S = NAMES.MINUTE_S, NAMES.DAY_S

local function seconds_until_full(limit, remaining)
  return math.ceil(math.max(0, limit - remaining) * WINDOW_S / limit)
end

local function retry_after(h, limited, sets)
  local charged = h:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE) or {}
  local plan = CONTEXT.plans[charged[PLAN_KEY] or ""] or {}
  local cost = tonumber(charged[COST_KEY]) or 1
  local envoys = CONTEXT.envoys or 1 -- each charges envoys x the cost against the whole budget
  if limited == REQUESTS_LIMIT and sets.requests then
    return math.ceil(envoys * WINDOW_S / sets.requests.limit)
  elseif limited == AUDIO_SECONDS_LIMIT and sets["audio-seconds"] then
    local audio = sets["audio-seconds"]
    return math.ceil(math.max(1, cost * envoys - audio.remaining) * WINDOW_S / audio.limit)
  elseif plan.audio_seconds_per_day then -- its filter sends no counts: the time to refill this upload
    return math.ceil(cost * envoys * DAY_S / plan.audio_seconds_per_day)
  end
  return WINDOW_S
end

local function rate_limit_headers(h)
  local headers = h:headers()
  local count = headers:getNumValues("x-ratelimit-limit")
  if count == 0 then return end
  local kinds = count >= 2 and {"audio-seconds", "requests"} or {"requests"}
  local sets = {}
  for i, kind in ipairs(kinds) do
    sets[kind] = {limit = tonumber(headers:getAtIndex("x-ratelimit-limit", i - 1)) or 1,
      remaining = tonumber(headers:getAtIndex("x-ratelimit-remaining", i - 1)) or 0}
  end
  for _, field in ipairs({"limit", "remaining", "reset"}) do headers:remove("x-ratelimit-" .. field) end
  for kind, set in pairs(sets) do
    headers:replace("x-ratelimit-limit-" .. kind, tostring(set.limit))
    headers:replace("x-ratelimit-remaining-" .. kind, tostring(set.remaining))
    headers:replace("x-ratelimit-reset-" .. kind, seconds_until_full(set.limit, set.remaining) .. "s")
  end
  local limited = headers:get(LIMITED_HEADER)
  if limited and headers:get(":status") == "429" then
    headers:replace("retry-after", tostring(math.max(1, retry_after(h, limited, sets))))
  end
end

return {charge = charge, rate_limit_headers = rate_limit_headers}
