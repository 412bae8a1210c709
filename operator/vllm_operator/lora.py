"""Pure builders for a VLLMModel's LoRA adapters (``spec.adapters``), shared by the plan and ``render``.

- **Cache**: one cache Job per adapter repo and revision, the same Job as the base model's (``vllm-runtime
  cache --model <adapter repo> --revision <rev>``, same volume, same token, same summary in its termination
  message), named like it (``<name>-cache-<8 hex of sha256("<adapter repo>@<revision>")>``) and annotated
  ``vllm-operator.io/adapter``. A Job is immutable and says exactly what it caches; adding or changing one
  adapter runs one small Job and never touches the base model's Job (or the other adapters'). ``pvc://``
  adapters are read from their claim and need no Job.
- **The desired set**: the ConfigMap ``<name>-adapters``, key ``adapters.json``
  (``{"adapters": [{"name", "model", "commit", "revision"}]}``, the format ``vllm-runtime serve
  --adapters-file`` reads, ``vllm_runtime.adapters.desired``), holding only adapters whose commit is
  resolved (cached and verified). It is mounted as a whole volume (no ``subPath``, so the kubelet swaps
  its content in place) at ``ADAPTERS_MOUNT``: the pod template depends on whether ``spec.adapters`` is
  set, never on the set, so adapter changes restart nothing.
- **vLLM's LoRA limits** are fixed when vLLM starts and always passed explicitly: ``maxLoras`` (default 4),
  ``maxCpuLoras`` (default max(32, maxLoras)), ``maxLoraRank`` (the spec's, else the smallest rank vLLM
  accepts that holds every adapter rank known from the adapters' caches (``adapter_config.json``), at least
  vLLM's 16; the plan keeps the value a Deployment already runs with, so a later adapter never changes it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_runtime import layout
from vllm_runtime.adapters.checks import VLLM_DEFAULT_MAX_LORA_RANK, VLLM_LORA_RANKS, smallest_vllm_rank

from . import builders
from .config import Config
from .model import VLLMModel

ANNOTATION_ADAPTER = builders.ANNOTATION_PREFIX + "adapter"  # on an adapter's cache Job: the adapter's name
ADAPTERS_VOLUME = "adapters"
ADAPTERS_MOUNT = "/etc/vllm-runtime/adapters"
ADAPTERS_KEY = "adapters.json"
ADAPTERS_FILE = f"{ADAPTERS_MOUNT}/{ADAPTERS_KEY}"

DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_CPU_LORAS = 32


@dataclass(frozen=True)
class Adapter:
    """One ``spec.adapters`` entry."""

    name: str
    model: str
    revision: str

    @property
    def source(self) -> layout.ModelSource:
        return layout.parse_model(self.model)

    @property
    def is_hub(self) -> bool:
        return self.source.is_hub


@dataclass(frozen=True)
class LoraLimits:
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int

    def args(self) -> list[str]:
        """``vllm-runtime serve``'s flags for them (serve passes vLLM's --max-loras & co.)."""
        return ["--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank),
                "--max-cpu-loras", str(self.max_cpu_loras)]  # fmt: skip


def enabled(model: VLLMModel) -> bool:
    """``spec.adapters`` is set (even to []): vLLM runs with LoRA and the adapters file."""
    return model.spec.get("adapters") is not None


def adapters_of(model: VLLMModel) -> list[Adapter]:
    return [
        Adapter(str(a["name"]), str(a["model"]), str(a.get("revision") or "main"))
        for a in model.spec.get("adapters") or []
        if isinstance(a, Mapping) and a.get("name") and a.get("model")
    ]


# --- cache Jobs --------------------------------------------------------------------------------------


def as_model(model: VLLMModel, adapter: Adapter) -> VLLMModel:
    """The model as its adapter's cache Job sees it: the adapter's repo and revision, the model's cache
    volume, token, image, env and placement, no memory planning (no ``spec.gpu``)."""
    spec = {k: v for k, v in model.spec.items() if k not in ("gpu", "adapters")}
    spec.update(model=adapter.model, revision=adapter.revision)
    return dataclasses.replace(model, spec=spec, source=adapter.source, status={})


def adapter_job_name(model: VLLMModel, adapter: Adapter) -> str:
    return builders.cache_job_name(as_model(model, adapter))


def adapter_cache_job_for(
    model: VLLMModel, config: Config, adapter: Adapter, *, claim_uid: str | None = None, ttl_seconds: int | None = None
) -> dict[str, Any]:
    """The cache Job of one Hub adapter at its revision (``builders.cache_job_for`` of ``as_model``)."""
    job = builders.cache_job_for(as_model(model, adapter), config, claim_uid=claim_uid, ttl_seconds=ttl_seconds)
    job["metadata"]["annotations"][ANNOTATION_ADAPTER] = adapter.name
    return job


def hub_adapters(model: VLLMModel) -> list[Adapter]:
    """The adapters that are cached by a Job, one per Job (two names for one repo@revision share it)."""
    seen: set[str] = set()
    out = []
    for adapter in adapters_of(model):
        if adapter.is_hub and (name := adapter_job_name(model, adapter)) not in seen:
            seen.add(name)
            out.append(adapter)
    return out


# --- the adapters file -------------------------------------------------------------------------------


def config_map_name(model: VLLMModel) -> str:
    return f"{model.name}-adapters"


def file_entries(
    model: VLLMModel, commits: Mapping[str, str], previous: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, str]]:
    """The adapters file's entries in spec order: every ``pvc://`` adapter, and each Hub adapter whose commit
    ``commits`` (by adapter name) knows. A Hub adapter without one keeps its ``previous`` entry (the file's
    current one, at the commit it was cached at) while its new revision is cached, as the base model's
    Deployment keeps serving its commit; an adapter never cached is not served yet."""
    entries: list[dict[str, str]] = []
    for adapter in adapters_of(model):
        entry = {"name": adapter.name, "model": adapter.model, "revision": adapter.revision}
        if adapter.is_hub:
            commit = commits.get(adapter.name)
            old = (previous or {}).get(adapter.name) or {}
            if not commit and isinstance(old.get("commit"), str) and layout.is_commit(str(old["commit"])):
                entries.append({k: str(old[k]) for k in ("name", "model", "revision", "commit") if old.get(k)})
                continue
            if not commit:
                continue
            entry["commit"] = commit
        entries.append(entry)
    return entries


def file_content(entries: Sequence[Mapping[str, str]]) -> str:
    return json.dumps({"adapters": [dict(e) for e in entries]}, sort_keys=True)  # one line: readable in YAML


def config_map_for(model: VLLMModel, entries: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """The ConfigMap the serving pods mount; its content changes in place (no restart)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": builders.child_metadata(model, config_map_name(model), builders.COMPONENT_SERVER),
        "data": {ADAPTERS_KEY: file_content(entries)},
    }


