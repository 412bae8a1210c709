{{/* What the operator does in a namespace it serves; the same rules for the ClusterRole and each Role. */}}
{{- define "vllm-operator.modelRules" -}}
# VLLMModels: watch them, keep kopf's progress annotations on them (no finalizer), write their status.
- apiGroups: [vllm-operator.io]
  resources: [vllmmodels]
  verbs: [get, list, watch, patch]
- apiGroups: [vllm-operator.io]
  resources: [vllmmodels/status]
  verbs: [get, patch]
# The children of each model: cache PVC, cache Job, Deployment, Service (server-side apply is a patch).
- apiGroups: [""]
  resources: [persistentvolumeclaims, services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
# Pods, read only: the cache Job's termination message and the reasons a model pod crash-loops.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Events on each VLLMModel (kopf posts core/v1 Events, create only).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* kopf watches CRDs to notice the VLLMModel resource appear or change. */}}
{{- define "vllm-operator.discoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
