-- Argo CD health check for VLLMModel (vllm-operator.io/v1alpha1).
-- Healthy: the operator has seen the current spec (observedGeneration) and the Ready condition is True.
-- Degraded: the Failed condition is True (a failure blocks progress; its message names the fix).
-- Suspended: scaled to zero (phase Idle, by the autoscaler or by hand): nothing is wrong, nothing runs.
-- Progressing: no status yet, a status older than the spec, or caching/loading under way.
local hs = {}
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the vLLM operator to report status"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the vLLM operator to observe generation " .. tostring(generation)
  return hs
end

local ready = nil
local failed = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    -- A condition written for an older generation says nothing about the current spec.
    local current = condition.observedGeneration == nil or generation == nil
      or condition.observedGeneration >= generation
    if current and condition.type == "Failed" and condition.status == "True" then
      failed = condition
    elseif current and condition.type == "Ready" then
      ready = condition
    end
  end
end

local function describe(condition, fallback)
  if condition == nil then
    return fallback
  end
  local text = condition.reason or fallback
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end

if failed ~= nil then
  hs.status = "Degraded"
  hs.message = describe(failed, "Failed")
  return hs
end
if obj.status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = obj.status.message or "Failed"
  return hs
end
if obj.status.phase == "Idle" then
  hs.status = "Suspended"
  hs.message = describe(ready, "Idle")
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
local phase = obj.status.phase or "Pending"
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = phase .. ": " .. ready.message
elseif obj.status.message ~= nil and obj.status.message ~= "" then
  hs.message = phase .. ": " .. obj.status.message
else
  hs.message = phase
end
return hs