def read_file_entries(config_map: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The entries of an observed adapters ConfigMap ([] when absent or unreadable)."""
    text = ((config_map or {}).get("data") or {}).get(ADAPTERS_KEY)
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return []
    items = data.get("adapters") if isinstance(data, dict) else None
    return [dict(i) for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def status_commits(model: VLLMModel) -> dict[str, str]:
    """Adapter name -> the commit ``status.adapters`` records as cached for the spec's model and revision."""
    wanted = {a.name: a for a in adapters_of(model)}
    commits: dict[str, str] = {}
    for entry in model.status.get("adapters") or []:
        if not isinstance(entry, Mapping):
            continue
        adapter = wanted.get(str(entry.get("name")))
        commit = entry.get("commit")
        if (adapter is not None and entry.get("model") == adapter.model and entry.get("revision") == adapter.revision
                and isinstance(commit, str) and layout.is_commit(commit)):  # fmt: skip
            commits[adapter.name] = commit
    return commits


# --- the serving pods ----------------------------------------------------------------------------------


def known_ranks(model: VLLMModel) -> list[int]:
    """The adapters' LoRA ranks ``status.adapters`` knows (from each cache's adapter_config.json)."""
    names = {a.name for a in adapters_of(model)}
    ranks = []
    for entry in model.status.get("adapters") or []:
        rank = entry.get("rank") if isinstance(entry, Mapping) else None
        if isinstance(entry, Mapping) and entry.get("name") in names and isinstance(rank, int) and rank > 0:
            ranks.append(rank)
    return ranks


def default_rank(ranks: Iterable[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts holding every rank, at least vLLM's default (16)."""
    fitting = [r for r in ranks if r <= VLLM_LORA_RANKS[-1]]
    return max([VLLM_DEFAULT_MAX_LORA_RANK, *(smallest_vllm_rank(r) for r in fitting)])


def limits(model: VLLMModel) -> LoraLimits:
    """vLLM's LoRA limits: the spec's, else the defaults (the module's docstring)."""
    loras = int(model.spec.get("maxLoras") or DEFAULT_MAX_LORAS)
    rank = model.spec.get("maxLoraRank")
    cpu = int(model.spec.get("maxCpuLoras") or max(DEFAULT_MAX_CPU_LORAS, loras))
    return LoraLimits(loras, int(rank) if rank else default_rank(known_ranks(model)), cpu)


def running_rank(deployment: Mapping[str, Any] | None) -> int | None:
    """The ``--max-lora-rank`` a Deployment's server runs with (None: none, or no Deployment)."""
    for container in (((deployment or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get(
            "containers") or []:  # fmt: skip
        args = [str(a) for a in container.get("args") or []]
        if container.get("name") == builders.SERVER_CONTAINER and "--max-lora-rank" in args:
            index = args.index("--max-lora-rank") + 1
            return int(args[index]) if index < len(args) and args[index].isdigit() else None
    return None


def with_running_rank(model: VLLMModel, deployment: Mapping[str, Any] | None) -> VLLMModel:
    """The model with ``maxLoraRank`` pinned to what its Deployment runs with, unless the spec sets it: a
    new adapter's rank never changes the pod template (an adapter above it fails, naming the fix)."""
    rank = running_rank(deployment)
    if not enabled(model) or model.spec.get("maxLoraRank") or rank is None:
        return model
    return dataclasses.replace(model, spec={**model.spec, "maxLoraRank": rank})


def serve_args(model: VLLMModel) -> list[str]:
    """``vllm-runtime serve`` flags for LoRA ([] without ``spec.adapters``)."""
    if not enabled(model):
        return []
    return ["--adapters-file", ADAPTERS_FILE, *limits(model).args()]


def adapter_claims(model: VLLMModel) -> list[str]:
    """Claims of ``pvc://`` adapters that the pods must mount besides the base model's (sorted)."""
    claims = {a.source.claim for a in adapters_of(model) if a.source.claim}
    return sorted(c for c in claims if c and c != model.source.claim)


def pod_volumes(model: VLLMModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, the server container's mounts) for LoRA: the adapters ConfigMap, and any claim of a
    ``pvc://`` adapter (read-only at /models/<claim>; adding one restarts the pods, a pod's volumes are fixed)."""
    if not enabled(model):
        return [], []
    volumes: list[dict[str, Any]] = [{"name": ADAPTERS_VOLUME, "configMap": {"name": config_map_name(model)}}]
    mounts: list[dict[str, Any]] = [{"name": ADAPTERS_VOLUME, "mountPath": ADAPTERS_MOUNT, "readOnly": True}]
    for index, claim in enumerate(adapter_claims(model)):
        volumes.append({"name": f"adapter-claim-{index}",
                        "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})  # fmt: skip
        mounts.append({"name": f"adapter-claim-{index}", "mountPath": f"{layout.MODELS_MOUNT_ROOT}/{claim}",
                       "readOnly": True})  # fmt: skip
    return volumes, mounts
