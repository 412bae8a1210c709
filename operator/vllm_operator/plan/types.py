"""The plan's vocabulary: what the engine observed, the actions it performs, and what each step returns."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import kube
from .. import status as st
from ..memory import NO_GPU, MemoryPlan

JSON = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    """The actual state of one VLLMModel's children, as the engine observed it."""

    now: datetime.datetime
    pvc: JSON | None = None  # the cache claim (own or spec.cache.existingClaim)
    jobs: Mapping[str, JSON] = field(default_factory=dict)  # cache Jobs by name
    pods: Sequence[JSON] = ()  # the model's pods (cache and server)
    # The model pods' workload: the Deployment, or with cache.sharing PerReplica the StatefulSet (same name).
    deployment: JSON | None = None
    service: JSON | None = None
    # cache.sharing PerReplica and the disruption budget (plan.replicas): the model's own PVCs by name (the
    # replicas' claims), its StatefulSet and Deployment whichever the sharing, its headless Service,
    # NetworkPolicy and PodDisruptionBudget.
    claims: Mapping[str, JSON] = field(default_factory=dict)
    statefulset: JSON | None = None
    plain_deployment: JSON | None = None
    siblings_service: JSON | None = None
    network_policy: JSON | None = None
    disruption_budget: JSON | None = None
    memory: MemoryPlan = NO_GPU
    # spec.autoscaling / spec.routing: the model's ScaledObjects, HPAs and InferencePools by name, and
    # the optional APIs (plurals) the cluster does not serve, or the operator's watches do not carry.
    scaled_objects: Mapping[str, JSON] = field(default_factory=dict)
    hpas: Mapping[str, JSON] = field(default_factory=dict)
    inference_pools: Mapping[str, JSON] = field(default_factory=dict)
    missing_apis: frozenset[str] = frozenset()
    unwatched_apis: frozenset[str] = frozenset()
    # spec.adapters: the adapters ConfigMap, and each ready server pod's last /status report by pod name
    # ({"ok": True, "adapters": {...}} or {"ok": False, "error": ...}; pod_reports.PodReports).
    config_map: JSON | None = None
    adapter_reports: Mapping[str, JSON] = field(default_factory=dict)


@dataclass(frozen=True)
class Apply:
    """Server-side apply ``obj``; ``created`` when it did not exist."""

    obj: JSON
    created: bool

    def __str__(self) -> str:
        return f"apply {self.obj['kind']}/{self.obj['metadata']['name']}"


@dataclass(frozen=True)
class Delete:
    resource: kube.Resource
    namespace: str
    name: str
    why: str

    def __str__(self) -> str:
        return f"delete {self.resource.kind}/{self.name} ({self.why})"


Action = Apply | Delete


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    status: JSON  # the complete desired status
    events: list[Event]  # events of the actions; transition events come from ``transition_events``
    # Seconds after which a time-based rule could decide differently (None: nothing time-based is pending).
    requeue_after: float | None = None


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one step decided: its actions, the failures it found, its events, and its time-based hint."""

    actions: tuple[Action, ...] = ()
    failures: tuple[st.Condition, ...] = ()
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None


@dataclass(frozen=True)
class Hold:
    """Why a step may not create (or deploy) anything now: the Cached condition's reason and the words."""

    reason: str
    why: str


def soonest(*delays: float | None) -> float | None:
    """The smallest of the given delays (at least one second), None when none is given."""
    known = [d for d in delays if d is not None]
    return max(1.0, min(known)) if known else None


def is_subset(desired: Any, actual: Any) -> bool:
    """True when every field of ``desired`` has the same value in ``actual`` (extra fields allowed).

    Scalars compare by their text too: the API server returns quantities like ``1`` as ``"1"``.
    """
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(is_subset(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True))
        )
    return bool(desired == actual or (actual is not None and str(desired) == str(actual)))
