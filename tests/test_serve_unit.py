"""``vllm-runtime serve`` without vLLM: command building, phases from log lines, metrics without NVML,
and the supervisor against a stand-in server (tests/fake_vllm.py) for readiness, signals and failures."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from vllm_runtime import failures, layout, serve, summary, vllm_args
from vllm_runtime.devhub.tiny_model import ModelShape, model_config
from vllm_runtime.devhub.tiny_model import _tensor_shapes as tensor_shapes
from vllm_runtime.metrics import (
    VllmMetricsRelay,
    GpuMemory,
    MetricsHTTPServer,
    Nvml,
    ServeMetrics,
    accelerator_type,
    first_value,
    parse_exposition,
    visible_gpus,
)
from vllm_runtime.planner import check_gpu_before_start

HERE = Path(__file__).parent
REPO = "test-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache_by_hand(cache_dir: Path, repo_id: str = REPO, commit: str = COMMIT) -> Path:
    """A cache in the volume layout with a completion manifest, as ``vllm-runtime cache`` leaves it."""
    cache = layout.CacheLayout(cache_dir)
    snapshot = cache.snapshot_dir(repo_id, commit)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"\0" * 16)
    manifest = {
        "formatVersion": 1,
        "repoId": repo_id,
        "commit": commit,
        "revisions": ["main"],
        "verified": True,
        "files": [{"path": "config.json", "size": 2}, {"path": "model.safetensors", "size": 16}],
        "fileCount": 2,
        "bytes": 18,
        "verificationSeconds": 0.25,
    }
    path = cache.manifest_path(repo_id, commit)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    return snapshot


def plan_for(cache_dir: Path, extra: list[str], **kw: object) -> serve.ServePlan:
    args: dict[str, object] = dict(
        model=REPO,
        revision=COMMIT,
        cache_dir=cache_dir,
        host="0.0.0.0",
        port=8000,
        extra_args=extra,
        vllm_version="0.32.0",
        accelerator="cpu",
        base_env={"HF_TOKEN": "hf_secret", "PATH": "/usr/bin"},
        drain_timeout=25,
    )
    args.update(kw)
    return serve.build_plan(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ command building


def test_plan_serves_the_cached_commit_offline_with_the_operators_flags(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    spec_flags = vllm_args.vllm_flags({"dtype": "float32", "maxModelLen": 256, "extraArgs": ["--max-num-seqs", "4"]})
    plan = plan_for(tmp_path, spec_flags)
    argv = plan.argv
    assert argv[argv.index("--model") + 1] == REPO
    assert argv[argv.index("--revision") + 1] == COMMIT
    assert argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--shutdown-timeout") + 1] == "25"  # vLLM drains on SIGTERM
    assert argv[-len(spec_flags) :] == spec_flags  # verbatim, last
    assert plan.env["HF_HUB_OFFLINE"] == "1"
    assert plan.env["HF_HUB_CACHE"] == str(tmp_path / "hub")
    assert plan.env["VLLM_CACHE_ROOT"] == str(tmp_path / "compile" / plan.compile_key)
    assert "HF_TOKEN" not in plan.env  # serving needs no token; never hand it to vLLM
    assert plan.served_model_names == [REPO]
    assert plan.manifest is not None and plan.manifest["commit"] == COMMIT


def test_compile_key_changes_only_with_settings_that_change_compiled_graphs(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    base = plan_for(tmp_path, ["--dtype", "float32"]).compile_key
    assert plan_for(tmp_path, ["--dtype", "float32", "--served-model-name", "x"]).compile_key == base
    assert plan_for(tmp_path, ["--dtype", "float32", "--max-num-seqs", "4"]).compile_key == base
    assert plan_for(tmp_path, ["--dtype", "bfloat16"]).compile_key != base
    assert plan_for(tmp_path, ["--dtype", "float32", "--tensor-parallel-size", "2"]).compile_key != base
    assert plan_for(tmp_path, ["--dtype", "float32"], accelerator="NVIDIA-H100-80GB-HBM3").compile_key != base
    assert plan_for(tmp_path, ["--dtype", "float32"], vllm_version="0.33.0").compile_key != base


@pytest.mark.parametrize("flag", ["--port", "--host", "--model", "--revision", "--download-dir", "--download_dir"])
def test_flags_the_runtime_sets_are_refused_after_the_separator(tmp_path: Path, flag: str) -> None:
    fill_cache_by_hand(tmp_path)
    with pytest.raises(serve.ServeError) as err:
        plan_for(tmp_path, [flag, "x"])
    assert err.value.exit_code == summary.EXIT_USAGE
    assert flag.replace("_", "-") in err.value.message


def test_user_shutdown_timeout_wins_and_served_names_come_from_the_flag(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    plan = plan_for(tmp_path, ["--shutdown-timeout", "5", "--served-model-name", "a", "b", "--seed", "1"])
    assert plan.argv.count("--shutdown-timeout") == 1
    assert plan.served_model_names == ["a", "b"]


def test_no_manifest_no_start(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    layout.CacheLayout(tmp_path).manifest_path(REPO, COMMIT).unlink()
    with pytest.raises(serve.ServeError) as err:
        plan_for(tmp_path, [])
    assert err.value.reason == "NoCompleteCache" and err.value.exit_code == summary.EXIT_PERMANENT
    assert "vllm-runtime cache --model test-org/tiny-llama" in err.value.message


def test_a_snapshot_that_lost_files_is_refused_despite_its_manifest(tmp_path: Path) -> None:
    snapshot = fill_cache_by_hand(tmp_path)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(serve.ServeError) as err:
        plan_for(tmp_path, [])
    assert err.value.reason == "NoCompleteCache" and "vllm-runtime rm" in err.value.message


def test_a_branch_name_resolves_to_the_cached_commit_offline(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    plan = plan_for(tmp_path, [], revision="main")
    assert plan.commit == COMMIT and plan.argv[plan.argv.index("--revision") + 1] == COMMIT


def test_local_model_directory_needs_config_and_weights(tmp_path: Path) -> None:
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    with pytest.raises(serve.ServeError, match="no config.json"):
        plan_for(tmp_path / "cache", [], model=str(model), revision="main")
    (model / "config.json").write_text("{}")
    with pytest.raises(serve.ServeError, match="no weight files"):
        plan_for(tmp_path / "cache", [], model=str(model), revision="main")
    (model / "model.safetensors").write_bytes(b"\0")
    plan = plan_for(tmp_path / "cache", [], model=str(model), revision="main")
    assert plan.model_ref == str(model) and "--revision" not in plan.argv
    assert plan.commit.startswith("local-") and plan.manifest is None


# ------------------------------------------------------------------ phases from vLLM's log lines

CPU_FIRST_START = [
    "(Worker pid=6322) INFO 11-27 21:00:03 [default_loader.py:501] Loading weights took 0.00 seconds",
    "(Worker pid=6322) INFO 11-27 21:00:04 [cpu_model_runner.py:87] Warming up model for the compilation...",
    "(Worker pid=6322) INFO 11-27 21:00:27 [decorators.py:743] [backbone] saved AOT compiled function to /c/x/model",
    "(Worker pid=6322) INFO 11-27 21:00:27 [cpu_model_runner.py:91] Warming up done.",
    "(EngineCore pid=6259) INFO 11-27 21:00:27 [kv_cache_utils.py:2327] CPU KV cache size: 1,048,576 tokens, "
    "Maximum concurrency for 256 tokens per request: 4096.00x",
    "(EngineCore pid=6259) INFO 11-27 21:00:30 [core.py:402] init engine (profile, create kv cache, warmup model) "
    "took 25.63 s",
]
CPU_WARM_RESTART_LINE = (
    "(Worker pid=7189) WARNING 11-27 21:01:43 [decorators.py:333] [backbone] Compiling model again due to a load "
    "failure from /cache/compile/vllm-0.32.0-abc/torch_compile_cache/torch_aot_compile/e06d/rank_0_0/model, "
    "reason: 'function' object has no attribute 'finalize_loading'"
)
GPU_START = [
    "(EngineCore pid=1) INFO 11-27 21:00:10 [gpu_model_runner.py:5150] Model loading took 14.99 GiB memory and "
    "6.123456 seconds",
    "(EngineCore pid=1) INFO 11-27 21:00:20 [backends.py:296] Directly load the compiled graph(s) for compile range "
    "(1, 8192) from the cache, took 1.234 s",
    "(EngineCore pid=1) INFO 11-27 21:00:21 [monitor.py:40] torch.compile took 3.21 s in total",
    "(EngineCore pid=1) INFO 11-27 21:00:22 [gpu_worker.py:760] Available KV cache memory: 52.1 GiB",
    "(EngineCore pid=1) INFO 11-27 21:00:22 [kv_cache_utils.py:2327] GPU KV cache size: 426,784 tokens, "
    "Maximum concurrency for 8,192 tokens per request: 52.10x",
]


def test_cpu_start_up_lines_record_every_phase_in_order() -> None:
    tracker = serve.PhaseTracker(ServeMetrics(nvml=_NoGpu()))
    for line in CPU_FIRST_START:
        tracker.feed(line)
    assert list(tracker.phases) == ["weights_loaded", "compile_done", "kv_cache_allocated"]
    assert tracker.kv_cache_tokens == 1_048_576 and tracker.max_concurrency == 4096.0
    assert tracker.reported == {"weights_load": 0.0, "init_engine": 25.63}
    assert tracker.compile_cache_hit is None
    tracker.mark_healthy()
    assert "healthy" in tracker.phases
    # Healthy with no compiled-graph load logged: a miss, exported as 0 (the dashboard's panel needs a value).
    assert tracker.compile_cache_hit is False
    assert first_value(parse_exposition(tracker.metrics.exposition().decode()), "vllm_runtime_compile_cache_hit") == 0.0


def test_gpu_lines_and_a_compile_cache_hit() -> None:
    metrics = ServeMetrics(nvml=_NoGpu())
    tracker = serve.PhaseTracker(metrics)
    for line in GPU_START:
        tracker.feed(line)
    assert tracker.compile_cache_hit is True
    assert tracker.reported["weights_load"] == 6.123456 and tracker.reported["torch_compile"] == 3.21
    assert set(tracker.phases) == {"weights_loaded", "compile_done", "kv_cache_allocated"}
    samples = parse_exposition(metrics.exposition().decode())
    assert first_value(samples, "vllm_runtime_compile_cache_hit") == 1.0
    assert first_value(samples, "vllm_runtime_kv_cache_tokens") == 426_784
    assert first_value(samples, "vllm_runtime_startup_phase_seconds", phase="compile_done") is not None


def test_cpu_restart_that_finds_the_artifact_on_the_volume() -> None:
    tracker = serve.PhaseTracker(ServeMetrics(nvml=_NoGpu()))
    tracker.feed(CPU_WARM_RESTART_LINE)
    assert tracker.compile_artifact_found and tracker.compile_cache_hit is False


# ------------------------------------------------------------------ metrics without and with a GPU


class _NoGpu(Nvml):
    def available(self) -> bool:
        return False


class _FakeGpu(Nvml):
    def devices(self) -> list[GpuMemory] | None:
        gib = 1 << 30
        return [GpuMemory(index=0, name="NVIDIA H100", uuid="GPU-1", total=80 * gib, free=60 * gib, used=19 * gib,
                          reserved=gib)]


def test_facts_not_known_yet_are_absent_not_zero() -> None:
    metrics = ServeMetrics(nvml=_NoGpu())
    samples = parse_exposition(metrics.exposition().decode())
    for name in ("vllm_runtime_time_to_ready_seconds", "vllm_runtime_compile_cache_hit", "vllm_runtime_kv_cache_tokens"):
        assert name not in samples
    metrics.compile_cache_hit.set(0)
    assert first_value(parse_exposition(metrics.exposition().decode()), "vllm_runtime_compile_cache_hit") == 0.0


def test_without_nvml_gpu_metrics_say_absent_and_nothing_fails() -> None:
    samples = parse_exposition(ServeMetrics(nvml=Nvml()).exposition().decode())  # no NVML on CI machines
    if first_value(samples, "vllm_runtime_gpu_metrics_available") == 1.0:
        pytest.skip("this machine has a GPU")
    assert first_value(samples, "vllm_runtime_gpu_metrics_available") == 0.0
    assert "vllm_runtime_gpu_memory_used_bytes" not in samples
    assert accelerator_type(Nvml()) == "cpu"


def test_gpu_memory_series_per_device_and_child_rss() -> None:
    metrics = ServeMetrics(nvml=_FakeGpu(), vllm_pid=os.getpid)
    samples = parse_exposition(metrics.exposition().decode())
    assert first_value(samples, "vllm_runtime_gpu_metrics_available") == 1.0
    assert first_value(samples, "vllm_runtime_gpu_memory_free_bytes", gpu="0") == 60 * (1 << 30)
    assert first_value(samples, "vllm_runtime_gpu_memory_total_bytes", gpu="0") == 80 * (1 << 30)
    assert (first_value(samples, "vllm_runtime_vllm_resident_memory_bytes") or 0) > 1 << 20
    assert accelerator_type(_FakeGpu()) == "NVIDIA-H100"


def test_manifest_facts_become_cache_metrics() -> None:
    metrics = ServeMetrics(nvml=_NoGpu())
    metrics.set_cache_facts({"bytes": 18, "fileCount": 2, "files": [{}, {}], "verificationSeconds": 0.25})
    samples = parse_exposition(metrics.exposition().decode())
    assert first_value(samples, "vllm_runtime_cache_bytes") == 18
    assert first_value(samples, "vllm_runtime_cache_files") == 2
    assert first_value(samples, "vllm_runtime_cache_verification_seconds") == 0.25


def test_metrics_server_appends_relayed_metrics_and_probes(tmp_path: Path) -> None:
    upstream = MetricsHTTPServer(port=0, metrics=ServeMetrics(nvml=_NoGpu()), host="127.0.0.1").start()
    try:
        ready = {"value": False}
        server = MetricsHTTPServer(
            port=0,
            metrics=ServeMetrics(nvml=_NoGpu()),
            relay_url=f"http://127.0.0.1:{upstream.port}/metrics",
            is_ready=lambda: ready["value"],
            host="127.0.0.1",
        ).start()
        try:
            base = f"http://127.0.0.1:{server.port}"
            assert _status(base + "/live") == 200
            assert _status(base + "/ready") == 503
            ready["value"] = True
            assert _status(base + "/ready") == 200
            text = urllib.request.urlopen(base + "/metrics").read().decode()
            # the relayed exposition comes after our own; both parse as one scrape
            assert text.index("vllm_runtime_vllm_metrics_up 1.0") < text.index("relayed from")
            assert "vllm_runtime_ready" in parse_exposition(text)
        finally:
            server.stop()
    finally:
        upstream.stop()


class _GatedUpstream:
    """A stand-in for vLLM's /metrics that answers ``reads_total N`` (N counts the answers) and, while
    ``gate`` is clear, holds every answer: a saturated vLLM that answers late."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.gate = threading.Event()
        self.gate.set()
        self.answers = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                upstream.gate.wait(30)
                upstream.answers += 1
                body = f"reads_total {upstream.answers}\n".encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the relay gave up on this read (its timeout): nobody listens any more
                    pass

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_relay_answers_with_the_previous_body_while_vllm_is_slow_and_never_with_an_old_one() -> None:
    upstream = _GatedUpstream()
    now = {"t": 1000.0}
    relay = VllmMetricsRelay(upstream.url, wait_s=0.05, timeout_s=0.5, max_age_s=10.0, refresh_s=None,
                             clock=lambda: now["t"])  # fmt: skip
    try:
        assert relay.get() == ("reads_total 1\n", 0.0)  # vLLM answers: its body, read for this scrape
        upstream.gate.clear()  # vLLM is busy: the next read is held
        now["t"] += 3.0
        body, age = relay.get()
        assert (body, age) == ("reads_total 1\n", 3.0)  # the previous body at once, with its age
        assert relay.get() == ("reads_total 1\n", 3.0)  # a second scrape shares the read in flight
        upstream.gate.set()  # vLLM answers the held read: the next scrape relays it
        deadline = time.monotonic() + 30
        while upstream.answers < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.answers == 2  # one read for both scrapes, not one each
        body, _ = relay.get()
        assert body in ("reads_total 2\n", "reads_total 3\n")  # the held read's answer or a newer one
        upstream.gate.clear()
        now["t"] += 11.0  # the last body is older than max_age_s: never relayed; vLLM's silence shows
        assert relay.get() == (None, 0.0)
    finally:
        upstream.stop()


