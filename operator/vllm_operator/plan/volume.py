"""Step 2, the cache volume: create the model's own cache PVC, or check the claim the spec names."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .. import builders
from .. import status as st
from ..config import Config
from ..diagnose import metadata_of
from ..model import VLLMModel
from .types import Action, Apply, Hold, Observed, Outcome

# A cache PVC still Pending after this long is reported (WaitForFirstConsumer binds late, legitimately).
PVC_BIND_GRACE = datetime.timedelta(minutes=3)


@dataclass(frozen=True, kw_only=True)
class VolumeStep(Outcome):
    claim_uid: str | None  # the uid of the claim the cache lives on (annotated on the Job and Deployment)
    # The cache Job may be created: our PVC exists (its uid goes on the Job), or the claim is the user's.
    ready_for_job: bool


def plan_cache_volume(model: VLLMModel, observed: Observed, config: Config, *, hold: Hold | None) -> VolumeStep:
    pvc = observed.pvc
    claim_uid = metadata_of(pvc).get("uid") if pvc is not None else None
    actions: list[Action] = []
    failures: list[st.Condition] = []
    requeue: float | None = None
    if model.owns_cache_pvc and pvc is None:
        desired = builders.cache_pvc_for(model, config)
        if desired is not None and hold is None:
            actions.append(Apply(desired, created=True))
    elif model.existing_claim and pvc is None:
        failures.append(
            st.Condition(st.FAILED, st.TRUE, "PVCNotFound",
                         f"PVC {model.existing_claim} (spec.cache.existingClaim) does not exist: create it "
                         "or fix spec.cache.existingClaim")  # fmt: skip
        )
    if pvc is not None and (pvc.get("status") or {}).get("phase") == "Pending":
        created = st.parse_time(metadata_of(pvc).get("creationTimestamp"))
        if created is not None:
            pending = observed.now - created
            if pending > PVC_BIND_GRACE:
                failures.append(
                    st.Condition(st.FAILED, st.TRUE, "PVCNotBound",
                                 f"PVC {model.cache_claim_name} is not bound after {int(pending.total_seconds())}s: "
                                 "check spec.cache.storageClassName (the StorageClass must exist and provision "
                                 "volumes) or use spec.cache.existingClaim")  # fmt: skip
                )
            else:
                requeue = (PVC_BIND_GRACE - pending).total_seconds()
    return VolumeStep(
        actions=tuple(actions),
        failures=tuple(failures),
        requeue_after=requeue,
        claim_uid=str(claim_uid) if claim_uid else None,
        ready_for_job=claim_uid is not None or not model.owns_cache_pvc,
    )
