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
# exist yet. Cache Jobs of revisions no longer wanted are deleted, and the few kinds below say when; the rest goes with its model.
# PVCs are also read one by one: a pvc:// model's claim is the user's, not on the operator's watch.
# PVCs: delete only the claims of scaled-down replicas (cache.sharing PerReplica, deletePolicy Delete) once
# spec.cache.scaledDownRetentionSeconds has passed.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch]
# Deployments (cache.sharing Shared) or StatefulSets (PerReplica): the workload of the other sharing is deleted
# once the new one serves. PodDisruptionBudgets: for 2 or more replicas, deleted below that.
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, create, patch, delete]
# The NetworkPolicy of a PerReplica model: its sibling port only from the same model's pods.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
# Pods, read only: the cache Job's termination message and the reasons a model pod crash-loops.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# ConfigMaps: only the operator's own (labelled, on its watch), the adapters file of a model with spec.adapters
# that its pods mount. Other ConfigMaps are never read (the watch is filtered by label on the server).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [list, watch, create, patch]
# spec.autoscaling / spec.routing: the model's KEDA ScaledObject or HPA and its InferencePool, deleted when
# turned off or when the engine switches (only the operator's own; KEDA's keda-hpa-* is never touched).
# Whether these APIs are installed is asked through discovery, which needs no rule.
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [list, watch, create, patch, delete]
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