def test_relay_keeps_its_body_recent_while_scraped_and_pauses_when_not() -> None:
    upstream = _GatedUpstream()
    now = {"t": 0.0}
    relay = VllmMetricsRelay(upstream.url, refresh_s=0.02, idle_s=60.0, clock=lambda: now["t"])
    try:
        assert not relay.refreshing()  # nobody scraped yet: vLLM is not read
        assert relay.get()[0] == "reads_total 1\n"
        deadline = time.monotonic() + 30
        while upstream.answers < 4 and time.monotonic() < deadline:  # read again without a scrape
            time.sleep(0.01)
        assert upstream.answers >= 4
        answered = upstream.answers  # the last of these may still be on its way to the relay
        upstream.gate.clear()  # vLLM slow: the scrape gets the refresher's latest body, not the first one
        body, _ = relay.get()
        assert body is not None and int(body.split()[1]) >= answered - 1 >= 3
        now["t"] += 61.0
        assert not relay.refreshing()  # no scrape for idle_s: the refresher stops reading vLLM
    finally:
        relay.close()
        upstream.stop()


def test_metrics_server_relays_the_body_age_and_up_state() -> None:
    upstream = _GatedUpstream()
    server = MetricsHTTPServer(port=0, metrics=ServeMetrics(nvml=_NoGpu()), relay_url=upstream.url, host="127.0.0.1")
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        samples = parse_exposition(urllib.request.urlopen(base + "/metrics").read().decode())
        assert first_value(samples, "reads_total") == 1.0
        assert first_value(samples, "vllm_runtime_vllm_metrics_up") == 1.0
        age = first_value(samples, "vllm_runtime_vllm_metrics_age_seconds")
        assert age is not None and 0.0 <= age < 5.0
        upstream.stop()  # vLLM gone: the relay says so instead of serving an old body forever
        server.relay = VllmMetricsRelay(upstream.url, wait_s=0.05, timeout_s=0.5, refresh_s=None)
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        assert "reads_total" not in text
        assert first_value(parse_exposition(text), "vllm_runtime_vllm_metrics_up") == 0.0
    finally:
        server.stop()


