"""Classify why vLLM failed to start, from its output, and say what to change in the VLLMModel.

vLLM reports start-up failures only as log lines and tracebacks. The patterns below follow
vLLM 0.32's own wording (v1/core/kv_cache_utils.py, v1/worker/utils.py, v1/worker/cpu_worker.py,
config/vllm.py, config/model.py, model_executor/model_loader/*, its argument parser),
transformers' and safetensors' messages, and PyTorch's OOM error. Wording changes between
releases, so patterns match loosely and the tests run every rule on output captured from real
vLLM runs (tests/fixtures/vllm_logs, made by its capture.py) wherever vLLM's CPU build can fail
that way; pin the image's vLLM version.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Reasons (CamelCase, Kubernetes condition style); all are permanent for the given spec:
# restarting the same pod with the same settings fails the same way.
OUT_OF_MEMORY = "OutOfMemory"
NO_KV_CACHE_MEMORY = "NoKVCacheMemory"
KV_CACHE_TOO_SMALL = "KVCacheTooSmall"
QUANTIZATION_UNSUPPORTED = "QuantizationUnsupported"
QUANTIZATION_MISMATCH = "QuantizationMismatch"
MISSING_FILES = "MissingFiles"
CORRUPT_FILES = "CorruptFiles"
REMOTE_CODE_NOT_TRUSTED = "RemoteCodeNotTrusted"
UNSUPPORTED_ARCHITECTURE = "UnsupportedArchitecture"
MAX_MODEL_LEN_TOO_LARGE = "MaxModelLenTooLarge"
# Also said by ``vllm-runtime serve`` itself when its memory check refuses to start vLLM.
INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
INVALID_ARGS = "InvalidArgs"  # vLLM's argument parser refused its command line (spec.extraArgs, mostly)
VLLM_FAILED = "VLLMFailed"  # not recognised: the message carries vLLM's last error line

SERVE_REASONS = frozenset(
    {
        OUT_OF_MEMORY,
        NO_KV_CACHE_MEMORY,
        KV_CACHE_TOO_SMALL,
        QUANTIZATION_UNSUPPORTED,
        QUANTIZATION_MISMATCH,
        MISSING_FILES,
        CORRUPT_FILES,
        REMOTE_CODE_NOT_TRUSTED,
        UNSUPPORTED_ARCHITECTURE,
        MAX_MODEL_LEN_TOO_LARGE,
        INSUFFICIENT_GPU_MEMORY,
        INVALID_ARGS,
        VLLM_FAILED,
    }
)


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str  # what happened and what to change in the VLLMModel spec
    evidence: str  # the vLLM line it was recognised from (trimmed)
    rule: str = ""  # the name of the rule that recognised it; "" for the generic VLLMFailed


@dataclass(frozen=True)
class _Rule:
    name: str  # unique: the tests name the captured log that proves each rule
    reason: str
    pattern: re.Pattern[str]
    advice: Callable[[re.Match[str]], str]


def _kv_too_small(m: re.Match[str]) -> str:
    estimate = m.group("estimate")
    fix = (
        f"set spec.maxModelLen to {estimate} or less (vLLM's estimate for the memory available)"
        if estimate
        else "lower spec.maxModelLen"
    )
    return (
        f"The KV cache cannot hold one request of spec.maxModelLen ({m.group('len')}) tokens: it needs "
        f"{m.group('needed')} GiB but only {m.group('available')} GiB is available. {fix}; or raise "
        "spec.gpuMemoryUtilization, set spec.kvCacheDtype: fp8, raise spec.tensorParallelSize, or use a "
        "larger GPU."
    )


def _memory_not_free(m: re.Match[str]) -> str:
    free, total = float(m.group("free")), float(m.group("total"))
    fits = math.floor(free / total * 100) / 100 if total > 0 else 0.0
    return (
        f"vLLM was to take {m.group('util')} of the {m.group('kind') or 'GPU'}'s memory ({m.group('requested')} GiB "
        f"of {m.group('total')} GiB) at start-up, but only {m.group('free')} GiB is free: another process holds the "
        f"rest. Lower spec.gpuMemoryUtilization to {fits:.2f} or less, or move the model to a GPU nothing else "
        "uses (spec.gpu, spec.nodeSelector)."
    )


_RULES: tuple[_Rule, ...] = (
    _Rule(
        "kv-cache-too-small",
        KV_CACHE_TOO_SMALL,
        re.compile(
            r"max seq len \((?P<len>\d+)\).*?\((?P<needed>[\d.]+) GiB KV cache is needed.*?"
            r"available KV cache memory \((?P<available>[\d.]+) GiB\)"
            r"(?:.*?estimated maximum model length is (?P<estimate>\d+))?"
        ),
        _kv_too_small,
    ),
    _Rule(
        "no-kv-cache-memory",
        NO_KV_CACHE_MEMORY,
        re.compile(r"No available memory for the cache blocks"),
        lambda m: (
            "After loading the weights no memory is left for the KV cache. Raise spec.gpuMemoryUtilization "
            "(at most 0.95 when nothing else uses the GPU), use a quantized model (spec.quantization), raise "
            "spec.tensorParallelSize, or use a GPU with more memory."
        ),
    ),
    _Rule(
        "memory-not-free-at-start",
        INSUFFICIENT_GPU_MEMORY,
        re.compile(
            r"(?:Available|Free) memory on (?:node|device) \S+ \((?P<free>[\d.]+)/(?P<total>[\d.]+) GiB\) on startup "
            r"is less than (?:desired (?P<kind>GPU|CPU) memory utilization|the engine's budget[^(]*)"
            r" \((?P<util>[\d.]+), (?P<requested>[\d.]+) GiB\)"
        ),
        _memory_not_free,
    ),
    _Rule(
        "cuda-out-of-memory",
        OUT_OF_MEMORY,
        re.compile(
            r"(?:torch\.)?(?:cuda\.)?OutOfMemoryError:?\s*(?P<detail>CUDA out of memory\..{0,120})?"
            r"|CUDA out of memory\.(?P<detail2>.{0,120})|CUDA error: out of memory"
        ),
        lambda m: (
            "vLLM ran out of GPU memory while starting. The weights plus activations do not fit: use a "
            "quantized model (spec.quantization), raise spec.tensorParallelSize (more GPUs), lower "
            "spec.maxModelLen, or use a GPU with more memory; if another process shares the GPU, lower "
            "spec.gpuMemoryUtilization. `vllm-runtime plan` estimates what fits."
        ),
    ),
    _Rule(
        "quantization-capability",
        QUANTIZATION_UNSUPPORTED,
        re.compile(
            r"The quantization method (?P<method>\S+) is not supported for the current GPU\. "
            r"Minimum capability: (?P<min>\d+)\. Current capability: (?P<cur>\d+)"
        ),
        lambda m: (
            f"spec.quantization {m.group('method')} needs GPU compute capability {_capability(m.group('min'))} "
            f"or newer; this GPU has {_capability(m.group('cur'))}. Schedule on a newer GPU (spec.gpu, "
            "spec.nodeSelector) or use a model quantized with a method this GPU supports (for example awq or "
            "gptq)."
        ),
    ),
    _Rule(
        "quantization-dtype",
        QUANTIZATION_UNSUPPORTED,
        re.compile(
            r"(?P<dtype>torch\.\w+|\w+) is not supported for quantization method (?P<method>\S+)\. "
            r"Supported dtypes: (?P<supported>\[.*?\])"
        ),
        lambda m: (
            f"dtype {m.group('dtype')} is not supported with quantization {m.group('method')}: set spec.dtype "
            f"to one of {m.group('supported')} (for example float16 or bfloat16)."
        ),
    ),
    _Rule(
        "quantization-unknown",
        QUANTIZATION_UNSUPPORTED,
        re.compile(r"Unknown quantization method: (?P<method>[^.\s]+)"),
        lambda m: (
            f"This vLLM does not know spec.quantization {m.group('method')}: pick one of the methods it lists, "
            "or leave spec.quantization unset to use the model's own quantization config."
        ),
    ),
    _Rule(
        "quantization-platform",
        QUANTIZATION_UNSUPPORTED,
        re.compile(r"(?P<method>\S+) quantization is (?:currently )?not supported in (?P<platform>\w+)"),
        lambda m: (
            f"spec.quantization {m.group('method')} is not supported on {m.group('platform')}: use a model "
            "quantized with a supported method, or run on a GPU that supports it."
        ),
    ),
    _Rule(
        "quantization-mismatch",
        QUANTIZATION_MISMATCH,
        re.compile(
            r"Quantization method specified in the model config \((?P<model>[^)]*)\) does not match the "
            r"quantization method specified in the `?quantization`? argument \((?P<arg>[^)]*)\)"
        ),
        lambda m: (
            f"The model is quantized with {m.group('model')} but spec.quantization is {m.group('arg')}: set "
            f"spec.quantization to {m.group('model')} or leave it unset (vLLM reads it from the model)."
        ),
    ),
    _Rule(
        "remote-code-not-trusted",
        REMOTE_CODE_NOT_TRUSTED,
        re.compile(
            r"contains custom code which must be executed|references custom code contained in"
            r"|pass the argument `?trust_remote_code=True`?"
        ),
        lambda m: (
            "The model needs its own Python code from the repository. If you trust the repository, set "
            "spec.trustRemoteCode: true (the code is cached with the weights and runs inside the pod)."
        ),
    ),
    _Rule(
        "corrupt-files",
        CORRUPT_FILES,
        re.compile(
            r"SafetensorError|Error while deserializing header|HeaderTooLarge|incomplete metadata"
            r"|MetadataIncompleteBuffer|PytorchStreamReader failed|invalid load key|unexpected EOF"
            r"|JSONDecodeError.*config"
        ),
        lambda m: (
            "A cached model file is corrupt. Delete this commit from the cache volume "
            "(`vllm-runtime rm --model ... --revision ...`) so the cache Job downloads and verifies it again."
        ),
    ),
    _Rule(
        "missing-files",
        MISSING_FILES,
        re.compile(
            r"Cannot find any model weights|No model weights found|does not appear to have a file named"
            r"|is not a local folder and is not a valid model identifier|LocalEntryNotFoundError"
            r"|Cannot find the requested files in the (?:local|disk) cache|Can't load (?:the )?(?:config|tokenizer)"
            r"|OfflineModeIsEnabled|No such file or directory: '[^']*(?:config\.json|\.safetensors|tokenizer)"
        ),
        lambda m: (
            "vLLM could not find the model's files in the cache. Check spec.model and spec.revision (the "
            "cached commit must contain config.json, the tokenizer and the weights), check spec.loadFormat "
            "matches the weight files, and re-run the cache (`vllm-runtime rm` the commit, then cache again)."
        ),
    ),
    _Rule(
        "unsupported-architecture",
        UNSUPPORTED_ARCHITECTURE,
        re.compile(r"Model architectures? \[?(?P<arch>[^\]]*)\]? (?:are|is) not supported"),
        lambda m: (
            f"This vLLM does not support the model architecture {m.group('arch')}: use an image with a newer "
            "vLLM (spec.image), or, if the repository provides its own code, set spec.trustRemoteCode: true."
        ),
    ),
    _Rule(
        "max-model-len-too-large",
        MAX_MODEL_LEN_TOO_LARGE,
        re.compile(
            r"User-specified max_model_len \((?P<len>\d+)\) is greater than the derived max_model_len"
            r" \((?P<derived>[^)]*)\)"
        ),
        lambda m: (
            f"spec.maxModelLen ({m.group('len')}) is longer than the model supports ({m.group('derived')}): "
            "lower spec.maxModelLen to that, or leave it unset (vLLM then uses the model's own maximum)."
        ),
    ),
    _Rule(
        "argument-refused",
        INVALID_ARGS,
        # argparse's last line: "<prog>: error: argument --dtype: invalid choice: ..." or "unrecognized arguments"
        re.compile(r"^(?:[\w.-]+\.py|vllm(?: \w+)?): error: (?P<detail>.+)$", re.MULTILINE),
        lambda m: (
            f"vLLM refused its command line: {m.group('detail').strip()[:300]}. Fix spec.extraArgs (vLLM "
            "0.32's flags), or the spec field that sets this flag."
        ),
    ),
)


def _capability(value: str) -> str:
    """vLLM writes compute capability 8.0 as 80."""
    return f"{value[:-1]}.{value[-1]}" if value.isdigit() and len(value) >= 2 else value


def classify(output: str | Iterable[str]) -> Failure | None:
    """The first rule (in priority order) that matches vLLM's output, or None.

    Rules are ordered from most to least specific: a KV-cache shortfall also mentions
    memory, and an OOM traceback may mention files.
    """
    text = output if isinstance(output, str) else "\n".join(output)
    for rule in _RULES:
        matches = list(rule.pattern.finditer(text))
        if matches:
            m = matches[-1]  # the last occurrence is the one that ended the process
            evidence = _line_of(text, m).strip()[:500]
            return Failure(reason=rule.reason, message=rule.advice(m), evidence=evidence, rule=rule.name)
    return None


def classify_or_generic(output: str | Iterable[str], exit_code: int) -> Failure:
    """``classify``, else a generic failure quoting vLLM's last error line."""
    lines = output.splitlines() if isinstance(output, str) else list(output)
    found = classify(lines)
    if found:
        return found
    last = last_error_line(lines)
    return Failure(
        reason=VLLM_FAILED,
        message=f"vLLM exited with status {exit_code}" + (f": {last}" if last else "") + ". See the pod's log.",
        evidence=last or "",
    )


# pydantic puts the real reason on the line after "ValidationError: 1 validation error for ModelConfig";
# a traceback's source line ("raise RuntimeError(") names an error but says nothing.
_ERROR_LINE = re.compile(r"(?<!raise )\b(?:[A-Z]\w*(?:Error|Exception)|RuntimeError|AssertionError)\b:?|^\s*Value error, ")


# vLLM's front end ends every engine failure with this; the cause is an earlier error line.
_WRAPPER_LINE = re.compile(r"Engine core initialization failed\. See root cause above")


def last_error_line(lines: Iterable[str]) -> str | None:
    """The last line that names an error, passing over vLLM's "see root cause above" wrapper."""
    found = wrapper = None
    for line in lines:
        if _ERROR_LINE.search(line):
            if _WRAPPER_LINE.search(line):
                wrapper = line.strip()
            else:
                found = line.strip()
    found = found or wrapper
    return found[:500] if found else None


def _line_of(text: str, m: re.Match[str]) -> str:
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    return text[start : end if end != -1 else len(text)]
