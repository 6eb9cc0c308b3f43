-- whisper-gateway: the model a request names, by the names clients may use (CONTEXT.models:
-- name or alias -> model), whether its key may use it, and the form an engine understands.

local reply = openai_errors.reply
local allows = api_keys.allows
local release = uploads.release
-- On a request that named an alias: the name it used, for traces (control_plane/builders/tracing.py).
local METADATA_NAMESPACE, REQUESTED_MODEL_KEY = NAMES.METADATA_NAMESPACE, NAMES.REQUESTED_MODEL_KEY

local function served_names(models)
  local names = {}
  for name, _ in pairs(models) do names[#names + 1] = name end
  table.sort(names)
  return table.concat(names, ", ")
end

-- The model step: the model `name` (the form field's value) stands for; nil once it answered
-- (404 to a name no model has, 403 to a key that may not use it).
local function resolve(h, name, grant)
  local models = CONTEXT.models or {}
  local model = models[name]
  if model == nil then
    return reply(h, 404, "The model `" .. name .. "` does not exist. Served models: " .. served_names(models) .. ".",
      "NotFoundError", "model")
  end
  if grant and not allows(grant, model) then
    return reply(h, 403, "This API key may not use the model `" .. name .. "`.", "PermissionDeniedError", "model",
      "model_not_allowed")
  end
  if model ~= name then h:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, REQUESTED_MODEL_KEY, name) end
  return model
end

-- The form (multipart.read_form's) rewritten to name `model` where it names an alias.
local function rewrite_alias(body, form, model)
  if model == form.model_name then return end
  -- An alias: engines know only the model's own name, so the form must carry that. Lua
  -- memory is outside Envoy's heap (and its overload manager), so the copy is made once, in
  -- pieces, and collected at once rather than left for the incremental collector.
  local length, part = body:length(), form.model
  body:setBytes(table.concat({body:getBytes(0, part.start), model,
    body:getBytes(part.stop, length - part.stop)}))
  release(length)
end

return {resolve = resolve, rewrite_alias = rewrite_alias}