def _status(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=5).status)
    except urllib.error.HTTPError as err:
        return err.code


# ------------------------------------------------------------------ the supervisor against a stand-in vLLM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RUN_SERVE_ONLY = (
    "import sys, argparse, logging; from vllm_runtime import serve; p = argparse.ArgumentParser(); "
    "serve.register(p.add_subparsers()); logging.basicConfig(level=logging.INFO); a = p.parse_args(); "
    "sys.exit(a.func(a))"
)


def start_serve(tmp_path: Path, env_extra: dict[str, str], *vllm_flags: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    port, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable, "-c", RUN_SERVE_ONLY, "serve",
        "--model", REPO, "--revision", COMMIT, "--cache-dir", str(tmp_path),
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
        "--termination-message-path", str(tmp_path / "termination-log"),
        "--vllm-command", f"{sys.executable} {HERE / 'fake_vllm.py'}",
        "--drain-timeout", "5",
        "--", *vllm_flags,
    ]  # fmt: skip
    env = {**os.environ, "FAKE_VLLM_ENV_DUMP": str(tmp_path / "fake-env.json"), **env_extra}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, {"port": port, "metrics": f"http://127.0.0.1:{metrics_port}"}


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_supervisor_readiness_metrics_status_and_sigterm(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    proc, urls = start_serve(tmp_path, {"FAKE_VLLM_TERM_EXIT": "0"}, "--served-model-name", "tiny")
    try:
        wait_for(lambda: _status(f"{urls['metrics']}/ready") == 200)
        text = urllib.request.urlopen(f"{urls['metrics']}/metrics").read().decode()
        samples = parse_exposition(text)
        assert first_value(samples, "vllm_runtime_ready") == 1.0
        for phase in ("weights_loaded", "compile_done", "kv_cache_allocated", "healthy"):
            assert first_value(samples, "vllm_runtime_startup_phase_seconds", phase=phase) is not None, phase
        assert first_value(samples, "vllm:num_requests_running", model_name="tiny") == 0.0  # relayed
        assert first_value(samples, "vllm_runtime_cache_files") == 2
        status = json.loads(next((tmp_path / "state").glob("serve-*.json")).read_text())
        assert status["ready"] is True and status["commit"] == COMMIT
        dumped = json.loads((tmp_path / "fake-env.json").read_text())
        assert dumped["env"]["HF_HUB_OFFLINE"] == "1"
        assert dumped["nice"] == os.nice(0) + serve.VLLM_NICE  # vLLM yields the CPU to the runtime's probes
        vllm_pid = int(dumped["pid"])
        autogroup = Path(f"/proc/{vllm_pid}/autogroup")
        if autogroup.exists():  # its own session's scheduling group is nicer too (see lower_session_priority)
            assert autogroup.read_text().split()[-1] == str(serve.VLLM_NICE), autogroup.read_text()
        assert dumped["env"]["VLLM_CACHE_ROOT"].startswith(str(tmp_path / "compile"))
        assert list((tmp_path / "state" / "leases").glob("*.lease"))  # the commit is marked in use
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "[shutdown] API server: shutdown triggered" in out  # the signal reached vLLM
    message = summary.parse_termination_message((tmp_path / "termination-log").read_text())
    assert message is not None and message["ok"] is True and message["command"] == "serve"
    assert set(message["phases"]) >= {"weights_loaded", "healthy"}
    assert not list((tmp_path / "state" / "leases").glob("*.lease"))  # released


def test_supervisor_exits_with_vllms_status(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    proc, urls = start_serve(tmp_path, {"FAKE_VLLM_TERM_EXIT": "7"})
    try:
        wait_for(lambda: _status(f"{urls['metrics']}/ready") == 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 7


def test_failed_start_is_classified_into_the_termination_message(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    fixture = HERE / "fixtures" / "vllm_failures" / "kv_cache_too_small.log"
    proc, _ = start_serve(tmp_path, {"FAKE_VLLM_MODE": "fail", "FAKE_VLLM_FAILURE_LOG": str(fixture)})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    message = summary.parse_termination_message((tmp_path / "termination-log").read_text())
    assert message is not None and message["ok"] is False
    assert message["reason"] == failures.KV_CACHE_TOO_SMALL and "20224" in message["message"]
    status = json.loads(next((tmp_path / "state").glob("serve-*.json")).read_text())
    assert status["failure"]["reason"] == failures.KV_CACHE_TOO_SMALL


def test_serve_refuses_to_start_without_a_manifest(tmp_path: Path) -> None:
    proc, _ = start_serve(tmp_path, {})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == summary.EXIT_PERMANENT, out
    message = summary.parse_termination_message((tmp_path / "termination-log").read_text())
    assert message is not None and message["reason"] == "NoCompleteCache"
    assert not (tmp_path / "fake-env.json").exists()  # vLLM never started


# ------------------------------------------------------------------ memory check on the GPUs (fake NVML)

GIB = 1 << 30
LLAMA_8B = ModelShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, vocab_size=128256)
LLAMA_70B = replace(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)


def header_only_model(directory: Path, shape: ModelShape) -> Path:
    """config.json + a bf16 safetensors file holding only its header: all the planner reads."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(model_config(shape, "bfloat16")))
    header: dict[str, object] = {}
    offset = 0
    for name, dims in tensor_shapes(shape):
        size = 2 * math.prod(dims)
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    return directory


def fake_nvml(*free_total_gib: tuple[float, float]) -> Nvml:
    rows = [
        GpuMemory(index=i, name="NVIDIA H100 80GB HBM3", uuid=f"GPU-{i}aaa", total=int(total * GIB) + GIB // 2,
                  free=int(free * GIB), used=int((total - free) * GIB), reserved=GIB // 2)
        for i, (free, total) in enumerate(free_total_gib)
    ]  # fmt: skip

    class _Fake(Nvml):
        def devices(self) -> list[GpuMemory] | None:
            return rows

    return _Fake()


def local_plan(tmp_path: Path, shape: ModelShape, extra: list[str] | None = None) -> serve.ServePlan:
    model = header_only_model(tmp_path / "model", shape)
    return plan_for(tmp_path / "cache", extra or ["--max-model-len", "8192"], model=str(model), revision="main")


def test_memory_check_passes_where_the_plan_fits_the_free_memory(tmp_path: Path) -> None:
    plan = local_plan(tmp_path, LLAMA_8B)
    check = serve.check_gpu_memory(plan, fake_nvml((79, 79.5)), {}, cpu_build=False)
    assert check.ok and not check.skipped, check.message
    assert check.plan is not None and check.plan["fits"] is True and check.plan["maxModelLen"] == 8192
    assert check.gpus == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "freeBytes": 79 * GIB,
                           "totalBytes": int(79.5 * GIB)}]  # fmt: skip  # total as CUDA counts it: less reserved


def test_memory_check_refuses_with_the_planners_explanation_and_suggestions(tmp_path: Path) -> None:
    plan = local_plan(tmp_path, LLAMA_70B)
    check = serve.check_gpu_memory(plan, fake_nvml((79, 79.5)), {}, cpu_build=False)
    assert not check.ok and check.plan is not None and check.plan["fits"] is False
    assert plan.model_dir is not None
    same = check_gpu_before_start(plan.model_dir, plan.settings, free_bytes=[79 * GIB], total_bytes=[int(79.5 * GIB)])
    assert check.message.startswith(same.reason)  # the planner's words, then which GPUs were checked
    assert "weights need" in check.message and "tensorParallelSize" in check.message  # reason and a suggestion
    assert "79.00 GiB free" in check.message and serve.SKIP_MEMORY_CHECK_ENV in check.message
    # the same model on the four GPUs the planner suggests fits
    four = local_plan(tmp_path / "tp4", LLAMA_70B, ["--max-model-len", "8192", "--tensor-parallel-size", "4"])
    assert serve.check_gpu_memory(four, fake_nvml(*[(79, 79.5)] * 4), {}, cpu_build=False).ok


def test_memory_check_refuses_when_another_process_holds_the_gpu(tmp_path: Path) -> None:
    plan = local_plan(tmp_path, LLAMA_8B)
    check = serve.check_gpu_memory(plan, fake_nvml((20, 79.5)), {}, cpu_build=False)
    assert not check.ok and "another process holds GPU memory" in check.message
    assert "gpuMemoryUtilization to 0.24" in check.message


def test_memory_check_counts_only_the_visible_gpus(tmp_path: Path) -> None:
    plan = local_plan(tmp_path, LLAMA_8B, ["--max-model-len", "8192", "--tensor-parallel-size", "2"])
    nvml = fake_nvml((79, 79.5), (5, 79.5), (79, 79.5))  # GPU 1 is busy
    assert not serve.check_gpu_memory(plan, nvml, {}, cpu_build=False).ok  # GPUs 0 and 1
    ok = serve.check_gpu_memory(plan, nvml, {"CUDA_VISIBLE_DEVICES": "0,2"}, cpu_build=False)
    assert ok.ok and [g["index"] for g in ok.gpus] == [0, 2]
    one = serve.check_gpu_memory(plan, nvml, {"CUDA_VISIBLE_DEVICES": "2"}, cpu_build=False)
    assert not one.ok and "needs 2 GPUs but 1 are visible" in one.message


def test_visible_gpus_follow_cuda_and_the_container_runtime() -> None:
    devices = fake_nvml((1, 2), (1, 2), (1, 2), (1, 2)).devices() or []
    assert visible_gpus(devices, {}) == devices
    assert [d.index for d in visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": "3,1"}) or []] == [3, 1]
    assert [d.index for d in visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": "GPU-2,9,0"}) or []] == [2]  # stops at 9
    assert visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": ""}) == []
    # the device plugin's host indices: NVML in the container already lists only those GPUs
    assert visible_gpus(devices, {"NVIDIA_VISIBLE_DEVICES": "4,5,6,7"}) == devices
    assert [d.index for d in visible_gpus(devices, {"NVIDIA_VISIBLE_DEVICES": "1,3"}) or []] == [1, 3]  # not filtered
    assert [d.index for d in visible_gpus(devices, {"NVIDIA_VISIBLE_DEVICES": "GPU-3aaa"}) or []] == [3]
    assert visible_gpus(devices, {"NVIDIA_VISIBLE_DEVICES": "none"}) == []
    assert visible_gpus(devices, {"NVIDIA_VISIBLE_DEVICES": "MIG-5e8c"}) is None


def test_memory_check_is_skipped_without_nvml_on_the_cpu_build_and_for_mig(tmp_path: Path) -> None:
    plan = local_plan(tmp_path, LLAMA_70B)
    no_gpu = serve.check_gpu_memory(plan, _NoGpu(), {}, cpu_build=False)
    assert no_gpu.ok and no_gpu.skipped and "NVML is unavailable" in no_gpu.message
    cpu = serve.check_gpu_memory(plan, fake_nvml((1, 2)), {}, cpu_build=True)
    assert cpu.ok and cpu.skipped and "CPU build" in cpu.message
    mig = serve.check_gpu_memory(plan, fake_nvml((1, 2)), {"NVIDIA_VISIBLE_DEVICES": "MIG-1"}, cpu_build=False)
    assert mig.ok and mig.skipped
    bad_model = tmp_path / "bad"
    bad_model.mkdir()
    (bad_model / "config.json").write_text("{}")
    (bad_model / "model.safetensors").write_bytes(b"\0" * 4)  # not a safetensors file: vLLM will say so itself
    unreadable = plan_for(tmp_path / "c2", [], model=str(bad_model), revision="main")
    bad = serve.check_gpu_memory(unreadable, fake_nvml((2, 2)), {}, cpu_build=False)
    assert bad.ok and bad.skipped and "planner cannot read" in bad.message


def run_serve_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nvml: Nvml, *options: str) -> int:
    """``vllm-runtime serve`` in this process with a fake NVML; vLLM is the stand-in that fails at once."""
    monkeypatch.setattr(serve, "Nvml", lambda: nvml)
    monkeypatch.setattr(serve, "vllm_build_is_cpu", lambda: False)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # leave pytest's handlers alone
    monkeypatch.setenv("FAKE_VLLM_MODE", "fail")
    monkeypatch.setenv("FAKE_VLLM_FAILURE_LOG", str(HERE / "fixtures" / "vllm_failures" / "kv_cache_too_small.log"))
    monkeypatch.setenv("FAKE_VLLM_ENV_DUMP", str(tmp_path / "fake-env.json"))
    monkeypatch.delenv(serve.SKIP_MEMORY_CHECK_ENV, raising=False)
    model = header_only_model(tmp_path / "model", LLAMA_70B)
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args([
        "serve", "--model", str(model), "--cache-dir", str(tmp_path / "cache"), "--host", "127.0.0.1",
        "--port", str(free_port()), "--metrics-port", str(free_port()),
        "--termination-message-path", str(tmp_path / "termination-log"),
        "--vllm-command", f"{sys.executable} {HERE / 'fake_vllm.py'}", *options, "--", "--max-model-len", "8192",
    ])  # fmt: skip
    return int(args.func(args))


def test_serve_fails_fast_when_the_model_does_not_fit_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_serve_in_process(tmp_path, monkeypatch, fake_nvml((79, 79.5)))
    assert code == summary.EXIT_PERMANENT
    assert not (tmp_path / "fake-env.json").exists()  # vLLM never started
    message = summary.parse_termination_message((tmp_path / "termination-log").read_text())
    assert message is not None and message["ok"] is False and message["reason"] == serve.INSUFFICIENT_GPU_MEMORY
    assert "weights need" in message["message"] and "try:" in message["message"]
    assert message["gpus"] == [{"index": 0, "freeBytes": 79 * GIB, "totalBytes": int(79.5 * GIB)}]
    assert message["reason"] in summary.REASONS_PERMANENT
    status = json.loads(next((tmp_path / "cache" / "state").glob("serve-*.json")).read_text())
    assert status["failure"]["reason"] == serve.INSUFFICIENT_GPU_MEMORY and status["exitCode"] == 3
    assert status["memoryCheck"]["ok"] is False and status["memoryCheck"]["plan"]["fits"] is False
    assert not list((tmp_path / "cache" / "compile").glob("*"))  # nothing created for a start that never happens


def test_skip_memory_check_starts_vllm_anyway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_serve_in_process(tmp_path, monkeypatch, fake_nvml((79, 79.5)), "--skip-memory-check")
    assert code == 1  # the stand-in vLLM ran (and failed as told)
    assert (tmp_path / "fake-env.json").exists()
    status = json.loads(next((tmp_path / "cache" / "state").glob("serve-*.json")).read_text())
    assert status["memoryCheck"]["skipped"] is True and status["failure"]["reason"] == failures.KV_CACHE_TOO_SMALL


# ------------------------------------------------------------------ secrets in the logged command line


@pytest.mark.parametrize(
    ("argv", "logged"),
    [
        (["--api-key", "sk-1"], ["--api-key", "***"]),
        (["--api-key=sk-1"], ["--api-key=***"]),
        (["--hf-token", "hf_x", "--port", "1"], ["--hf-token", "***", "--port", "1"]),
        (["--ssl-keyfile-password=pw", "--secret_value", "s"], ["--ssl-keyfile-password=***", "--secret_value", "***"]),
        (["--api-key", "-starts-with-dash"], ["--api-key", "***"]),
        # names that merely contain the letters stay readable
        (["--tokenizer", "/m", "--max-num-batched-tokens", "8", "--ssl-keyfile", "/k"],
         ["--tokenizer", "/m", "--max-num-batched-tokens", "8", "--ssl-keyfile", "/k"]),
    ],
)
def test_secret_flag_values_are_redacted_for_logs(argv: list[str], logged: list[str]) -> None:
    assert serve.redact_argv(["python", "-m", "vllm", *argv]) == ["python", "-m", "vllm", *logged]


def test_serve_never_logs_the_api_key(tmp_path: Path) -> None:
    fill_cache_by_hand(tmp_path)
    fixture = HERE / "fixtures" / "vllm_failures" / "kv_cache_too_small.log"
    proc, _ = start_serve(
        tmp_path, {"FAKE_VLLM_MODE": "fail", "FAKE_VLLM_FAILURE_LOG": str(fixture)},
        "--api-key", "sk-spaced-secret", "--api-key=sk-equals-secret",
    )
    out, _ = proc.communicate(timeout=60)
    assert "starting vLLM:" in out
    assert "sk-spaced-secret" not in out and "sk-equals-secret" not in out
    assert "--api-key '***'" in out and "'--api-key=***'" in out
