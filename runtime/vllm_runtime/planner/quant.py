"""Parameter counts and weight bytes from safetensors headers, and sizes under quantization.

When the checkpoint is already quantized (GPTQ/AWQ/compressed-tensors packed int32, FP8, MXFP4,
pre-quantized bitsandbytes), the headers list the packed tensors and their scales, so the bytes
are counted exactly; the logical parameter count unpacks them with the ``quantization_config``'s
bit width. When an unquantized checkpoint is to be quantized on load (``--quantization fp8`` or
``bitsandbytes``), or when a quantized variant is considered, the linear layers' sizes are
projected from bit width and group size.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .sources import TensorSpec

DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}  # fmt: skip

# Suffixes of tensors that carry quantization metadata, not model parameters.
_METADATA_SUFFIXES = (
    ".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_scale_inv", ".input_scale", ".output_scale",
    ".k_scale", ".v_scale", ".weight_zero_point", ".weight_g_idx", ".weight_shape", ".absmax", ".quant_map",
    ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4",
    "_scales", ".weight_global_scale", ".input_global_scale",
)  # fmt: skip
# Packed int32 tensors hold 32/bits values each.
_PACKED_INT_SUFFIXES = (".qweight", ".weight_packed")
# Quantization methods that need a checkpoint quantized ahead of time.
PREQUANTIZED_METHODS = {
    "awq", "awq_marlin", "gptq", "gptq_marlin", "auto_awq", "auto_gptq", "compressed-tensors", "modelopt",
    "modelopt_fp4", "gpt_oss_mxfp4", "mxfp4", "quark", "moe_wna16", "fp_quant", "inc",
}  # fmt: skip
# Methods that quantize an unquantized checkpoint while loading it: weight bits per linear parameter.
ONLINE_METHODS_BITS: dict[str, float] = {
    "fp8": 8,
    "fp8_per_tensor": 8,
    "fp8_per_channel": 8,
    "fp8_per_block": 8,
    "fbgemm_fp8": 8,
    "int8_per_channel_weight_only": 8,
    "experts_int8": 8,
    "bitsandbytes": 4.5,  # nf4 with one fp32 absmax per 64 values
    "mxfp8": 8.25,
}
_METHOD_FAMILY = {"awq_marlin": "awq", "auto_awq": "awq", "gptq_marlin": "gptq", "auto_gptq": "gptq", "gpt_oss_mxfp4": "mxfp4"}


@dataclass
class WeightCount:
    parameters: int
    weight_bytes: int
    sharded_bytes: int  # split across tensor-parallel ranks
    replicated_bytes: int  # 1-D tensors (norms, biases, scales): kept whole on every rank
    bytes_by_dtype: dict[str, int]
    linear_parameters: int  # in decoder-layer matrices (what quantization shrinks)
    other_parameters: int  # embeddings, lm_head, norms, routers
    quant_method: str | None
    bits: int | None
    group_size: int | None
    notes: list[str] = field(default_factory=list)

    def bytes_per_gpu(self, tensor_parallel_size: int) -> int:
        return -(-self.sharded_bytes // max(1, tensor_parallel_size)) + self.replicated_bytes


def quantization_config(config: dict[str, Any]) -> dict[str, Any]:
    q = config.get("quantization_config") or config.get("compression_config") or {}
    if not q and isinstance(config.get("text_config"), dict):
        q = config["text_config"].get("quantization_config") or {}
    return q if isinstance(q, dict) else {}


def checkpoint_method(config: dict[str, Any]) -> str | None:
    q = quantization_config(config)
    method = q.get("quant_method")
    if method == "bitsandbytes" or q.get("load_in_4bit") or q.get("load_in_8bit"):
        return "bitsandbytes"
    return str(method) if method else None


def method_family(method: str | None) -> str | None:
    return _METHOD_FAMILY.get(method, method) if method else None


def _weight_bits(q: dict[str, Any]) -> int | None:
    if isinstance(q.get("bits"), int):
        return int(q["bits"])
    if q.get("load_in_8bit"):
        return 8
    if q.get("load_in_4bit"):
        return 4
    for group in (q.get("config_groups") or {}).values():  # compressed-tensors
        weights = group.get("weights") or {}
        if isinstance(weights.get("num_bits"), int):
            return int(weights["num_bits"])
    return None


def _group_size(q: dict[str, Any]) -> int | None:
    if isinstance(q.get("group_size"), int):
        return int(q["group_size"])
    for group in (q.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if isinstance(weights.get("group_size"), int):
            return int(weights["group_size"])
    return None


def is_linear_weight(name: str, spec: TensorSpec) -> bool:
    """A matrix inside a decoder layer (attention or MLP/experts): what weight quantization targets."""
    if ".layers." not in name and ".h." not in name and ".blocks." not in name:
        return False
    if any(part in name for part in ("norm", ".router.", ".gate.weight", "embed")):
        return False
    return len(spec.shape) >= 2 and (name.endswith(".weight") or name.endswith("_proj") or name.endswith("_blocks"))


def _logical_numel(name: str, spec: TensorSpec, bits: int | None) -> int:
    if name.endswith(_PACKED_INT_SUFFIXES) and spec.dtype in ("I32", "U32") and bits:
        return spec.numel * (32 // bits)
    if name.endswith("_blocks") and spec.dtype == "U8":  # MXFP4: two 4-bit values per byte
        return spec.numel * 2
    if spec.dtype == "U8" and name.endswith(".weight") and spec.shape[-1:] == (1,):  # bitsandbytes 4-bit
        return spec.numel * 2
    return spec.numel


def count_weights(tensors: dict[str, TensorSpec], config: dict[str, Any]) -> WeightCount:
    """Exact bytes as stored, and the logical parameter count, from the headers."""
    q = quantization_config(config)
    method = checkpoint_method(config)
    bits = _weight_bits(q)
    params = linear = other = 0
    total = sharded = replicated = 0
    by_dtype: dict[str, int] = {}
    notes: list[str] = []
    unknown: set[str] = set()
    for name, spec in tensors.items():
        size = DTYPE_BYTES.get(spec.dtype)
        if size is None:
            unknown.add(spec.dtype)
            size = 2
        nbytes = int(spec.numel * size)
        total += nbytes
        by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + nbytes
        if len(spec.shape) >= 2:
            sharded += nbytes
        else:
            replicated += nbytes
        if name.endswith(_METADATA_SUFFIXES) or name.endswith(".inv_freq"):
            continue
        n = _logical_numel(name, spec, bits)
        params += n
        if is_linear_weight(name, spec) or name.endswith(_PACKED_INT_SUFFIXES):
            linear += n
        else:
            other += n
    if unknown:
        notes.append(f"unknown safetensors dtypes {sorted(unknown)} counted as 2 bytes per element")
    return WeightCount(
        parameters=params,
        weight_bytes=total,
        sharded_bytes=sharded,
        replicated_bytes=replicated,
        bytes_by_dtype=by_dtype,
        linear_parameters=linear,
        other_parameters=other,
        quant_method=method,
        bits=bits,
        group_size=_group_size(q),
        notes=notes,
    )


def project_weights(
    tensors: dict[str, TensorSpec], config: dict[str, Any], *, bits: float, group_size: int | None = 128,
    scale_bytes: int = 2, skip: tuple[str, ...] = (),
) -> WeightCount:  # fmt: skip
    """Sizes if the decoder layers' matrices were stored at ``bits`` per value with one scale (and for
    int formats a packed zero point) per ``group_size`` values; everything else stays as stored."""
    base = count_weights(tensors, config)
    if base.quant_method:
        return base  # already quantized: the stored sizes are what loads
    total = sharded = replicated = 0
    for name, spec in tensors.items():
        nbytes = int(spec.numel * DTYPE_BYTES.get(spec.dtype, 2))
        if is_linear_weight(name, spec) and not any(fnmatch.fnmatch(name, p) for p in skip):
            per_group = (scale_bytes + bits / 8) if group_size else 0  # scale + packed zero point
            groups = spec.numel / group_size if group_size else 1
            nbytes = int(spec.numel * bits / 8 + groups * per_group + (0 if group_size else 4))
        total += nbytes
        if len(spec.shape) >= 2:
            sharded += nbytes
        else:
            replicated += nbytes
    return WeightCount(
        parameters=base.parameters,
        weight_bytes=total,
        sharded_bytes=sharded,
        replicated_bytes=replicated,
        bytes_by_dtype={},
        linear_parameters=base.linear_parameters,
        other_parameters=base.other_parameters,
        quant_method=None,
        bits=int(bits),
        group_size=group_size,
    )


def weights_under(
    tensors: dict[str, TensorSpec], config: dict[str, Any], quantization: str | None
) -> tuple[WeightCount, list[str]]:
    """Weights as vLLM would hold them with ``--quantization``; and problems with that choice."""
    stored = count_weights(tensors, config)
    problems: list[str] = []
    if not quantization or quantization == "auto":
        return stored, problems
    ckpt = stored.quant_method
    if ckpt:
        if method_family(quantization) != method_family(ckpt) and quantization not in ("compressed-tensors",):
            problems.append(
                f"quantization {quantization!r} does not match the checkpoint's quantization_config "
                f"({ckpt!r}): vLLM refuses to start; set quantization to {ckpt!r} or leave it empty"
            )
        return stored, problems
    if quantization in ONLINE_METHODS_BITS:
        bits = ONLINE_METHODS_BITS[quantization]
        if quantization == "bitsandbytes":
            projected = project_weights(tensors, config, bits=4, group_size=64, scale_bytes=4)
        else:
            projected = project_weights(tensors, config, bits=bits, group_size=None)
        projected.quant_method = quantization
        projected.notes.append(f"{quantization}: decoder-layer matrices quantized while loading; embeddings kept")
        return projected, problems
    if quantization in PREQUANTIZED_METHODS:
        problems.append(
            f"quantization {quantization!r} needs a checkpoint quantized with it, but this one has no "
            "quantization_config: pick a pre-quantized variant of the model (e.g. a '-AWQ' or '-GPTQ' repo) "
            "or use fp8, which quantizes while loading"
        )
    else:
        problems.append(f"quantization {quantization!r} is not sized by the planner; weights counted as stored")
    return stored, problems


# PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp): sizes round up to 512 bytes;
# requests up to 1 MiB share 2 MiB segments, up to 10 MiB share 20 MiB segments, larger ones get
# their own segment rounded up to 2 MiB; a large block's tail of 1 MiB or less is not split off
# and counts as allocated. Many small quantization tensors (scales, zeros, g_idx) make this visible.
_MIN_BLOCK = 512
_SMALL_SIZE = 1 << 20
_SMALL_BUFFER = 2 << 20
_LARGE_BUFFER = 20 << 20
_MIN_LARGE_ALLOC = 10 << 20
_ROUND_LARGE = 2 << 20


def cuda_allocated_bytes(sizes: list[int]) -> int:
    """Bytes ``torch.cuda.memory_allocated`` reports after allocating tensors of ``sizes`` in order."""
    free: dict[bool, list[int]] = {True: [], False: []}  # small pool?, free block sizes
    allocated = 0
    for size in sizes:
        rounded = max(_MIN_BLOCK, -(-size // _MIN_BLOCK) * _MIN_BLOCK)
        small = rounded <= _SMALL_SIZE
        pool = free[small]
        fitting = [b for b in pool if b >= rounded]
        if fitting:
            block = min(fitting)
            pool.remove(block)
        elif small:
            block = _SMALL_BUFFER
        elif rounded < _MIN_LARGE_ALLOC:
            block = _LARGE_BUFFER
        else:
            block = -(-rounded // _ROUND_LARGE) * _ROUND_LARGE
        remaining = block - rounded
        if remaining >= _MIN_BLOCK if small else remaining > _SMALL_SIZE:
            pool.append(remaining)
            block = rounded
        allocated += block
    return allocated


def tensor_bytes(tensors: dict[str, TensorSpec], order: list[str]) -> list[int]:
    """Stored sizes of the named tensors, in the given order."""
    return [int(tensors[n].numel * DTYPE_BYTES.get(tensors[n].dtype, 2)) for n in order]
