"""End to end with real vLLM (CPU build): cache from the loopback Hub, serve, complete, scrape, drain,
restart on the warm compile cache, and a start-up failure classified live. Three vLLM starts in all.

Order matters: the SIGTERM/restart test stops the session's server, so it runs after the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm_fixtures import READY_TIMEOUT, ServedModel, serve_env

from vllm_runtime import failures
from vllm_runtime.demo import complete, get_json, http_status, scrape
from vllm_runtime.metrics import first_value

pytestmark = pytest.mark.e2e


def status_file(served: ServedModel) -> dict[str, object]:
    files = sorted((served.cache_dir / "state").glob("serve-*.json"))
    assert files, "serve writes its status under <cache>/state"
    data: dict[str, object] = json.loads(files[-1].read_text())
    return data


def test_completion_from_the_cached_commit(served_tiny_model: ServedModel) -> None:
    result = complete(served_tiny_model.api, served_tiny_model.repo_id, "Hello world", max_tokens=5)
    assert result["model"] == served_tiny_model.repo_id
    assert len(result["choices"]) == 1
    assert 1 <= result["usage"]["completion_tokens"] <= 5
    assert result["usage"]["prompt_tokens"] >= 1


def test_models_lists_the_repo(served_tiny_model: ServedModel) -> None:
    ids = [m["id"] for m in get_json(served_tiny_model.api + "/v1/models")["data"]]
    assert ids == [served_tiny_model.repo_id]


def test_one_scrape_has_runtime_and_vllm_metrics(served_tiny_model: ServedModel) -> None:
    complete(served_tiny_model.api, served_tiny_model.repo_id, "The quick brown fox", max_tokens=3)
    _, samples = scrape(served_tiny_model.metrics)
    # the runtime's own
    assert first_value(samples, "vllm_runtime_ready") == 1.0
    assert (first_value(samples, "vllm_runtime_time_to_ready_seconds") or 0) > 0
    assert first_value(samples, "vllm_runtime_gpu_metrics_available") == 0.0  # no GPU here, and no crash
    assert (first_value(samples, "vllm_runtime_vllm_resident_memory_bytes") or 0) > 100 * 2**20
    assert first_value(samples, "vllm_runtime_cache_files") == served_tiny_model.cache_summary["files"]
    assert first_value(samples, "vllm_runtime_cache_bytes") == served_tiny_model.cache_summary["bytes"]
    assert (first_value(samples, "vllm_runtime_kv_cache_tokens") or 0) > 0
    # vLLM's, relayed on the same scrape
    assert first_value(samples, "vllm:num_requests_running") == 0.0
    assert first_value(samples, "vllm:num_requests_waiting") == 0.0
    assert first_value(samples, "vllm:kv_cache_usage_perc") is not None
    assert (first_value(samples, "vllm:generation_tokens_total") or 0) >= 1
    assert (first_value(samples, "vllm:prompt_tokens_total") or 0) >= 1


def test_ready_live_and_phases_recorded(served_tiny_model: ServedModel) -> None:
    assert http_status(served_tiny_model.metrics + "/ready") == 200
    assert http_status(served_tiny_model.metrics + "/live") == 200
    _, samples = scrape(served_tiny_model.metrics)
    phases = ["weights_loaded", "compile_done", "kv_cache_allocated", "healthy"]
    values = [first_value(samples, "vllm_runtime_startup_phase_seconds", phase=p) for p in phases]
    assert all(v is not None for v in values), dict(zip(phases, values, strict=True))
    assert values == sorted(values)  # type: ignore[type-var]
    status = status_file(served_tiny_model)
    assert list(status["phases"]) and set(status["phases"]) == set(phases)  # type: ignore[call-overload]
    assert status["ready"] is True and status["commit"] == served_tiny_model.commit
    assert status["compileCache"]["warm"] is False  # type: ignore[index]  # the first start compiled
    assert list((served_tiny_model.cache_dir / "state" / "leases").glob("*.lease"))


def test_sigterm_drains_then_a_restart_reuses_the_compile_cache(served_tiny_model: ServedModel) -> None:
    first_status = status_file(served_tiny_model)
    compile_dir = Path(first_status["compileCache"]["dir"])  # type: ignore[index]
    files_after_first = {p for p in compile_dir.rglob("*") if p.is_file()}
    assert files_after_first, "the first start left compiled artifacts on the cache volume"

    # SIGTERM: vLLM drains and stops; serve exits with vLLM's status and says so.
    code = served_tiny_model.server.stop()
    assert code == 0
    message = served_tiny_model.server.termination_message()
    assert message is not None and message["ok"] is True and message["exitCode"] == 0
    log = served_tiny_model.server.log_text()
    assert "received SIGTERM" in log and "[shutdown]" in log  # forwarded, and vLLM shut down itself
    assert not list((served_tiny_model.cache_dir / "state" / "leases").glob("*.lease"))

    # Restart: same configuration -> same compile directory, found warm, artifacts loaded from it.
    again = served_tiny_model.new_server("serve-2").start()
    try:
        again.wait_ready(timeout=READY_TIMEOUT)
        status = status_file(served_tiny_model)
        cache = status["compileCache"]
        assert cache["dir"] == str(compile_dir) and cache["warm"] is True  # type: ignore[index]
        assert status["compileArtifactFound"] is True
        assert first_value(scrape(again.metrics)[1], "vllm_runtime_compile_cache_warm") == 1.0
        load_lines = [
            line
            for line in again.log_text().splitlines()
            if ("Directly load" in line or "load failure from" in line) and str(compile_dir) in line
        ]
        assert load_lines, "vLLM looked up its compiled graph in the volume's compile directory"
        assert files_after_first <= {p for p in compile_dir.rglob("*") if p.is_file()}  # reused, not rebuilt anew
        assert complete(again.api, served_tiny_model.repo_id, "Hi", max_tokens=2)["usage"]["completion_tokens"] >= 1
    finally:
        assert again.stop() == 0


def test_max_model_len_that_does_not_fit_the_kv_cache_is_classified(served_tiny_model: ServedModel) -> None:
    # 200 kB of KV cache holds fewer than 256 tokens of this model: vLLM refuses to start.
    # (VLLM_CPU_KVCACHE_SPACE would override --kv-cache-memory-bytes on the CPU build: leave it out.)
    env = {k: v for k, v in serve_env().items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    failing = served_tiny_model.new_server("serve-kv-too-small", "--max-model-len", "256",
                                           "--kv-cache-memory-bytes", "200000", env=env)  # fmt: skip
    failing.start()
    try:
        with pytest.raises(RuntimeError, match="before it was ready"):
            failing.wait_ready(timeout=READY_TIMEOUT)
    finally:
        code = failing.stop()  # never leave a server behind, whatever happened
    assert code == 1  # vLLM's own status
    message = failing.termination_message()
    assert message is not None and message["ok"] is False
    assert message["reason"] == failures.KV_CACHE_TOO_SMALL
    assert "spec.maxModelLen" in message["message"]
