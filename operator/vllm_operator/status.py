"""Status conditions: Kubernetes-style, with lastTransitionTime kept while a condition's status holds."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Condition types (CONTRACTS.md). Failed is True while a failure blocks progress.
CACHED = "Cached"
READY = "Ready"
FAILED = "Failed"
MEMORY_FITS = "MemoryFits"
STALLED = "Stalled"  # kstatus' abnormal-true condition (Flux): True exactly while Failed is True
AUTOSCALER_READY = "AutoscalerReady"  # only with spec.autoscaling
ROUTING_READY = "RoutingReady"  # only with spec.routing.inferencePool

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# Phases, from the most to the least advanced.
PENDING, CACHING, LOADING, READY_PHASE, FAILED_PHASE = "Pending", "Caching", "Loading", "Ready", "Failed"
IDLE = "Idle"  # cached and deployed at zero replicas (scaled to zero): nothing is wrong


@dataclass(frozen=True)
class Condition:
    """What a condition should say now; ``merge_conditions`` adds the transition times."""

    type: str
    status: str
    reason: str
    message: str = ""


def now_iso(now: datetime.datetime) -> str:
    return now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime.datetime | None:
    """An RFC 3339 timestamp from the API (``...Z`` or with an offset); None if absent or malformed."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None,
    new: Iterable[Condition],
    *,
    generation: int | None,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """The conditions list for ``new``, keeping each one's lastTransitionTime while its status is unchanged.

    Conditions of other types already present (written by someone else) are kept as they are.
    """
    result: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cond in new:
        seen.add(cond.type)
        previous = find(old, cond.type)
        if previous and previous.get("status") == cond.status and previous.get("lastTransitionTime"):
            since = str(previous["lastTransitionTime"])
        else:
            since = now_iso(now)
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        result.append(entry)
    for other in old or ():
        if other.get("type") not in seen:
            result.append(dict(other))
    return result


def transitioned_to(
    old: Sequence[Mapping[str, Any]] | None, new: Sequence[Mapping[str, Any]], type_: str, status: str
) -> bool:
    """True when condition ``type_`` has just become ``status`` (or changed reason while in it)."""
    before, after = find(old, type_), find(new, type_)
    if not after or after.get("status") != status:
        return False
    if not before or before.get("status") != status:
        return True
    # A different failure while already failed is news too.
    return type_ == FAILED and status == TRUE and before.get("reason") != after.get("reason")


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning status ``old`` into ``new`` (keys gone from ``new`` become None); {} if equal.

    Keys the operator does not manage (e.g. kopf's) are left alone: only keys of ``new`` and the
    managed keys in ``MANAGED_KEYS`` are considered.
    """
    patch: dict[str, Any] = {}
    for key in set(new) | (set(old) & MANAGED_KEYS):
        if key not in new:
            patch[key] = None
        elif old.get(key) != new[key]:
            patch[key] = new[key]
    return patch


MANAGED_KEYS = frozenset(
    {
        "phase",
        "conditions",
        "observedGeneration",
        "resolvedRevision",
        "cache",
        "replicas",
        "readyReplicas",
        "selector",
        "endpoint",
        "plan",
        "message",
        "autoscaling",
        "sharing",  # cache.sharing in force; replicaCaches and unusedClaims with PerReplica
        "replicaCaches",
        "unusedClaims",
        "adapters",
    }
)
