"""Prometheus metrics of ``vllm-runtime serve``: start-up phases, GPU and process memory, cache facts.

One scrape of the runtime's metrics port sees everything about a model pod: the runtime's own
registry (this module) followed by vLLM's ``/metrics`` relayed as-is (``MetricsHTTPServer``).

GPU memory comes from NVML (nvidia-ml-py). Without a GPU or the NVML library nothing fails:
``vllm_runtime_gpu_metrics_available`` is 0 and the per-GPU series are absent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Start-up phases, in the order vLLM reaches them (``healthy`` is observed by the runtime itself).
PHASES = ("weights_loaded", "compile_done", "kv_cache_allocated", "healthy")


@dataclass(frozen=True)
class GpuMemory:
    """One device's memory as NVML reports it (bytes)."""

    index: int
    name: str
    uuid: str
    total: int
    free: int
    used: int
    reserved: int  # held by the driver and firmware; 0 where NVML only has the v1 call


class Nvml:
    """Lazily initialised NVML; every call degrades to "no GPU information" instead of raising."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialised: bool | None = None  # None: not tried yet
        self.error: str | None = None

    def available(self) -> bool:
        with self._lock:
            if self._initialised is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._initialised = True
                except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError ...
                    self._initialised = False
                    self.error = f"{type(exc).__name__}: {exc}"
                    log.info("GPU metrics unavailable (%s)", self.error)
            return self._initialised

    def devices(self) -> list[GpuMemory] | None:
        """Memory of every visible GPU, or None when NVML is unusable."""
        if not self.available():
            return None
        import pynvml

        try:
            out = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                out.append(
                    GpuMemory(
                        index=index,
                        name=_text(pynvml.nvmlDeviceGetName(handle)),
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        **_memory_info(pynvml, handle),
                    )
                )
            return out
        except Exception as exc:  # a GPU fell off the bus, the driver went away: report absence
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("reading GPU memory through NVML failed: %s", self.error)
            return None


def _memory_info(pynvml: Any, handle: Any) -> dict[str, int]:
    """Prefer NVML's v2 memory call: its ``used`` excludes driver-reserved memory, as CUDA's does."""
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return {"total": int(info.total), "free": int(info.free), "used": int(info.used), "reserved": int(info.reserved)}
    except Exception:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"total": int(info.total), "free": int(info.free), "used": int(info.used), "reserved": 0}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_default_nvml = Nvml()


def visible_gpus(devices: Sequence[GpuMemory], env: Mapping[str, str]) -> list[GpuMemory] | None:
    """The GPUs this process may use, in CUDA's numbering, out of the devices NVML lists.

    ``NVIDIA_VISIBLE_DEVICES`` is what the container runtime exposed (Kubernetes' device plugin sets
    it to the pod's GPUs; NVML inside such a container lists only those, renumbered from 0), and
    ``CUDA_VISIBLE_DEVICES`` narrows that for the process. Both hold indices or (prefixes of) UUIDs;
    like CUDA, selection stops at the first entry that names no device. None for MIG instances:
    NVML's device list shows the whole GPU's memory, not the instance's, so it cannot be checked.
    """
    selected = list(devices)
    exposed = env.get("NVIDIA_VISIBLE_DEVICES")
    if exposed is not None and exposed.strip() not in ("", "all"):
        if exposed.strip() in ("none", "void"):
            return []
        ids = _device_ids(exposed)
        if any(i.startswith("MIG-") for i in ids):
            return None
        already_filtered = len(ids) == len(selected) and all(i.isdigit() for i in ids)  # host indices
        if not already_filtered:
            selected = _select_devices(selected, ids)
    narrowed = env.get("CUDA_VISIBLE_DEVICES")
    if narrowed is not None:
        ids = _device_ids(narrowed)
        if any(i.startswith("MIG-") for i in ids):
            return None
        selected = _select_devices(selected, ids)
    return selected


def _device_ids(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _select_devices(devices: Sequence[GpuMemory], ids: Sequence[str]) -> list[GpuMemory]:
    out: list[GpuMemory] = []
    for ident in ids:
        if ident.lstrip("-").isdigit():
            index = int(ident)
            match = devices[index] if 0 <= index < len(devices) else None
        else:
            wanted = ident if ident.startswith("GPU-") else "GPU-" + ident
            match = next((d for d in devices if d.uuid.startswith(wanted)), None)
        if match is None:
            break  # CUDA ignores an unknown entry and everything after it
        if match not in out:
            out.append(match)
    return out


def accelerator_type(nvml: Nvml | None = None) -> str:
    """The accelerator serving runs on, for the compile-cache key: the first GPU's name, or ``cpu``."""
    devices = (nvml or _default_nvml).devices()
    if not devices:
        return "cpu"
    names = sorted({d.name for d in devices})
    return "+".join(names).replace(" ", "-")


def process_tree_rss(pid: int) -> int | None:
    """Resident memory of a process and all its descendants (vLLM runs its engine in child processes).

    On Linux from /proc: the tree through each thread's ``children`` file and each process's ``statm``, which
    reads only the tree. psutil's ``children(recursive=True)`` reads every process of the machine, a cost that
    grows with the node's process count and lands on every scrape (bench/autoscaling_bench.py).
    """
    linux = _proc_tree_rss(pid)
    if linux is not None:
        return linux
    import psutil  # imported here: the GPU check runs this module where psutil may be absent

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue  # exited between listing and reading
    return total


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_tree_rss(pid: int) -> int | None:
    """``process_tree_rss`` from /proc; None where /proc has no ``children`` files (not Linux, or a kernel
    without CONFIG_PROC_CHILDREN) or ``pid`` is gone."""
    root = Path("/proc") / str(pid)
    if not (root / "task" / str(pid) / "children").exists():
        return None
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            total += int((Path("/proc") / str(current) / "statm").read_text().split()[1]) * _PAGE_SIZE
            tasks = list((Path("/proc") / str(current) / "task").iterdir())
        except (OSError, IndexError, ValueError):
            if current == pid:
                return None
            continue  # exited between listing and reading
        for task in tasks:
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    return total


class _MemoryCollector(Collector):
    """Reads GPU and vLLM process memory at scrape time, so the numbers are never stale."""

    def __init__(self, nvml: Nvml, vllm_pid: Callable[[], int | None]) -> None:
        self._nvml = nvml
        self._vllm_pid = vllm_pid

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self._nvml.devices()
        yield GaugeMetricFamily(
            "vllm_runtime_gpu_metrics_available",
            "1 when GPU memory is read through NVML; 0 without a GPU or the NVML library",
            value=1 if devices is not None else 0,
        )
        if devices is not None:
            families = {
                field: GaugeMetricFamily(
                    f"vllm_runtime_gpu_memory_{field}_bytes", f"GPU memory {field} (NVML)", labels=["gpu"]
                )
                for field in ("used", "free", "total", "reserved")
            }
            info = GaugeMetricFamily("vllm_runtime_gpu_info", "GPUs seen by NVML", labels=["gpu", "name", "uuid"])
            for d in devices:
                for field, family in families.items():
                    family.add_metric([str(d.index)], getattr(d, field))
                info.add_metric([str(d.index), d.name, d.uuid], 1)
            yield from families.values()
            yield info
        pid = self._vllm_pid()
        rss = process_tree_rss(pid) if pid else None
        if rss is not None:
            yield GaugeMetricFamily(
                "vllm_runtime_vllm_resident_memory_bytes",
                "Resident memory of the vLLM server and its engine processes",
                value=rss,
            )


class LateGauge(Collector):
    """A gauge without labels that is absent from the exposition until it is first set."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = float(value)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=self.value)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation)


ADAPTER_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The runtime's own registry for ``serve`` (no default process collectors: vLLM's relayed
    output already has ``process_*`` series for the server, and names must not repeat)."""

    def __init__(self, *, nvml: Nvml | None = None, vllm_pid: Callable[[], int | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.startup_phase_seconds = Gauge(
            "vllm_runtime_startup_phase_seconds",
            "Seconds from the start of vllm-runtime serve until each start-up phase was reached",
            ["phase"],
            registry=r,
        )
        # Facts known only once vLLM reaches a point: absent from the scrape until then, never a fake 0.
        self.time_to_ready_seconds = LateGauge(
            "vllm_runtime_time_to_ready_seconds", "Seconds from start until vLLM was first ready", registry=r
        )
        self.ready = Gauge("vllm_runtime_ready", "1 while vLLM is healthy and lists the model", registry=r)
        self.vllm_reported_seconds = Gauge(
            "vllm_runtime_vllm_reported_seconds",
            "Durations vLLM logs during start-up (weights_load, torch_compile, init_engine)",
            ["step"],
            registry=r,
        )
        self.compile_cache_hit = LateGauge(
            "vllm_runtime_compile_cache_hit",
            "1 when vLLM loaded compiled graphs from the cache volume, 0 when it compiled",
            registry=r,
        )
        self.compile_cache_warm = Gauge(
            "vllm_runtime_compile_cache_warm",
            "1 when this configuration's compile directory on the volume held artifacts before start",
            registry=r,
        )
        self.kv_cache_tokens = LateGauge(
            "vllm_runtime_kv_cache_tokens", "KV cache capacity in tokens, as vLLM logged it", registry=r
        )
        self.max_concurrency = LateGauge(
            "vllm_runtime_max_concurrency",
            "Requests of max-model-len tokens that fit the KV cache at once, as vLLM logged it",
            registry=r,
        )
        self.cache_bytes = Gauge("vllm_runtime_cache_bytes", "Bytes of the cached model (manifest)", registry=r)
        self.cache_files = Gauge("vllm_runtime_cache_files", "Files of the cached model (manifest)", registry=r)
        self.cache_verification_seconds = Gauge(
            "vllm_runtime_cache_verification_seconds", "Seconds the cache spent verifying sha256 (manifest)", registry=r
        )
        self.cache_source_bytes = Gauge(
            "vllm_runtime_cache_source_bytes",
            "File bytes of the cached model by where the run that filled the volume got them (hub or sibling; "
            "manifest)", ["source"], registry=r,
        )
        self.vllm_metrics_up = Gauge(
            "vllm_runtime_vllm_metrics_up", "1 when the last relay of vLLM's /metrics succeeded", registry=r
        )
        self.vllm_metrics_age = LateGauge(
            "vllm_runtime_vllm_metrics_age_seconds",
            "Seconds since the relayed vLLM metrics below were read: about vLLM's answer time when read for "
            "this scrape; up to the refresh period (1 s) more when vLLM answered slower than the relay waits", r,
        )
        # LoRA adapters (serve --adapters-file); vLLM's own vllm:lora_requests_info is relayed unchanged.
        self.adapter_loaded_gauge = Gauge(
            "vllm_runtime_adapter_loaded", "1 while the adapter is loaded in vLLM at its desired commit",
            ["adapter"], registry=r,
        )
        self.adapter_load_duration = Histogram(
            "vllm_runtime_adapter_load_seconds", "Seconds to check and load an adapter into the running vLLM",
            ["adapter"], buckets=ADAPTER_SECONDS_BUCKETS, registry=r,
        )
        self.adapter_unload_duration = Histogram(
            "vllm_runtime_adapter_unload_seconds", "Seconds to unload an adapter from the running vLLM",
            ["adapter"], buckets=ADAPTER_SECONDS_BUCKETS, registry=r,
        )
        self.adapter_failures = Counter(
            "vllm_runtime_adapter_load_failures", "Failed adapter loads by reason (AdapterRankTooHigh, ...)",
            ["adapter", "reason"], registry=r,
        )
        self.start_time = time.monotonic()
        r.register(_MemoryCollector(nvml or _default_nvml, vllm_pid))

    # adapters.converge.AdapterMetricsSink
    def adapter_loaded(self, name: str, loaded: bool) -> None:
        self.adapter_loaded_gauge.labels(adapter=name).set(1 if loaded else 0)

    def adapter_removed(self, name: str) -> None:
        try:
            self.adapter_loaded_gauge.remove(name)
        except KeyError:
            pass

    def adapter_load_seconds(self, name: str, seconds: float) -> None:
        self.adapter_load_duration.labels(adapter=name).observe(seconds)

    def adapter_unload_seconds(self, name: str, seconds: float) -> None:
        self.adapter_unload_duration.labels(adapter=name).observe(seconds)

    def adapter_failure(self, name: str, reason: str) -> None:
        self.adapter_failures.labels(adapter=name, reason=reason).inc()

    def mark_phase(self, phase: str, seconds: float | None = None) -> float:
        """Record that ``phase`` was reached ``seconds`` after start (now when None); returns the value."""
        value = time.monotonic() - self.start_time if seconds is None else seconds
        self.startup_phase_seconds.labels(phase=phase).set(value)
        return value

    def set_cache_facts(self, manifest: dict[str, Any]) -> None:
        """Cache facts from the completion manifest (vllm_runtime.cache.manifest's fields)."""
        files = manifest.get("fileCount", manifest.get("files"))
        for value, gauge in (
            (manifest.get("bytes"), self.cache_bytes),
            (len(files) if isinstance(files, list) else files, self.cache_files),
            (manifest.get("verificationSeconds"), self.cache_verification_seconds),
        ):
            if isinstance(value, int | float) and not isinstance(value, bool):
                gauge.set(value)
        sources = manifest.get("sources")
        if isinstance(sources, dict):
            for source, key in (("hub", "hubBytes"), ("sibling", "siblingBytes")):
                value = sources.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    self.cache_source_bytes.labels(source=source).set(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def fetch_text(url: str, timeout: float = 2.0) -> str | None:
    """GET ``url`` and return the body, or None on any failure (for probes and relaying)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we build
            body: bytes = resp.read()
            return body.decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


RELAY_WAIT_SECONDS = 0.05  # how long a scrape waits for its own read of vLLM's /metrics
RELAY_REFRESH_SECONDS = 1.0  # how often the relay reads vLLM while the pod is scraped


@dataclass
class _Fetch:
    """One GET of vLLM's /metrics; scrapes that arrive while it runs wait on the same one."""

    started: float
    done: threading.Event
    body: str | None = None


class VllmMetricsRelay:
    """vLLM's ``/metrics`` for the runtime's scrape, without making every scrape as slow as a saturated vLLM.

    vLLM's API server renders ``/metrics`` in the process that also feeds the engine, so under full load it
    can take a few hundred milliseconds to answer. A scrape starts a read (one at a time: concurrent scrapes
    and the refresher share it) and waits ``wait_s`` for it. When vLLM is slower than that, the scrape gets
    the body of the last read that succeeded, if it is at most ``max_age_s`` old; the read in flight
    refreshes it. So that this body is recent, not a scrape interval old, a refresher reads vLLM every
    ``refresh_s`` while scrapes keep coming (none for ``idle_s``: it pauses). The body is vLLM's, byte for
    byte, either way; ``vllm_runtime_vllm_metrics_age_seconds`` says how old it is. Without a recent body the
    scrape waits for the read (``timeout_s``), and a vLLM that does not answer shows as no body.
    """

    def __init__(
        self,
        url: str,
        *,
        wait_s: float = RELAY_WAIT_SECONDS,
        timeout_s: float = 2.0,
        max_age_s: float = 10.0,
        refresh_s: float | None = RELAY_REFRESH_SECONDS,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.wait_s, self.timeout_s, self.max_age_s = wait_s, timeout_s, max_age_s
        self.refresh_s, self.idle_s = refresh_s, idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: _Fetch | None = None
        self._last_good: _Fetch | None = None
        self._last_asked: float | None = None
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None

    def _run(self, fetch: _Fetch) -> None:
        fetch.body = fetch_text(self.url, timeout=self.timeout_s)
        with self._lock:
            if fetch.body is not None:
                self._last_good = fetch
            self._inflight = None
        fetch.done.set()

    def _read(self) -> tuple[_Fetch, _Fetch | None]:
        """The read in flight (started now if there is none) and the last good one."""
        with self._lock:
            fetch = self._inflight
            if fetch is None:
                fetch = self._inflight = _Fetch(started=self._clock(), done=threading.Event())
                threading.Thread(target=self._run, args=(fetch,), name="vllm-metrics-relay", daemon=True).start()
            return fetch, self._last_good

    def refreshing(self) -> bool:
        """Whether the refresher reads vLLM now: a scrape came within ``idle_s``."""
        return self._last_asked is not None and self._clock() - self._last_asked <= self.idle_s

    def _refresh(self) -> None:
        assert self.refresh_s is not None
        while not self._closed.wait(self.refresh_s):
            if self.refreshing():
                self._read()

    def get(self) -> tuple[str | None, float]:
        """(vLLM's body or None when vLLM did not answer, the body's age in seconds)."""
        self._last_asked = self._clock()
        if self.refresh_s is not None and self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh, name="vllm-metrics-refresh", daemon=True)
            self._refresher.start()
        fetch, last_good = self._read()
        if not fetch.done.wait(self.wait_s):
            if last_good is not None and self._clock() - last_good.started <= self.max_age_s:
                return last_good.body, self._clock() - last_good.started
            fetch.done.wait(self.timeout_s)
        if not fetch.done.is_set() or fetch.body is None:
            return None, 0.0
        return fetch.body, self._clock() - fetch.started

    def close(self) -> None:
        self._closed.set()


class MetricsHTTPServer:
    """``/metrics`` (runtime registry + relayed vLLM metrics), ``/live`` and ``/ready`` on one port.

    Runs in a daemon thread; handlers only read state, so they never block the supervisor.
    """

    def __init__(
        self,
        *,
        port: int,
        metrics: ServeMetrics,
        relay_url: str | None = None,
        is_ready: Callable[[], bool] = lambda: False,
        status: Callable[[], dict[str, Any]] | None = None,
        host: str = "0.0.0.0",  # noqa: S104 - scraped and probed from outside the pod
    ) -> None:
        self.metrics = metrics
        self.relay = VllmMetricsRelay(relay_url) if relay_url else None
        self.is_ready = is_ready
        self.status = status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, server.render_metrics(), CONTENT_TYPE_LATEST)
                elif path == "/live":
                    self._reply(200, b"ok\n")
                elif path == "/ready":
                    ok = server.is_ready()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                elif path == "/status" and server.status is not None:  # the serve status, adapters included
                    body = json.dumps(server.status(), sort_keys=True).encode() + b"\n"
                    self._reply(200, body, "application/json")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few seconds
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def render_metrics(self) -> bytes:
        relayed, age = self.relay.get() if self.relay else (None, 0.0)
        self.metrics.vllm_metrics_up.set(1 if relayed is not None else 0)
        if relayed is not None:
            self.metrics.vllm_metrics_age.set(age)
        body = self.metrics.exposition()
        if relayed:
            body += b"# vLLM's own metrics, relayed from " + self.relay.url.encode() + b"\n"  # type: ignore[union-attr]
            body += relayed.encode() + (b"" if relayed.endswith("\n") else b"\n")
        return body

    def start(self) -> MetricsHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self.relay is not None:
            self.relay.close()


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by metric name from Prometheus text output (for tests, the demo and benchmarks)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def first_value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None
