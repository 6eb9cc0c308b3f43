-- whisper-gateway: a key's plan: what each request costs the quota filters after this one, a key
-- the control plane has refused (its day spent, or its minute overspent across the Envoys) or an
-- upload no budget could pass answered here, and the quota filters' counts shown on the
-- response as OpenAI's x-ratelimit-* headers, in units of the key's whole budget.

local reply = openai_errors.reply
-- The key's plan and the request's costs, as dynamic metadata: the quota filters after this one
-- charge them (control_plane/builders/quotas.py), and say on a 429 which limit refused it
-- (LIMITED_HEADER: REQUESTS_LIMIT, AUDIO_SECONDS_LIMIT).
local LIMITED_HEADER = NAMES.LIMITED_HEADER
local METADATA_NAMESPACE = NAMES.METADATA_NAMESPACE
local PLAN_KEY, COST_KEY, REQUEST_COST_KEY = NAMES.PLAN_KEY, NAMES.COST_KEY, NAMES.REQUEST_COST_KEY
local REQUESTS_LIMIT, AUDIO_SECONDS_LIMIT = NAMES.REQUESTS_LIMIT, NAMES.AUDIO_SECONDS_LIMIT
local AUDIO_SECONDS_PER_DAY_LIMIT = NAMES.AUDIO_SECONDS_PER_DAY_LIMIT
-- Each bucket holds the whole budget in SCALE tokens per unit; a request costs its units times
-- the key's charge on this Envoy (SCALE: once), which the control plane sets from where the
-- key's traffic arrives (control_plane/decide/budgets.py); until it has, the Envoys' count.
local SCALE = NAMES.BUDGET_SCALE

-- The charge step (`grant`: false without keys): the key's plan and the request's costs for the
-- quota filters; true when the request goes on. A cost is capped at the whole bucket, so an
-- upload up to a whole minute's budget can pass any Envoy; one longer than the plan allows in a
-- minute or a day could never pass: it is answered here, saying why (429; nil).
local function charge(h, grant, seconds)
  local plan = grant and grant.plan and CONTEXT.plans[grant.plan]
  if not plan then return true end
  local cost = math.max(1, math.ceil(seconds))
  if grant.refused then
    local wait = grant.refused_until - os.time()
    if wait > 0 then
      return reply(h, 429, grant.refused == AUDIO_SECONDS_PER_DAY_LIMIT
        and string.format("The API key's plan allows %d audio-seconds a day (UTC), and today's are spent.",
          plan.audio_seconds_per_day)
        or "The API key has spent its plan's budget through every gateway; try again later.",
        grant.refused, nil, "rate_limit_exceeded", wait)
    end
  end
  for _, limit in ipairs({{"audio_seconds_per_minute", "minute", AUDIO_SECONDS_LIMIT}, -- the plan's field for a
      {AUDIO_SECONDS_PER_DAY_LIMIT, "day", AUDIO_SECONDS_PER_DAY_LIMIT}}) do -- day is named as its limit
    local allowed = plan[limit[1]]
    if allowed and cost > allowed then
      return reply(h, 429, string.format("This upload is %d audio-seconds; the API key's plan allows %d per %s.",
        cost, allowed, limit[2]), limit[3], "file", "rate_limit_exceeded")
    end
  end
  local spread = (CONTEXT.envoys or 1) * SCALE
  local metadata = h:streamInfo():dynamicMetadata()
  metadata:set(METADATA_NAMESPACE, PLAN_KEY, grant.plan)
  metadata:set(METADATA_NAMESPACE, REQUEST_COST_KEY,
    math.min(grant.requests_charge or spread, plan.requests_per_minute * SCALE))
  metadata:set(METADATA_NAMESPACE, COST_KEY,
    math.min(cost * (grant.audio_charge or spread), plan.audio_seconds_per_minute * SCALE))
  return true
end

-- The quota filters' `x-ratelimit-limit`, `-remaining` and `-reset`, appended as the response
-- passes back through them (audio-seconds first, then requests: builders/quotas.py), become
-- OpenAI's `x-ratelimit-*-requests` and `x-ratelimit-*-audio-seconds` in whole units; a 429 of
-- theirs gets Retry-After: when enough of its bucket has refilled for this request's cost.
local WINDOW_S = NAMES.MINUTE_S

local function seconds_until_full(limit, remaining)
  return math.ceil(math.max(0, limit - remaining) * WINDOW_S / limit)
end

local function retry_after(h, limited, sets)
  local charged = h:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE) or {}
  local set, cost
  if limited == REQUESTS_LIMIT then
    set, cost = sets.requests, tonumber(charged[REQUEST_COST_KEY])
  elseif limited == AUDIO_SECONDS_LIMIT then
    set, cost = sets["audio-seconds"], tonumber(charged[COST_KEY])
  end
  if not set then return WINDOW_S end
  return math.ceil(math.max(1, (cost or SCALE) - set.remaining) * WINDOW_S / set.limit)
end

local function rate_limit_headers(h)
  local headers = h:headers()
  local count = headers:getNumValues("x-ratelimit-limit")
  if count == 0 then return end
  local kinds = count >= 2 and {"audio-seconds", "requests"} or {"requests"}
  local sets = {}
  for i, kind in ipairs(kinds) do -- in tokens
    sets[kind] = {limit = math.max(1, tonumber(headers:getAtIndex("x-ratelimit-limit", i - 1)) or SCALE),
      remaining = tonumber(headers:getAtIndex("x-ratelimit-remaining", i - 1)) or 0}
  end
  for _, field in ipairs({"limit", "remaining", "reset"}) do headers:remove("x-ratelimit-" .. field) end
  for kind, set in pairs(sets) do
    headers:replace("x-ratelimit-limit-" .. kind, tostring(math.floor(set.limit / SCALE)))
    headers:replace("x-ratelimit-remaining-" .. kind, tostring(math.floor(set.remaining / SCALE)))
    headers:replace("x-ratelimit-reset-" .. kind, seconds_until_full(set.limit, set.remaining) .. "s")
  end
  local limited = headers:get(LIMITED_HEADER)
  if limited and headers:get(":status") == "429" then
    headers:replace("retry-after", tostring(math.max(1, retry_after(h, limited, sets))))
  end
end

return {charge = charge, rate_limit_headers = rate_limit_headers}
