"""Converge vLLM's loaded adapters to the desired set in the adapters file, without restarting vLLM.

``AdapterConverger.step()`` is one pass (tests drive it directly); ``run()`` repeats it every
``poll_interval`` seconds in ``serve``'s background thread. A pass:

1. re-reads the file when its signature (inode, size, mtime) changed: a ConfigMap volume's update is an
   atomic symlink swap, so a changed file is read whole; a file that cannot be used keeps the last set;
2. unloads adapters no longer desired (``POST /v1/unload_lora_adapter``; 404 counts as done);
3. for each desired adapter not loaded at its commit, once its retry time has come: finds the VERIFIED
   cache of that commit (completion manifest, file sizes) or refuses, checks it against the base model
   (``checks``), takes a cache lease, and loads it (``POST /v1/load_lora_adapter``; in place when only the
   commit changed, so requests never see the adapter missing).

Failures: ``retryable`` reasons (not cached yet, vLLM busy) back off exponentially (1 s doubling to 60 s);
permanent ones wait until the adapter's entry changes (a new commit or model), since the same files into
the same server give the same answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from vllm_runtime import layout
from vllm_runtime.adapters import checks, errors
from vllm_runtime.adapters.desired import AdaptersFileError, DesiredAdapter, file_signature, read_adapters_file
from vllm_runtime.planner.sources import TensorSpec

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
HTTP_TIMEOUT_SECONDS = 120.0  # a load reads the weights; large adapters on a busy server take a while

LOADED, PENDING, FAILED = "Loaded", "Pending", "Failed"


class AdapterMetricsSink(Protocol):
    def adapter_loaded(self, name: str, loaded: bool) -> None: ...
    def adapter_removed(self, name: str) -> None: ...
    def adapter_load_seconds(self, name: str, seconds: float) -> None: ...
    def adapter_unload_seconds(self, name: str, seconds: float) -> None: ...
    def adapter_failure(self, name: str, reason: str) -> None: ...


class NoMetrics:
    def adapter_loaded(self, name: str, loaded: bool) -> None: ...
    def adapter_removed(self, name: str) -> None: ...
    def adapter_load_seconds(self, name: str, seconds: float) -> None: ...
    def adapter_unload_seconds(self, name: str, seconds: float) -> None: ...
    def adapter_failure(self, name: str, reason: str) -> None: ...


class VllmAdapterAPI:
    """vLLM's runtime adapter endpoints (enabled by VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""

    def __init__(self, base_url: str, timeout: float = HTTP_TIMEOUT_SECONDS) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _post(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        request = urllib.request.Request(  # noqa: S310 - loopback URL we build
            self.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:  # noqa: S310
                return int(resp.status), resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode("utf-8", "replace")

    def load(self, name: str, path: Path, *, in_place: bool) -> None:
        try:
            status, body = self._post(
                "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), "load_inplace": in_place}
            )
        except (urllib.error.URLError, OSError) as exc:
            raise errors.VllmUnavailable(name, f"vLLM's adapter API did not answer ({exc}); retrying") from None
        if status >= 400:
            raise errors.classify_vllm_error(name, status, body)

    def unload(self, name: str) -> None:
        try:
            status, body = self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except (urllib.error.URLError, OSError) as exc:
            raise errors.VllmUnavailable(name, f"vLLM's adapter API did not answer ({exc}); retrying") from None
        if status >= 400 and status != 404:  # 404: not loaded, which is what we wanted
            raise errors.classify_vllm_error(name, status, body)


@dataclass
class AdapterState:
    """One adapter as the runtime sees it; ``to_status`` is its entry in ``/status``."""

    desired: DesiredAdapter
    state: str = PENDING
    reason: str | None = None
    message: str | None = None
    retryable: bool = False
    attempts: int = 0
    next_attempt: float = 0.0  # monotonic; inf: not until the entry changes
    load_seconds: float | None = None
    loaded_at: str | None = None
    loaded_key: tuple[str, str, str | None] | None = None  # the entry whose files vLLM holds
    rank: int | None = None
    bytes: int | None = None
    path: str | None = None

    def to_status(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.desired.name, "model": self.desired.model, "commit": self.desired.commit,
            "revision": self.desired.revision, "state": self.state, "loaded": self.state == LOADED,
            "reason": self.reason, "message": self.message, "retryable": self.retryable, "attempts": self.attempts,
            "loadSeconds": self.load_seconds, "loadedAt": self.loaded_at, "rank": self.rank, "bytes": self.bytes,
        }  # fmt: skip
        if self.state == FAILED and self.retryable and self.next_attempt != float("inf"):
            out["nextAttemptSeconds"] = round(max(0.0, self.next_attempt - now), 1)
        return out


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Leases:
    """Cache leases on the adapters' commits (``cache.usage``), so ``gc``/``rm`` keep what serve names."""

    cache_dir: Path | None
    held: set[tuple[str, str]] = field(default_factory=set)

    def take(self, repo_id: str, commit: str) -> bool:
        if self.cache_dir is None:
            return True
        from vllm_runtime.cache.usage import lease_if_complete

        try:
            ok = lease_if_complete(self.cache_dir, repo_id, commit)
        except (OSError, TimeoutError) as exc:  # read-only volume, busy lock: loading matters more
            log.warning("cannot mark adapter %s@%s in use: %s", repo_id, commit, exc)
            return True
        if ok:
            self.held.add((repo_id, commit))
        return ok

    def renew(self) -> None:
        if self.cache_dir is None:
            return
        from vllm_runtime.cache.usage import mark_in_use

        for repo_id, commit in sorted(self.held):
            try:
                mark_in_use(self.cache_dir, repo_id, commit)
            except OSError as exc:
                log.warning("cannot renew the lease on adapter %s@%s: %s", repo_id, commit, exc)

    def release(self, repo_id: str, commit: str) -> None:
        if self.cache_dir is None or (repo_id, commit) not in self.held:
            return
        from vllm_runtime.cache.usage import release

        self.held.discard((repo_id, commit))
        try:
            release(self.cache_dir, repo_id, commit)
        except OSError:
            pass

    def release_all(self) -> None:
        for repo_id, commit in sorted(self.held):
            self.release(repo_id, commit)


def cached_adapter_dir(cache_dir: Path | None, desired: DesiredAdapter) -> tuple[Path, int | None]:
    """The directory to load from and its verified size: the manifest's snapshot for a Hub adapter
    (refused unless complete and matching), the claim's directory for pvc://."""
    if not desired.is_hub:
        source = layout.parse_model(desired.model)
        directory = Path(desired.model) if desired.model.startswith("/") else Path(source.local_dir())
        if not directory.is_dir():
            raise errors.AdapterFilesMissing(desired.name, f"{directory} is not a directory: check the claim and path")
        return directory, None
    from vllm_runtime.cache import read_manifest
    from vllm_runtime.cache.manifest import snapshot_matches

    assert desired.commit is not None
    hint = (
        f"run `vllm-runtime cache --model {desired.model} --revision {desired.commit} --cache-dir {cache_dir}` "
        "(the operator's cache Job does this)"
    )
    if cache_dir is None:
        raise errors.AdapterNotCached(desired.name, f"no cache volume to load {desired.model} from: {hint}")
    manifest = read_manifest(cache_dir, desired.model, desired.commit)
    if manifest is None or not manifest.get("verified"):
        raise errors.AdapterNotCached(
            desired.name, f"{desired.model}@{desired.commit} has no completed, verified cache yet: {hint}"
        )
    if not snapshot_matches(cache_dir, manifest):
        raise errors.AdapterNotCached(
            desired.name, f"the cached files of {desired.model}@{desired.commit} no longer match its manifest: {hint}"
        )
    return layout.CacheLayout(cache_dir).snapshot_dir(desired.model, desired.commit), int(manifest.get("bytes", 0))


class AdapterConverger:
    """Keeps vLLM's adapters equal to the adapters file; thread-safe ``status()``."""

    def __init__(
        self,
        *,
        adapters_file: Path,
        api: VllmAdapterAPI,
        cache_dir: Path | None,
        base_config: dict[str, Any],
        max_lora_rank: int,
        base_tensors: dict[str, TensorSpec] | None = None,
        served_names: tuple[str, ...] = (),
        is_ready: Callable[[], bool] = lambda: True,
        metrics: AdapterMetricsSink | None = None,
        poll_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        limits: dict[str, int] | None = None,
    ) -> None:
        self.adapters_file = adapters_file
        self.api = api
        self.cache_dir = cache_dir
        self.base_config = base_config
        self.base_tensors = base_tensors
        self.max_lora_rank = max_lora_rank
        self.served_names = served_names
        self.is_ready = is_ready
        self.metrics: AdapterMetricsSink = metrics or NoMetrics()
        self.poll_interval = poll_interval
        self.clock = clock
        self.limits = dict(limits or {})
        self.leases = Leases(cache_dir)
        self.states: dict[str, AdapterState] = {}
        self._removed: list[AdapterState] = []  # unloads still to do (retried until vLLM answers)
        self.digest: str | None = None
        self.file_error: str | None = None
        self.last_pass: str | None = None
        self._signature: tuple[int, int, int] | None | bool = False  # False: never read
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- the desired set
    def refresh(self) -> bool:
        """Re-read the file if it changed; True when the desired set changed."""
        signature = file_signature(self.adapters_file)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            digest, desired = read_adapters_file(self.adapters_file, served_names=self.served_names)
        except AdaptersFileError as exc:
            with self._lock:
                self.file_error = str(exc)
            log.error("adapters file: %s (keeping the last good set)", exc)
            return False
        with self._lock:
            self.file_error = None
            if digest == self.digest:
                return False
            self.digest = digest
            current = self.states
            fresh: dict[str, AdapterState] = {}
            for entry in desired:
                if entry.name in fresh:  # a duplicate: keep the first one's state, the duplicate is refused
                    continue
                old = current.get(entry.name)
                if old is not None and old.desired == entry:
                    fresh[entry.name] = old
                else:
                    state = AdapterState(desired=entry)
                    if old is not None:  # same name, new files: vLLM still holds the old ones until reloaded
                        state.loaded_key, state.rank = old.loaded_key, old.rank
                    fresh[entry.name] = state
            self._removed = [s for name, s in current.items() if name not in fresh and s.loaded_key is not None]
            never_loaded = [name for name, s in current.items() if name not in fresh and s.loaded_key is None]
            self.states = fresh
        for name in never_loaded:  # nothing to unload: its series goes now (loaded ones' after the unload)
            self.metrics.adapter_removed(name)
        log.info("adapters file %s: %d adapter(s) desired (%s)", self.adapters_file, len(desired),
                 ", ".join(e.name for e in desired) or "none")
        return True

    # -- one pass
    def step(self) -> None:
        self.refresh()
        if not self.is_ready():
            return
        with self._lock:
            removed, self._removed = self._removed, []
            todo = [s for s in self.states.values() if s.loaded_key != s.desired.key and s.next_attempt <= self.clock()]
        for state in removed:
            self._unload(state)
        for state in todo:
            self._load(state)
        with self._lock:
            self.last_pass = _now()

    def _unload(self, state: AdapterState) -> None:
        name = state.desired.name
        began = time.monotonic()
        try:
            self.api.unload(name)
        except errors.AdapterError as exc:
            log.warning("unloading adapter %s failed (%s): %s; retrying", name, exc.reason, exc.message)
            with self._lock:
                if name not in self.states:
                    self._removed.append(state)
            return
        seconds = time.monotonic() - began
        self.metrics.adapter_unload_seconds(name, seconds)
        self.metrics.adapter_removed(name)
        if state.loaded_key is not None and state.loaded_key[2] is not None:
            self.leases.release(state.loaded_key[1], state.loaded_key[2])
        log.info("unloaded adapter %s in %.2f s", name, seconds)

    def _load(self, state: AdapterState) -> None:
        entry = state.desired
        began = time.monotonic()
        try:
            if entry.problem is not None:
                raise errors.InvalidAdapterEntry(entry.name, entry.problem)
            directory, size = cached_adapter_dir(self.cache_dir, entry)
            facts = checks.read_adapter_facts(directory, entry.name)
            state.rank, state.bytes = facts.rank, size
            checks.check_adapter(
                facts, adapter=entry.name, max_lora_rank=self.max_lora_rank, base_config=self.base_config,
                base_tensors=self.base_tensors, served_model=self.served_names[0] if self.served_names else "",
            )  # fmt: skip
            if entry.is_hub and entry.commit and not self.leases.take(entry.model, entry.commit):
                raise errors.AdapterNotCached(entry.name, f"{entry.model}@{entry.commit} was removed from the cache")
            self.api.load(entry.name, directory, in_place=state.loaded_key is not None)
        except errors.AdapterError as exc:
            self._failed(state, exc)
            return
        seconds = time.monotonic() - began
        previous = state.loaded_key
        with self._lock:
            state.state, state.reason, state.message, state.retryable = LOADED, None, None, False
            state.attempts, state.next_attempt = 0, 0.0
            state.load_seconds, state.loaded_at = round(seconds, 3), _now()
            state.loaded_key, state.path = entry.key, str(directory)
        if previous is not None and previous != entry.key and previous[2] and previous[1:] != entry.key[1:]:
            self.leases.release(previous[1], previous[2])
        self.metrics.adapter_load_seconds(entry.name, seconds)
        self.metrics.adapter_loaded(entry.name, True)
        log.info("loaded adapter %s (%s@%s, rank %s) in %.2f s", entry.name, entry.model, entry.commit, state.rank,
                 seconds)

    def _failed(self, state: AdapterState, exc: errors.AdapterError) -> None:
        with self._lock:
            first = state.reason != exc.reason
            state.state, state.reason, state.message, state.retryable = FAILED, exc.reason, exc.message, exc.retryable
            state.attempts += 1
            delay = min(RETRY_FIRST_SECONDS * 2 ** (state.attempts - 1), RETRY_MAX_SECONDS)
            state.next_attempt = self.clock() + delay if exc.retryable else float("inf")
        self.metrics.adapter_failure(state.desired.name, exc.reason)
        self.metrics.adapter_loaded(state.desired.name, state.loaded_key == state.desired.key)
        (log.error if first else log.debug)("adapter %s not loaded (%s): %s", state.desired.name, exc.reason,
                                           exc.message)

    # -- loop
    def run(self, renew_every: float = 120.0) -> None:
        renewed = time.monotonic()
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a bug here must not stop serving the base model
                log.exception("adapter converger pass failed")
            if time.monotonic() - renewed >= renew_every:
                renewed = time.monotonic()
                self.leases.renew()
            self._stop.wait(self.poll_interval)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="adapters", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self.leases.release_all()

    # -- status
    def status(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            items = [s.to_status(now) for s in self.states.values()]
            return {
                "file": str(self.adapters_file),
                "fileDigest": self.digest,
                "fileError": self.file_error,
                "desired": len(items),
                "loaded": sum(1 for i in items if i["loaded"]),
                "failed": sum(1 for i in items if i["state"] == FAILED),
                "converged": self.file_error is None and all(i["loaded"] for i in items),
                "maxLoraRank": self.max_lora_rank,
                **self.limits,
                "lastPass": self.last_pass,
                "items": items,
            }
