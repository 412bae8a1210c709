"""Plan one VLLMModel's reconcile from its actual state: what to apply or delete, the status, and when
to look again. Pure: no I/O, no clock but ``Observed.now``.

Flow, one module per step: ``image_policy`` -> ``memory_step`` -> ``volume`` (cache PVC) ->
``cache_job`` (its outcome read by ``job_outcome`` from the pod's termination message: the resolved
commit and the cache summary) -> ``serving`` (Deployment pinned to that commit, then the Service).
``compose.plan_reconcile`` runs them in order; every desired child comes from ``builders``, the same
functions ``render`` prints, and nothing decorates it afterwards.
"""

from __future__ import annotations

from ..builders import ANNOTATION_CLAIM_UID, ANNOTATION_PLAN_DIGEST, ANNOTATION_SPEC_HASH, spec_hash
from .cache_job import RETRY_FAILED_CACHE_AFTER
from .compose import MANAGED_BY, plan_reconcile, transition_events
from .job_outcome import RESULT_WAIT
from .types import Action, Apply, Delete, Event, Observed, Plan, is_subset
from .volume import PVC_BIND_GRACE

__all__ = [
    "ANNOTATION_CLAIM_UID",
    "ANNOTATION_PLAN_DIGEST",
    "ANNOTATION_SPEC_HASH",
    "MANAGED_BY",
    "PVC_BIND_GRACE",
    "RESULT_WAIT",
    "RETRY_FAILED_CACHE_AFTER",
    "Action",
    "Apply",
    "Delete",
    "Event",
    "Observed",
    "Plan",
    "is_subset",
    "plan_reconcile",
    "spec_hash",
    "transition_events",
]
