"""Progress of a cache run: Prometheus metrics, periodic log lines, the stall watchdog, token redaction.

Bytes are measured on disk, not inside huggingface_hub: a sampler thread sums the sizes of the
selected blobs that exist plus huggingface_hub's in-flight ``<blob>.<id>.incomplete`` files. That
is independent of huggingface_hub's internals and counts exactly what reached the volume.

The watchdog: when no byte arrives for ``stall_timeout`` seconds while files are in flight, it counts
a stall (``vllm_runtime_cache_stalls_total``) and logs it. The transfer itself is aborted by the
HTTP read timeout, which the command sets to the same ``stall_timeout``: huggingface_hub then resumes
the file with a Range request a few times, and the command retries it once more before failing
with reason ``Stalled``. A transfer the read timeout cannot see (hf_xet's, or a hang anywhere else)
hits the last resort: after ``abort_after`` seconds without a byte, ``on_abort`` runs (the command
writes a ``Stalled`` summary and exits 4; everything on disk is crash-safe by design).
Time spent sleeping between retries is not "without a byte": only running transfers count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from vllm_runtime.units import human_bytes

log = logging.getLogger("vllm_runtime.cache")

REGISTRY = CollectorRegistry(auto_describe=True)
DOWNLOADED_BYTES = Gauge(
    "vllm_runtime_cache_downloaded_bytes", "Bytes of the selected files present on the volume", registry=REGISTRY
)
TOTAL_BYTES = Gauge("vllm_runtime_cache_total_bytes", "Bytes of all selected files", registry=REGISTRY)
RATE = Gauge(
    "vllm_runtime_cache_download_rate_bytes_per_second", "Recent download rate (bytes/s)", registry=REGISTRY
)
ETA = Gauge("vllm_runtime_cache_eta_seconds", "Estimated seconds until the download completes", registry=REGISTRY)
STALLS = Counter("vllm_runtime_cache_stalls", "Periods with no bytes for --stall-timeout seconds", registry=REGISTRY)
RETRIES = Counter("vllm_runtime_cache_retries", "File transfers retried after a failure", registry=REGISTRY)
CACHE_BYTES = Gauge("vllm_runtime_cache_bytes", "Bytes of the cached, verified commit", registry=REGISTRY)
CACHE_FILES = Gauge("vllm_runtime_cache_files", "Files of the cached, verified commit", registry=REGISTRY)
VERIFICATION_SECONDS = Gauge(
    "vllm_runtime_cache_verification_seconds", "Seconds spent verifying sha256 in this run", registry=REGISTRY
)
COMPLETE = Gauge("vllm_runtime_cache_complete", "1 when the commit is cached and verified", registry=REGISTRY)
VERIFICATION_FAILURES = Counter(
    "vllm_runtime_cache_verification_failures", "Files that failed sha256 verification", registry=REGISTRY
)


class ProgressMonitor:
    """Samples bytes on disk, updates the gauges, logs every ``log_interval`` s, and watches for stalls."""

    def __init__(
        self,
        blobs_dir: Path,
        blob_sizes: dict[str, int],
        *,
        stall_timeout: float,
        log_interval: float,
        in_flight: Callable[[], int],
        sample_interval: float = 0.5,
        abort_after: float | None = None,
        on_abort: Callable[[float], None] | None = None,
    ):
        self.blobs_dir = blobs_dir
        self.blob_sizes = blob_sizes  # blob name -> expected size, for the selected files
        self.total = sum(blob_sizes.values())
        self.stall_timeout = stall_timeout
        self.log_interval = log_interval
        self.in_flight = in_flight
        self.sample_interval = min(sample_interval, max(stall_timeout / 4, 0.05))
        self.stalls = 0
        self.abort_after, self.on_abort = abort_after, on_abort
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-progress", daemon=True)
        self._rate = 0.0
        self.done = 0
        TOTAL_BYTES.set(self.total)

    def sample(self) -> int:
        done = 0
        try:
            entries = list(self.blobs_dir.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            name = entry.name
            blob = name.split(".", 1)[0]
            if blob not in self.blob_sizes:
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                continue
            done += min(size, self.blob_sizes[blob])
        self.done = min(done, self.total)
        return self.done

    def start(self) -> ProgressMonitor:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        DOWNLOADED_BYTES.set(self.done)
        if self.done >= self.total:
            ETA.set(0)

    def _run(self) -> None:
        last_bytes, last_time = self.done, time.monotonic()
        last_progress_time = last_time
        last_log = last_time
        stalled = False
        while not self._stop.wait(self.sample_interval):
            now = time.monotonic()
            done = self.sample()
            delta, elapsed = done - last_bytes, now - last_time
            if elapsed > 0:
                instant = max(delta, 0) / elapsed
                self._rate = instant if self._rate == 0 else 0.7 * self._rate + 0.3 * instant
            last_bytes, last_time = done, now
            DOWNLOADED_BYTES.set(done)
            RATE.set(self._rate)
            remaining = max(self.total - done, 0)
            ETA.set(remaining / self._rate if self._rate > 0 else -1)
            quiet = now - last_progress_time
            if delta > 0 or self.in_flight() == 0:  # progress, or only backoff sleeps: nothing is stalled
                last_progress_time, stalled = now, False
            elif not stalled and quiet >= self.stall_timeout:
                stalled = True
                self.stalls += 1
                STALLS.inc()
                log.warning("no bytes received for %.0f s (stall %d); the transfer will be retried", quiet,
                            self.stalls)
            if self.on_abort is not None and self.abort_after is not None and delta <= 0 and quiet >= self.abort_after:
                self.on_abort(quiet)
                return
            if now - last_log >= self.log_interval:
                last_log = now
                log.info("progress: %s", self.line())

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = f"{(self.total - self.done) / self._rate:.0f}s" if self._rate > 0 else "unknown"
        return (
            f"{human_bytes(self.done)} / {human_bytes(self.total)} ({pct:.1f}%), "
            f"{human_bytes(self._rate)}/s, ETA {eta}"
        )


class RedactSecrets(logging.Filter):
    """Replace secret values (the Hub token) in every log record that passes a handler."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "***")
        if redacted != message or record.exc_info:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                for secret in self.secrets:
                    record.exc_text = record.exc_text.replace(secret, "***")
            record.msg, record.args = redacted, None
        return True


def install_redaction(secrets: Iterable[str]) -> RedactSecrets:
    """Attach the redaction filter to every handler of the root logger (and to the root logger itself)."""
    redactor = RedactSecrets(secrets)
    root = logging.getLogger()
    root.addFilter(redactor)
    for handler in root.handlers:
        handler.addFilter(redactor)
    return redactor


def remove_redaction(redactor: RedactSecrets) -> None:
    root = logging.getLogger()
    root.removeFilter(redactor)
    for handler in root.handlers:
        handler.removeFilter(redactor)
