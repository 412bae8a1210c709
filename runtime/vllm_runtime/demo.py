"""``vllm-runtime demo``: the whole path a model pod runs, on this machine, with no cluster and no GPU.

1. generate a tiny Llama and publish it on a loopback Hub (``vllm_runtime.devhub``), or, with
   ``--model org/name``, use the real Hub;
2. ``vllm-runtime cache``: pin the revision to a commit, download, verify sha256, write the manifest;
3. ``vllm-runtime serve``: start vLLM offline from the cache (the CPU build here), wait for ``/ready``;
4. ask for a completion on ``/v1/completions``;
5. print the runtime's and vLLM's metrics from the one ``/metrics`` scrape;
6. SIGTERM, as Kubernetes does, and report vLLM's exit status.

The building blocks (``cache_model``, ``ServeProcess``, ``complete``, ``scrape``) are also used by the
end-to-end tests and ``bench/startup_bench.py``, so they exercise exactly what the demo shows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vllm_runtime import summary
from vllm_runtime.metrics import first_value, parse_exposition

DEMO_REPO = "demo-org/tiny-llama"
RUNTIME = (sys.executable, "-m", "vllm_runtime.cli")
# vLLM's CPU build sizes its KV cache from the NUMA node's memory unless told; 1 GiB is plenty here.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
DEFAULT_VLLM_ARGS = ("--max-model-len", "256")
KEY_METRICS = (
    "vllm_runtime_ready",
    "vllm_runtime_time_to_ready_seconds",
    "vllm_runtime_startup_phase_seconds",
    "vllm_runtime_compile_cache_warm",
    "vllm_runtime_compile_cache_hit",
    "vllm_runtime_kv_cache_tokens",
    "vllm_runtime_cache_bytes",
    "vllm_runtime_cache_files",
    "vllm_runtime_cache_verification_seconds",
    "vllm_runtime_vllm_resident_memory_bytes",
    "vllm_runtime_gpu_metrics_available",
    "vllm_runtime_gpu_memory_used_bytes",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CacheFailed(RuntimeError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def cache_model(
    *, model: str, revision: str, cache_dir: Path, env: Mapping[str, str], log: IO[str] | None = None
) -> dict[str, Any]:
    """Run ``vllm-runtime cache`` as the cache Job does; returns its summary (raises on failure)."""
    term = cache_dir.parent / f"cache-summary-{os.getpid()}.json"
    cmd = [*RUNTIME, "cache", "--model", model, "--revision", revision, "--cache-dir", str(cache_dir),
           "--termination-message-path", str(term)]  # fmt: skip
    done = subprocess.run(cmd, env=dict(env), stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = summary.parse_termination_message(term.read_text() if term.exists() else None)
    term.unlink(missing_ok=True)
    if done.returncode != 0 or not result or not result.get("ok"):
        raise CacheFailed(
            f"vllm-runtime cache failed (exit {done.returncode}): {result or done.stdout}",
            done.returncode or summary.EXIT_PERMANENT,
        )
    return result


@dataclass
class ServeProcess:
    """``vllm-runtime serve`` in a subprocess, with its output in a log file."""

    model: str
    revision: str
    cache_dir: Path
    log_path: Path
    vllm_args: Sequence[str] = DEFAULT_VLLM_ARGS
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    serve_args: Sequence[str] = ()  # serve's own flags (e.g. --adapters-file), before ``--``
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def termination_path(self) -> Path:
        return self.log_path.with_suffix(".termination.json")

    def command(self) -> list[str]:
        return [
            *RUNTIME, "serve", "--model", self.model, "--revision", self.revision,
            "--cache-dir", str(self.cache_dir), "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), "--termination-message-path", str(self.termination_path),
            *self.serve_args, "--", *self.vllm_args,
        ]  # fmt: skip

    def start(self) -> ServeProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.termination_path.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.command(), env=dict(self.env), stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 600.0, progress: IO[str] | None = None) -> float:
        """Seconds until ``/ready`` answered 200; raises with the termination message if serve exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm-runtime serve exited with {self.proc.returncode} before it was ready: "
                    f"{self.termination_message()}; log: {self.log_path}"
                )
            if http_status(self.metrics + "/ready") == 200:
                return time.monotonic() - self.started_at
            if progress:
                progress.write(".")
                progress.flush()
            time.sleep(0.5 if not progress else 2.0)
        raise TimeoutError(f"vllm-runtime serve not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (as the kubelet sends it) and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def termination_message(self) -> dict[str, Any] | None:
        path = self.termination_path
        return summary.parse_termination_message(path.read_text() if path.exists() else None)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, OSError):
        return 0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def complete(api: str, model: str, prompt: str = "Hello, my name is", max_tokens: int = 8) -> dict[str, Any]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(
        api + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - loopback
        result: dict[str, Any] = json.loads(resp.read())
    return result


def scrape(metrics_url: str) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    with urllib.request.urlopen(metrics_url + "/metrics", timeout=30) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    return text, parse_exposition(text)


@contextlib.contextmanager
def loopback_hub(workdir: Path, repo_id: str = DEMO_REPO) -> Iterator[tuple[str, str]]:
    """A tiny generated model on a loopback Hub; yields (endpoint URL, commit)."""
    from vllm_runtime.devhub.server import DevHub
    from vllm_runtime.devhub.tiny_model import generate

    model_dir = workdir / "tiny-model"
    if not (model_dir / "config.json").exists():
        generate(model_dir)
    with DevHub() as hub:
        commit = hub.add_repo(repo_id, model_dir)
        yield hub.url, commit


def hub_env(endpoint: str | None, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    if endpoint:  # the loopback Hub: never send a real token there
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            env.pop(key, None)
        env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


def print_metrics(samples: dict[str, list[tuple[dict[str, str], float]]], out: IO[str]) -> None:
    for name in KEY_METRICS:
        for labels, value in samples.get(name, []):
            shown = {k: v for k, v in labels.items() if k not in ("engine", "model_name")}
            label_text = "{" + ",".join(f'{k}="{v}"' for k, v in shown.items()) + "}" if shown else ""
            out.write(f"  {name}{label_text} {value:g}\n")


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="cache, serve and query a model end to end on this machine (tiny generated model by default)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--model", help="a real Hub model (org/name) instead of the tiny generated one")
    p.add_argument("--revision", default="main")
    p.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "vllm-runtime-demo"),
        help="cache volume and logs (kept, so a second run shows the warm compile cache)",
    )
    p.add_argument("--prompt", default="Hello, my name is")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM arguments (default: --max-model-len 256)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    workdir = Path(args.workdir).resolve()
    cache_dir = workdir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    vllm_args = [a for a in args.vllm_args if a != "--"] or list(DEFAULT_VLLM_ARGS)
    with contextlib.ExitStack() as stack:
        if args.model:
            model, endpoint = args.model, None
            out.write(f"[1/6] using {model}@{args.revision} from {os.environ.get('HF_ENDPOINT', 'the Hugging Face Hub')}\n")
        else:
            model = DEMO_REPO
            endpoint, _ = stack.enter_context(loopback_hub(workdir))
            out.write(f"[1/6] generated a tiny Llama and published it as {model} on a loopback Hub at {endpoint}\n")
        env = hub_env(endpoint, workdir / "hf-home")

        out.write(f"[2/6] vllm-runtime cache --model {model} --revision {args.revision} --cache-dir {cache_dir}\n")
        try:
            cached = cache_model(model=model, revision=args.revision, cache_dir=cache_dir, env=env)
        except CacheFailed as exc:
            out.write(f"      failed: {exc}\n")
            return exc.exit_code
        out.write(
            f"      commit {cached['commit']}: {cached.get('files')} files, {cached.get('bytes')} bytes, "
            f"verified={cached.get('verified')}\n"
        )

    # Serving runs with no Hub at all, as in a pod.
    serve_env = {**os.environ, **CPU_ENV} if not _has_gpu() else dict(os.environ)
    server = ServeProcess(
        model=model, revision=cached["commit"], cache_dir=cache_dir, log_path=workdir / "serve.log",
        vllm_args=vllm_args, env=serve_env,
    )  # fmt: skip
    out.write(f"[3/6] vllm-runtime serve {' '.join(server.command()[len(RUNTIME) + 1 :])}\n      (vLLM's log: {server.log_path}) ")
    server.start()
    try:
        try:
            seconds = server.wait_ready(timeout=args.ready_timeout, progress=out)
        except (RuntimeError, TimeoutError) as exc:
            out.write(f"\n      {exc}\n")
            tail = server.log_text().splitlines()[-15:]
            out.write("      last lines of the log:\n" + "".join(f"        {line}\n" for line in tail))
            return 1
        out.write(f"\n      ready after {seconds:.1f} s ({server.api}/v1, metrics {server.metrics}/metrics)\n")

        out.write(f"[4/6] POST {server.api}/v1/completions prompt={args.prompt!r}\n")
        result = complete(server.api, model, args.prompt, args.max_tokens)
        choice = result["choices"][0]
        out.write(f"      -> {choice['text']!r} (finish_reason={choice['finish_reason']}, usage={result['usage']})\n")

        out.write(f"[5/6] GET {server.metrics}/metrics (runtime + vLLM on one scrape):\n")
        _, samples = scrape(server.metrics)
        print_metrics(samples, out)
        status_files = sorted((cache_dir / "state").glob("serve-*.json"))
        if status_files:
            status = json.loads(status_files[-1].read_text())
            out.write(f"      status file {status_files[-1]}: compile cache {status['compileCache']['key']} "
                      f"(warm before start: {status['compileCache']['warm']})\n")  # fmt: skip
    finally:
        code = server.stop()
    message = server.termination_message() or {}
    out.write(f"[6/6] SIGTERM -> vLLM drained and exited with status {code}; termination message ok={message.get('ok')}\n")
    ttr = first_value(samples, "vllm_runtime_time_to_ready_seconds")
    out.write(f"Done: time to ready {ttr or 0:.1f} s. Run again to start with the warm compile cache in {cache_dir}.\n")
    return code


def _has_gpu() -> bool:
    import logging

    from vllm_runtime.metrics import Nvml

    logging.getLogger("vllm_runtime.metrics").setLevel(logging.WARNING)  # "no NVML" is expected here
    return bool(Nvml().devices())
