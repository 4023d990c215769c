-- Argo CD health check of monsoon.dev/SyncPipeline, read from the status the operator writes:
-- kstatus conditions (Stalled, Reconciling), Ready and observedGeneration. Install it in the
-- argocd-cm ConfigMap under `resource.customizations.health.monsoon.dev_SyncPipeline` (see
-- charts/README.md). Keep to Lua 5.1 (Argo CD runs gopher-lua).
--
--   Degraded    Stalled (invalid spec, missing Secret, lost history, resources that cannot fit)
--               or Degraded (a worker failed, MongoDB or Elasticsearch unavailable)
--   Suspended   spec.paused, once the operator has stopped the workers
--   Progressing the operator has not rolled out this generation yet (observedGeneration is
--               behind), or the workers are starting
--   Healthy     Ready for this generation
local health = { status = "Progressing", message = "waiting for the monsoon operator" }
if obj.status == nil then
  return health
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
local conditions = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    conditions[c.type] = c
  end
end
local function on(kind)
  local c = conditions[kind]
  return c ~= nil and c.status == "True" and (c.observedGeneration == nil or c.observedGeneration == generation)
end
if on("Stalled") then
  health.status = "Degraded"
  health.message = conditions["Stalled"].message
  return health
end
if observed == nil or observed ~= generation then
  health.message = "the operator has not rolled out generation " .. tostring(generation) .. " yet"
  if conditions["Reconciling"] ~= nil and conditions["Reconciling"].status == "True" then
    health.message = conditions["Reconciling"].message
  end
  return health
end
if obj.spec ~= nil and obj.spec.paused == true then
  health.status = "Suspended"
  health.message = "paused: workers stopped, checkpoints kept"
  return health
end
if on("Degraded") then
  health.status = "Degraded"
  health.message = conditions["Degraded"].message
  return health
end
if on("Ready") then
  health.status = "Healthy"
  health.message = conditions["Ready"].message
  return health
end
if conditions["Ready"] ~= nil then
  health.message = conditions["Ready"].message
end
return health
