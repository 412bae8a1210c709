{{/* What the operator does in a namespace it serves; the same rules for the ClusterRole and each Role.
     Exactly the verbs its code uses: tests/test_chart.py derives them from the code and compares. */}}
{{- define "vllm-operator.modelRules" -}}
# VLLMModels: kopf watches and indexes them (its event handlers keep no progress on them: no patch).
- apiGroups: [vllm-operator.io]
  resources: [vllmmodels]
  verbs: [list, watch]
- apiGroups: [vllm-operator.io]
  resources: [vllmmodels/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which clusters that enforce owner-reference
# permissions (OpenShift) allow only to who may update the owner's finalizers.
- apiGroups: [vllm-operator.io]
  resources: [vllmmodels/finalizers]
  verbs: [update]
# The children, read from kopf's watches: server-side apply is a patch, and a create when the object does not
# exist yet. Only cache Jobs are ever deleted (a revision no longer wanted); the rest goes with its model.
# PVCs are also read one by one: a pvc:// model's claim is the user's, not on the operator's watch.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
# Pods, read only: the cache Job's termination message and the reasons a model pod crash-loops.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# Events on each VLLMModel (kopf posts core/v1 Events, create only).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* Cluster-wide mode only: kopf watches CRDs to notice the VLLMModel resource appear or change.
     In namespaced mode the operator disables kopf's scanning and reads nothing cluster-wide. */}}
{{- define "vllm-operator.discoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
