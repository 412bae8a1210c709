"""Step 3b, LoRA adapters (``spec.adapters``): cache each one, publish the desired set, report what loaded.

- **Cache**: one cache Job per Hub adapter and revision (``lora.adapter_cache_job_for``), judged like the
  base model's (``job_outcome``: its pod's termination message gives the commit, bytes, verification and
  the adapter's rank); replaced when its spec changed after a failure, re-run after a retryable failure,
  deleted once the adapter (or that revision of it) is no longer in the spec, given its TTL once the commit
  is recorded and published. The base model's Job is never touched.
- **Publish**: the ConfigMap ``<name>-adapters`` lists every adapter whose commit is resolved (an adapter
  whose new revision is still caching keeps its previous entry). The serving pods mount it; the runtime
  loads and unloads to follow it, so nothing restarts.
- **Report**: each ready server pod's ``/status`` (``pod_reports``, read in the background) says per
  adapter whether it is loaded at the published commit or why not. ``status.adapters`` counts, per adapter,
  the ready replicas it is loaded on; a pod that did not answer counts as unknown, never as loaded.
  ``AdaptersReady`` summarises: False names the failing adapter, the reason and the fix (the runtime's
  words); ``Ready`` stays about the base model and the other adapters keep serving.
- **First start**: the first Deployment waits for the adapters' cache Jobs to finish, so vLLM starts with
  them cached and its max LoRA rank covering them (a Job that failed does not hold it).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import builders, kube, lora, replicas
from .. import status as st
from ..config import Config
from ..diagnose import annotations_of
from ..model import VLLMModel
from ..pod_reports import is_ready_server
from .cache_job import failed_job_actions
from .job_outcome import ABSENT, FAILED, FINISHING, RUNNING, SUCCEEDED, read_cache_job
from .types import JSON, Action, Apply, Delete, Event, Hold, Observed, Outcome, is_subset, soonest

ADAPTERS_READY = "AdaptersReady"
# While adapters are being loaded, look again this often (the pods' /status is re-read then).
LOADING_RECHECK_SECONDS = 5.0
UNKNOWN_RECHECK_SECONDS = 15.0  # ... and this often while a ready pod does not answer
NOT_ANSWERING = "ReplicasNotAnswering"

# status.adapters[].state
CACHING, CACHE_FAILED, PENDING, LOADING, LOADED, FAILED_STATE = (
    "Caching", "CacheFailed", "Pending", "Loading", "Loaded", "Failed")  # fmt: skip

CACHING_HOLD = Hold("CachingAdapters", "the adapters' cache Jobs are running; the first pods start once they finish")


@dataclass(frozen=True, kw_only=True)
class AdaptersStep(Outcome):
    model: VLLMModel  # with maxLoraRank pinned to what the Deployment runs with
    statuses: list[JSON] | None  # status.adapters; None without spec.adapters
    condition: st.Condition | None  # AdaptersReady; None without spec.adapters
    deploy_hold: Hold | None  # the first Deployment waits for the adapters' caches


def plan_adapters(
    model: VLLMModel,
    observed: Observed,
    config: Config,
    *,
    claim_uid: str | None,
    ready_for_job: bool,
    hold: Hold | None,
    last_status: Mapping[str, Any],
) -> AdaptersStep:
    wanted_jobs = {lora.adapter_job_name(model, a) for a in lora.hub_adapters(model)} if lora.enabled(model) else set()
    actions: list[Action] = _unwanted_jobs(model, observed, wanted_jobs)
    if not lora.enabled(model):
        return AdaptersStep(actions=tuple(actions), model=model, statuses=None, condition=None, deploy_hold=None)
    events: list[Event] = []
    requeue: list[float | None] = []
    recorded = lora.status_commits(model)
    served_from = annotations_of(observed.deployment).get(builders.ANNOTATION_CLAIM_UID)
    if claim_uid and served_from and served_from != claim_uid:
        recorded = {}  # the PVC was replaced since: the new one is empty, what status recorded is not on it
    old_status = {str(e.get("name")): e for e in last_status.get("adapters") or [] if isinstance(e, Mapping)}
    previous = {str(e.get("name")): e for e in lora.read_file_entries(observed.config_map)}
    commits: dict[str, str] = {}
    caches: dict[str, JSON] = {}
    errors: dict[str, tuple[str, str]] = {}  # name -> (reason, message) of a cache failure
    in_flight = False
    for adapter in lora.hub_adapters(model):  # one per Job: names sharing a repo@revision share it (below)
        job = read_cache_job(lora.as_model(model, adapter), observed)
        desired = lora.adapter_cache_job_for(model, config, adapter, claim_uid=claim_uid)
        hash_key = builders.ANNOTATION_SPEC_HASH
        stale = annotations_of(job.job).get(hash_key) != desired["metadata"]["annotations"][hash_key]
        what = f"adapter {adapter.name!r} ({adapter.model}@{adapter.revision})"
        filled = annotations_of(job.job).get(builders.ANNOTATION_CLAIM_UID)
        if job.job is not None and claim_uid and filled and filled != claim_uid:
            if hold is None:
                actions.append(Delete(kube.JOBS, model.namespace, job.name, f"PVC {model.cache_claim_name} was replaced"))
            in_flight = True
        elif job.state == SUCCEEDED:
            assert job.commit is not None
            commits[adapter.name] = job.commit
            caches[adapter.name] = _cache_summary(job.summary)
            facts = (job.summary or {}).get("adapter")
            if isinstance(facts, Mapping) and facts.get("reason"):  # cached, but not a LoRA adapter vLLM can load
                errors[adapter.name] = (str(facts["reason"]), f"{what}: {facts.get('message') or 'not a PEFT LoRA adapter'}"
                                        "; point spec.adapters[].model at a PEFT LoRA adapter repo")  # fmt: skip
            published = any(e.get("name") == adapter.name and e.get("commit") == job.commit for e in previous.values())
            if (published and recorded.get(adapter.name) == job.commit and not stale
                    and (job.job or {}).get("spec", {}).get("ttlSecondsAfterFinished") is None):  # fmt: skip
                ttl = lora.adapter_cache_job_for(model, config, adapter, claim_uid=claim_uid,
                                                 ttl_seconds=config.cache_job_ttl_seconds)  # fmt: skip
                actions.append(Apply(ttl, created=False))
        elif job.state == ABSENT:
            if adapter.name in recorded:
                commits[adapter.name] = recorded[adapter.name]  # cached earlier; its Job has expired
            elif hold is None and ready_for_job:
                actions.append(Apply(desired, created=True))
                events.append(Event("Normal", "AdapterCacheStarted", f"caching {what} into PVC "
                                    f"{model.cache_claim_name} (Job {job.name})"))  # fmt: skip
                in_flight = True
        elif job.state == FAILED and job.failure is not None:
            errors[adapter.name] = (job.failure.reason, f"{what}: {job.failure.message}")
            retry, due = failed_job_actions(model, observed, job, stale=stale, hold=hold)
            actions += retry
            requeue.append(due)
        elif job.state == RUNNING:
            if job.failure is not None:
                errors[adapter.name] = (job.failure.reason, f"{what}: {job.failure.message}")
                if stale and hold is None:
                    actions.append(Delete(kube.JOBS, model.namespace, job.name, "the spec changed since its pod got stuck"))
            else:
                in_flight = True
            requeue.append(job.recheck_after)
        elif job.state == FINISHING:
            in_flight = True
            requeue.append(job.recheck_after)
    for adapter in lora.adapters_of(model):  # a second name for a repo@revision: the first one's Job tells
        twin = next(a for a in lora.hub_adapters(model) if a.is_hub and a.model == adapter.model
                    and a.revision == adapter.revision) if adapter.is_hub else None  # fmt: skip
        if twin is not None and twin.name != adapter.name:
            if twin.name in commits:
                commits[adapter.name] = commits[twin.name]
            if twin.name in caches:
                caches[adapter.name] = dict(caches[twin.name])
            if twin.name in errors:
                errors[adapter.name] = errors[twin.name]
    entries = lora.file_entries(model, commits, previous)
    actions += _prefetch(model, observed, config, entries)
    config_map = lora.config_map_for(model, entries)
    if (observed.config_map is None and hold is None and ready_for_job) or (
            observed.config_map is not None and not is_subset(config_map, observed.config_map)):  # fmt: skip
        actions.append(Apply(config_map, created=observed.config_map is None))
    served = {e["name"]: e for e in entries}
    statuses = _statuses(model, observed, served, commits, caches, errors, old_status)
    condition = _condition(statuses, ready=_ready_pods(observed))
    if condition.reason in (LOADING, CACHING) and _ready_pods(observed):
        requeue.append(LOADING_RECHECK_SECONDS)
    elif condition.reason == NOT_ANSWERING:
        requeue.append(UNKNOWN_RECHECK_SECONDS)
    # The Deployment's builder reads the ranks just learnt (status.adapters), or keeps the running rank.
    deploy_model = lora.with_running_rank(
        dataclasses.replace(model, status={**model.status, "adapters": statuses}), observed.deployment)
    return AdaptersStep(
        actions=tuple(actions),
        events=tuple(events),
        requeue_after=soonest(*requeue),
        model=deploy_model,
        statuses=statuses,
        condition=condition,
        deploy_hold=CACHING_HOLD if in_flight and observed.deployment is None else None,
    )


def _unwanted_jobs(model: VLLMModel, observed: Observed, wanted: set[str]) -> list[Action]:
    """Delete adapter cache Jobs of adapters (or revisions) the spec no longer names (prefetches: ``_prefetch``)."""
    actions: list[Action] = []
    for name, job in sorted(observed.jobs.items()):
        ann = annotations_of(job)
        if lora.ANNOTATION_ADAPTER in ann and replicas.ANNOTATION_PREFETCH not in ann and name not in wanted:
            why = (f"adapter {ann.get(lora.ANNOTATION_ADAPTER)!r} at {ann.get(builders.ANNOTATION_MODEL)}@"
                   f"{ann.get(builders.ANNOTATION_REVISION)} is no longer in spec.adapters")  # fmt: skip
            actions.append(Delete(kube.JOBS, model.namespace, name, why))
    return actions


def _prefetch(model: VLLMModel, observed: Observed, config: Config, entries: Sequence[Mapping[str, str]]) -> list[Action]:
    """cache.sharing PerReplica: an adapter's cache Job fills replica 0's claim, and a replica started later caches
    the published adapters in its init container; one published while replica N (N >= 1) runs is missing there,
    which its runtime reports (AdapterNotCached). Then a prefetch Job copies the adapter's commit into that replica's
    claim on its node (``replicas.prefetch_job_for``: from replica 0's sibling server, else the Hub); the runtime's
    next retry loads it. Prefetches of commits no longer published go."""
    published = {(e["name"], e.get("commit")) for e in entries if e.get("commit")}
    actions: list[Action] = []
    for name, job in sorted(observed.jobs.items()):
        ann = annotations_of(job)
        if lora.ANNOTATION_ADAPTER in ann and replicas.ANNOTATION_PREFETCH in ann and (
                (ann.get(lora.ANNOTATION_ADAPTER), ann.get(builders.ANNOTATION_COMMIT)) not in published):  # fmt: skip
            actions.append(Delete(kube.JOBS, model.namespace, name, "prefetch of an adapter commit no longer published"))
    if not model.per_replica:
        return actions
    adapters = {a.name: a for a in lora.adapters_of(model)}
    for pod in _ready_pods(observed):
        pod_name = str((pod.get("metadata") or {}).get("name"))
        ordinal = pod_name.removeprefix(f"{replicas.statefulset_name(model)}-")
        report = observed.adapter_reports.get(pod_name) or {}
        if not ordinal.isdigit() or int(ordinal) < 1 or not report.get("ok"):
            continue
        for item in (report.get("adapters") or {}).get("items") or []:
            adapter, commit = adapters.get(str(item.get("name"))), item.get("commit")
            if adapter is None or item.get("reason") != "AdapterNotCached" or (adapter.name, commit) not in published:
                continue
            assert isinstance(commit, str)
            job = replicas.prefetch_job_for(lora.as_model(model, adapter), config, commit, int(ordinal))
            job["metadata"]["annotations"][lora.ANNOTATION_ADAPTER] = adapter.name
            if job["metadata"]["name"] not in observed.jobs:
                actions.append(Apply(job, created=True))
    return actions


def _cache_summary(summary: Mapping[str, Any] | None) -> JSON:
    s = summary or {}
    out = {k: s.get(k) for k in ("bytes", "files", "verified", "completedAt")}
    # The adapter's LoRA rank (its adapter_config.json), as the runtime's cache summary reports it.
    adapter = s.get("adapter") if isinstance(s.get("adapter"), Mapping) else {}
    rank = adapter.get("rank") if isinstance(adapter, Mapping) else None
    rank = rank if rank is not None else s.get("rank")
    if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0:
        out["rank"] = rank
    return {k: v for k, v in out.items() if v is not None}


def _ready_pods(observed: Observed) -> list[Mapping[str, Any]]:
    return sorted((p for p in observed.pods if is_ready_server(p)),
                  key=lambda p: str((p.get("metadata") or {}).get("name")))  # fmt: skip


def _statuses(
    model: VLLMModel,
    observed: Observed,
    served: Mapping[str, Mapping[str, str]],
    commits: Mapping[str, str],
    caches: Mapping[str, JSON],
    cache_errors: Mapping[str, tuple[str, str]],
    old_status: Mapping[str, Mapping[str, Any]],
) -> list[JSON]:
    pods = _ready_pods(observed)
    out: list[JSON] = []
    for adapter in lora.adapters_of(model):
        old = old_status.get(adapter.name) or {}
        same = old.get("model") == adapter.model and old.get("revision") == adapter.revision
        entry: JSON = {"name": adapter.name, "model": adapter.model, "revision": adapter.revision}
        commit = commits.get(adapter.name)
        if commit:
            entry["commit"] = commit
        cache = caches.get(adapter.name)
        if cache is None and same and commit and old.get("commit") == commit and isinstance(old.get("cache"), Mapping):
            cache = dict(old["cache"])  # the Job that told it has expired
        rank = (cache or {}).pop("rank", None) if cache else None
        if rank is None and same and commit and old.get("commit") == commit:
            rank = old.get("rank")
        if cache:
            entry["cache"] = cache
        if isinstance(rank, int):
            entry["rank"] = rank
        published = served.get(adapter.name)
        if published and published.get("commit") and published.get("commit") != commit:
            entry["servingCommit"] = published["commit"]  # the previous revision's, until the new one is cached
        loaded, unknown, problems = _on_pods(adapter.name, published, pods, observed.adapter_reports)
        entry["readyReplicas"], entry["loadedReplicas"] = len(pods), loaded
        if unknown:
            entry["unknownReplicas"] = unknown
        error: tuple[str, str, bool] | None = None
        if adapter.name in cache_errors:
            reason, message = cache_errors[adapter.name]
            entry["state"], error = CACHE_FAILED, (reason, message, False)
        elif problems and not all(p[2] for p in problems):
            entry["state"], error = FAILED_STATE, next(p for p in problems if not p[2])
        elif adapter.is_hub and not commit:
            entry["state"] = CACHING
        elif not pods:
            entry["state"] = PENDING
        elif loaded == len(pods):
            entry["state"] = LOADED
        else:
            entry["state"] = LOADING
            error = problems[0] if problems else None
        if error is not None:
            last = old.get("lastError") if isinstance(old.get("lastError"), Mapping) else {}
            since = last.get("since") if last and last.get("reason") == error[0] else None
            entry["lastError"] = {"reason": error[0], "message": error[1][:1024], "retryable": error[2],
                                  "since": since or st.now_iso(observed.now)}  # fmt: skip
        out.append(entry)
    return out


def _on_pods(
    name: str, published: Mapping[str, str] | None, pods: Sequence[Mapping[str, Any]], reports: Mapping[str, JSON]
) -> tuple[int, int, list[tuple[str, str, bool]]]:
    """(ready pods it is loaded on at the published commit, pods whose state is unknown, (reason, message,
    retryable) of each pod where it failed)."""
    loaded = unknown = 0
    problems: list[tuple[str, str, bool]] = []
    for pod in pods:
        pod_name = str((pod.get("metadata") or {}).get("name"))
        report = reports.get(pod_name)
        if not report or not report.get("ok"):
            unknown += 1
            continue
        if published is None:
            continue
        items = (report.get("adapters") or {}).get("items") or []
        item = next((i for i in items if isinstance(i, Mapping) and i.get("name") == name), None)
        if item is None or item.get("commit") != published.get("commit"):
            continue  # the pod has not read the published entry yet
        if item.get("loaded") is True and item.get("state") == "Loaded":
            loaded += 1
        elif item.get("state") == "Failed":
            reason = str(item.get("reason") or "AdapterLoadFailed")
            message = str(item.get("message") or f"adapter {name!r} failed to load")
            problems.append((reason, f"{message} (pod {pod_name})", bool(item.get("retryable"))))
    return loaded, unknown, problems


def _condition(statuses: Sequence[Mapping[str, Any]], *, ready: Sequence[Mapping[str, Any]]) -> st.Condition:
    if not statuses:
        return st.Condition(ADAPTERS_READY, st.TRUE, "NoAdapters", "spec.adapters is empty: LoRA is enabled, no adapter is served")
    total = len(statuses)
    done = sum(1 for s in statuses if s.get("state") == LOADED)
    tally = f"{done}/{total} adapters loaded on all {len(ready)} ready replicas"
    failing = [s for s in statuses if s.get("state") in (FAILED_STATE, CACHE_FAILED)]
    if failing:
        first = failing[0]["lastError"]
        more = f"; also failing: {', '.join(str(s['name']) for s in failing[1:])}" if failing[1:] else ""
        return st.Condition(ADAPTERS_READY, st.FALSE, str(first["reason"]), f"{first['message']}{more}; {tally}"[:2048])
    if done == total:
        return st.Condition(ADAPTERS_READY, st.TRUE, "Loaded", tally)
    if not ready:
        return st.Condition(ADAPTERS_READY, st.FALSE, "NoReadyReplicas", f"no ready replica to load adapters into; {tally}")
    unknown = [s for s in statuses if s.get("unknownReplicas")]
    caching = [s for s in statuses if s.get("state") == CACHING]
    if caching:
        names = ", ".join(f"{s['name']} ({s['model']}@{s['revision']})" for s in caching)
        return st.Condition(ADAPTERS_READY, st.FALSE, CACHING, f"caching {names}; {tally}")
    if unknown:
        return st.Condition(ADAPTERS_READY, st.UNKNOWN, NOT_ANSWERING,
                            f"{unknown[0]['unknownReplicas']} of {len(ready)} ready replicas did not answer /status on "
                            f"the metrics port, so it is unknown whether their adapters are loaded; {tally}")  # fmt: skip
    loading = [s for s in statuses if s.get("state") != LOADED]
    words = ", ".join(f"{s['name']} on {s['loadedReplicas']}/{len(ready)}" for s in loading)
    return st.Condition(ADAPTERS_READY, st.FALSE, LOADING, f"loading {words}; {tally}")


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """A Warning per adapter that has just failed (or failed for a new reason); Normal when all are loaded."""
    before = {str(e.get("name")): e for e in old.get("adapters") or [] if isinstance(e, Mapping)}
    events: list[Event] = []
    for entry in new.get("adapters") or []:
        error = entry.get("lastError") or {}
        if entry.get("state") not in (FAILED_STATE, CACHE_FAILED) or not error:
            continue
        was = before.get(str(entry.get("name"))) or {}
        if was.get("state") == entry.get("state") and (was.get("lastError") or {}).get("reason") == error.get("reason"):
            continue
        reason = "AdapterCacheFailed" if entry.get("state") == CACHE_FAILED else "AdapterFailed"
        events.append(Event("Warning", reason, f"{error.get('reason')}: {error.get('message')}"))
    if st.transitioned_to(old.get("conditions") or [], new.get("conditions") or [], ADAPTERS_READY, st.TRUE):
        cond = st.find(new.get("conditions"), ADAPTERS_READY) or {}
        if cond.get("reason") == "Loaded":
            events.append(Event("Normal", "AdaptersLoaded", str(cond.get("message"))))
    return events



def with_adapters_status(
    status: JSON, step: AdaptersStep, *, generation: int | None, now: datetime.datetime
) -> JSON:
    """``status`` with ``adapters`` and the AdaptersReady condition (both gone without spec.adapters)."""
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != ADAPTERS_READY]
    status = {k: v for k, v in status.items() if k != "adapters"}
    if step.condition is None or step.statuses is None:
        status["conditions"] = conditions
        return status
    old = [c for c in status.get("conditions") or [] if c.get("type") == ADAPTERS_READY]
    merged = st.merge_conditions(old, [step.condition], generation=generation, now=now)
    status["conditions"] = conditions + merged
    status["adapters"] = step.statuses
    if step.deploy_hold is not None and status.get("phase") == st.LOADING:  # nothing is rolling out yet
        status["phase"], status["message"] = st.CACHING, step.deploy_hold.why
    return status
