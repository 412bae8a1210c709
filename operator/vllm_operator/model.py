"""A typed view of one VLLMModel object, as the builders and the reconcile loop read it."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_runtime import layout

from . import crd


@dataclass(frozen=True)
class VLLMModel:
    """One VLLMModel: identity, the spec with the CRD's defaults applied, and the parsed model source."""

    name: str
    namespace: str
    uid: str | None
    generation: int | None
    spec: dict[str, Any]
    source: layout.ModelSource
    status: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, default_namespace: str = "default") -> VLLMModel:
        """Build from a VLLMModel body (a kopf body, an API object or a parsed YAML document).

        Raises ValueError naming the field when ``spec.model`` is missing or malformed.
        """
        metadata: Mapping[str, Any] = body.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            raise ValueError("metadata.name is required")
        spec = crd.apply_defaults(dict(body.get("spec") or {}))
        if not spec.get("model"):
            raise ValueError(f"VLLMModel {name}: spec.model is required ('org/name' or 'pvc://<claim>/<path>')")
        generation = metadata.get("generation")
        return cls(
            name=str(name),
            namespace=str(metadata.get("namespace") or default_namespace),
            uid=metadata.get("uid"),
            generation=int(generation) if generation is not None else None,
            spec=spec,
            source=layout.parse_model(str(spec["model"])),
            status=copy.deepcopy(dict(body.get("status") or {})),
        )

    # --- spec fields that the builders and the reconcile loop read often -------------------------------

    @property
    def revision(self) -> str:
        return str(self.spec.get("revision") or "main")

    @property
    def replicas(self) -> int:
        """The model pods to run: ``spec.replicas``, with ``spec.autoscaling`` kept within [minReplicas,
        maxReplicas]; 0 stays 0 (scaled to zero, or paused by hand: an HPA does not scale a target at 0)."""
        replicas = int(self.spec.get("replicas", 1))
        bounds: Mapping[str, Any] | None = self.spec.get("autoscaling")
        if not bounds or replicas == 0 or "maxReplicas" not in bounds:
            return replicas
        return max(int(bounds.get("minReplicas", 1)), min(int(bounds["maxReplicas"]), replicas))

    def planned(self, field: str) -> Any:
        """A value from the memory planner's ``status.plan`` (camelCase or the planner's snake_case), or None."""
        plan: Mapping[str, Any] = self.status.get("plan") or {}
        snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in field)
        value = plan.get(field)
        return value if value is not None else plan.get(snake)

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs per replica. ``"auto"`` means the planner's choice (``status.plan``), else 1."""
        value = self.spec.get("tensorParallelSize", 1)
        if value == "auto":
            planned = self.planned("tensorParallelSize")
            return int(planned) if planned else 1
        return int(value)

    @property
    def serving_spec(self) -> dict[str, Any]:
        """The spec with ``"auto"`` sizes replaced by the planner's choices once known, so vLLM's
        flags and the pod's GPU request agree (an unknown ``auto`` is left to vLLM's defaults)."""
        spec = dict(self.spec)
        if spec.get("tensorParallelSize") == "auto":
            spec["tensorParallelSize"] = self.tensor_parallel_size
        if spec.get("maxModelLen") == "auto" and self.planned("maxModelLen"):
            spec["maxModelLen"] = int(self.planned("maxModelLen"))
        return spec

    @property
    def cache(self) -> dict[str, Any]:
        cache: dict[str, Any] = self.spec.get("cache") or {}
        return cache

    @property
    def existing_claim(self) -> str | None:
        claim = self.cache.get("existingClaim")
        return str(claim) if claim else None

    @property
    def owns_cache_pvc(self) -> bool:
        """True when the operator creates the cache PVC (``<name>-cache``)."""
        return self.existing_claim is None and self.source.is_hub

    @property
    def cache_claim_name(self) -> str | None:
        """The PVC that holds the cache; None for a pvc:// model without ``cache.existingClaim``
        (its pods then keep the compile cache in an emptyDir)."""
        if self.existing_claim:
            return self.existing_claim
        if self.owns_cache_pvc:
            # PerReplica: replica 0's own claim (the StatefulSet's name for it), which the cache Job fills.
            return f"cache-{self.name}-0" if self.per_replica else f"{self.name}-cache"
        return None

    # --- scaling and rollout (issue 12; docs/scaling.md) -----------------------------------------------

    @property
    def max_replicas(self) -> int:
        """The most replicas the model may run: ``spec.replicas`` or ``spec.autoscaling.maxReplicas``."""
        autoscaling: Mapping[str, Any] = self.spec.get("autoscaling") or {}
        return max(int(self.spec.get("replicas", 1)), int(autoscaling.get("maxReplicas") or 0))

    @property
    def sharing(self) -> str:
        """``Shared`` or ``PerReplica``: ``spec.cache.sharing``, else PerReplica when the operator's claim
        can only be mounted on one node (no ReadWriteMany/ReadOnlyMany) and more than one replica may run,
        or when the model already runs PerReplica (``status.sharing``: scaling back to one replica does not
        trade the replicas' volumes for a new shared one), else Shared."""
        explicit = self.cache.get("sharing")
        if explicit in ("Shared", "PerReplica"):
            return str(explicit)
        if not self.owns_cache_pvc:
            return "Shared"
        modes = set(self.cache.get("accessModes") or ["ReadWriteOnce"])
        if modes & {"ReadWriteMany", "ReadOnlyMany"}:
            return "Shared"
        return "PerReplica" if self.max_replicas > 1 or self.status.get("sharing") == "PerReplica" else "Shared"

    @property
    def per_replica(self) -> bool:
        return self.sharing == "PerReplica"

    @property
    def rollout_strategy(self) -> str:
        """``Surge`` (an extra pod at a time) or ``InPlace`` (no extra pod)."""
        return str((self.spec.get("rollout") or {}).get("strategy") or "Surge")

    @property
    def hf_token_secret_ref(self) -> dict[str, str] | None:
        ref = self.spec.get("hfTokenSecretRef")
        if not ref or not ref.get("name"):
            return None
        return {"name": str(ref["name"]), "key": str(ref.get("key") or "HF_TOKEN")}

    @property
    def model_argument(self) -> str:
        """What ``vllm-runtime cache/serve --model`` receives: the repo id, or a pvc:// model's directory."""
        return self.source.repo_id if self.source.repo_id else self.source.local_dir()
