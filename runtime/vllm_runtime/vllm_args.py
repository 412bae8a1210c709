"""The one mapping from VLLMModel spec fields to vLLM command-line flags.

The operator uses it to write the Deployment's command line; ``vllm-runtime serve`` uses it
to check and interpret the arguments it passes to vLLM. Keep it the only place that knows
vLLM's flag names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# spec field -> vLLM flag, for fields that take a value.
VALUE_FLAGS: dict[str, str] = {
    "quantization": "--quantization",
    "dtype": "--dtype",
    "gpuMemoryUtilization": "--gpu-memory-utilization",
    "maxModelLen": "--max-model-len",
    "tensorParallelSize": "--tensor-parallel-size",
    "loadFormat": "--load-format",
    "seed": "--seed",
    "kvCacheDtype": "--kv-cache-dtype",
    "servedModelName": "--served-model-name",
}
# spec field -> vLLM flag, for booleans (the flag is passed only when true).
BOOL_FLAGS: dict[str, str] = {
    "enforceEager": "--enforce-eager",
    "trustRemoteCode": "--trust-remote-code",
}

# Flags the operator and runtime own: set from dedicated spec fields or by the runtime itself.
# ``spec.extraArgs`` may not contain them (the CRD's CEL rules and ``check_extra_args`` refuse them).
OWNED_FLAGS: frozenset[str] = frozenset(
    {
        "--model",
        "--revision",
        "--tokenizer-revision",
        "--code-revision",
        "--download-dir",
        "--host",
        "--port",
        *VALUE_FLAGS.values(),
        *BOOL_FLAGS.values(),
    }
)

# vLLM's short aliases of owned flags (``-q awq``, ``-tp 2``); refused in ``spec.extraArgs`` like the long forms.
OWNED_SHORT_FLAGS: dict[str, str] = {"-q": "--quantization", "-tp": "--tensor-parallel-size"}
# vLLM's other long names of owned flags (the same setting); refused in ``spec.extraArgs`` like the owned names.
OWNED_LONG_ALIASES: dict[str, str] = {"--device-memory-utilization": "--gpu-memory-utilization"}

# vLLM's parser is argparse with ``allow_abbrev``: it takes any unambiguous prefix of a long flag
# (``--max-model-le``), underscores for dashes, ``--no-<flag>`` for booleans (BooleanOptionalAction), a
# value glued to a short flag (``-qfp8``), and a dotted name as a JSON field of the flag before the dot
# (``--served-model-name.x y`` sets --served-model-name to '{"x": "y"}'). These full vLLM flags are
# prefixes of an owned flag but are not abbreviations of it: argparse prefers an exact match (no full vLLM
# flag is a prefix of a LoRA flag, ``LORA_FLAGS``; tests/test_validation.py checks both against vLLM's parser).
NOT_ABBREVIATIONS: frozenset[str] = frozenset({"--tokenizer"})
# ``--config FILE`` (this exact token; vLLM loads no file for ``--config=FILE``) fills every flag the command
# line leaves out from a YAML file in the pod, owned ones included (``served-model-name``, ``max-model-len``):
# refused like an owned flag, since the file's flags can be written in ``spec.extraArgs`` themselves.
CONFIG_FILE_FLAG = "--config"

# Settings that change compiled graphs; only identical values may share a compile cache.
COMPILE_KEY_FIELDS = ("quantization", "dtype", "tensorParallelSize", "kvCacheDtype", "maxModelLen", "enforceEager")

# LoRA: ``vllm-runtime serve --adapters-file`` sets these (defaults from the adapters' ranks); spec field -> flag.
ENABLE_LORA_FLAG = "--enable-lora"
LORA_FLAGS: dict[str, str] = {
    "maxLoras": "--max-loras",
    "maxLoraRank": "--max-lora-rank",
    "maxCpuLoras": "--max-cpu-loras",
}
# LoRA layers change the compiled graphs too; keyed only when set, so servers without adapters keep their key.
LORA_KEY_FIELDS = ("enableLora", *LORA_FLAGS)


def lora_flags(*, max_loras: int, max_lora_rank: int, max_cpu_loras: int) -> list[str]:
    """vLLM's flags for a server that loads adapters at runtime (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
    values = {"maxLoras": max_loras, "maxLoraRank": max_lora_rank, "maxCpuLoras": max_cpu_loras}
    return [ENABLE_LORA_FLAG, *(arg for key, flag in LORA_FLAGS.items() for arg in (flag, str(values[key])))]


def lora_flag_of(arg: str) -> str | None:
    """The LoRA flag (long form) that vLLM's parser would take ``arg`` for, or None: the rules of
    :func:`owned_flag_of` (``--max-lora-r``, ``--max_cpu_loras=8``, ``--max-loras.x``, ``--no-enable-lora``;
    a prefix of several flags, such as ``--max-lora``, too, since vLLM refuses it as ambiguous)."""
    return _long_flag_of(arg, _lora_long_names()) if arg.startswith("--") else None


def lora_flags_in(args: Sequence[str]) -> list[tuple[str, str]]:
    """(argument as given, the LoRA flag it reaches) for each of ``args`` that reaches one, in any spelling
    vLLM accepts (:func:`lora_flag_of`); empty when none."""
    return [(arg, flag) for arg in args if (flag := lora_flag_of(arg)) is not None]


class OwnedFlagError(ValueError):
    """``spec.extraArgs`` reaches a flag the operator or the runtime sets (in any spelling vLLM accepts)."""

    def __init__(self, found: Sequence[tuple[str, str]]) -> None:
        self.field = "spec.extraArgs"
        self.found = tuple(found)  # (argument as given, the owned flag it reaches)
        by_flag = {flag: field for field, flag in {**VALUE_FLAGS, **BOOL_FLAGS}.items()}
        hints = []
        for arg, flag in self.found:
            spelled = flag if _flag_name(arg) == flag else f"{arg!r} = {flag}"
            field = by_flag.get(flag)
            if flag == CONFIG_FILE_FLAG:
                hints.append(f"{flag} (it reads flags from a file, owned ones included: write them in spec.extraArgs)")
            else:
                hints.append(f"{spelled} (use spec.{field})" if field else f"{spelled} (set by the operator)")
        self.message = "may not contain flags the operator owns, in any spelling vLLM accepts: " + ", ".join(hints)
        super().__init__(f"{self.field} {self.message}")


def _flag_name(arg: str) -> str:
    """``--max_model_len=4096`` -> ``--max-model-len``: vLLM reads underscores in long flags as dashes."""
    name = arg.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def _owned_long_names() -> dict[str, str]:
    """Every long spelling vLLM parses as an owned flag, without abbreviation -> the owned flag."""
    names = {flag: flag for flag in OWNED_FLAGS}
    names.update(OWNED_LONG_ALIASES)
    names.update({"--no-" + flag[2:]: flag for flag in BOOL_FLAGS.values()})
    return names


def _lora_long_names() -> dict[str, str]:
    """Every long spelling vLLM parses as a LoRA flag, without abbreviation -> the LoRA flag."""
    names = {flag: flag for flag in (ENABLE_LORA_FLAG, *LORA_FLAGS.values())}
    names["--no-" + ENABLE_LORA_FLAG[2:]] = ENABLE_LORA_FLAG  # --enable-lora is a BooleanOptionalAction
    return names


def _long_flag_of(arg: str, long_names: Mapping[str, str]) -> str | None:
    """The flag of ``long_names`` (spelling -> flag) that vLLM's parser would take the long flag ``arg`` for,
    or None: underscores for dashes, ``=value``, ``--flag.key`` (a JSON field of ``--flag``), and any prefix
    of a spelling (an abbreviation; a prefix of several flags is refused too, as vLLM refuses it as ambiguous)
    other than a full vLLM flag of its own (``NOT_ABBREVIATIONS``)."""
    name = _flag_name(arg).split(".", 1)[0]  # vLLM reads ``--flag.key`` as a JSON field of ``--flag``
    if name == "--" or name in NOT_ABBREVIATIONS:
        return None
    reached = sorted(flag for spelled, flag in long_names.items() if spelled.startswith(name))
    return long_names.get(name) or (reached[0] if reached else None)


def owned_flag_of(arg: str) -> str | None:
    """The owned flag that vLLM's parser would take ``arg`` for, or None.

    ``--max-model-le=1``, ``--max_model_len``, ``--no-enforce-eager``, ``--served-model-name.x``,
    ``--device-memory-utilization``, ``-qfp8``, ``-tp=2`` and ``-t`` all reach an owned flag. A prefix of
    several flags is refused too (vLLM refuses it as ambiguous). ``--config`` (a file of flags) is refused too.
    """
    if arg == CONFIG_FILE_FLAG:
        return CONFIG_FILE_FLAG
    if arg.startswith("--"):
        return _long_flag_of(arg, _owned_long_names())
    if arg.startswith("-"):
        name = arg.split("=", 1)[0].split(".", 1)[0]
        for short, owned in OWNED_SHORT_FLAGS.items():
            glued = arg.startswith(short)  # -qfp8, -tp=2, -tp2
            abbreviated = len(name) >= 2 and short.startswith(name)  # -t for -tp, -t.x
            if glued or abbreviated:
                return owned
    return None


def owned_flags_in(extra_args: Sequence[str]) -> list[str]:
    """The owned flags that ``extra_args`` reach, in any spelling (empty when none), as their long form."""
    return [owned for owned in map(owned_flag_of, extra_args) if owned is not None]


def disguised_owned_flags_in(args: Sequence[str]) -> list[str]:
    """Arguments that reach an owned flag in a spelling ``vllm_flags`` never writes (an abbreviation, a
    short form, underscores, ``--no-``, a dotted field, or ``--config``): ``vllm-runtime serve`` refuses them,
    since only ``spec.extraArgs`` can have put them there."""
    return [arg for arg in args if owned_flag_of(arg) is not None and arg.split("=", 1)[0] not in OWNED_FLAGS]


def check_extra_args(extra_args: Sequence[str]) -> None:
    """Raise :class:`OwnedFlagError` (naming ``spec.extraArgs`` and the field to use instead) when an
    argument reaches an owned flag. The CRD's rule (:func:`cel_owned_flag_rule`) refuses the same."""
    found = [(arg, owned) for arg in extra_args if (owned := owned_flag_of(arg)) is not None]
    if found:
        raise OwnedFlagError(found)


def cel_owned_flag_rule() -> str:
    """The CEL rule on each ``spec.extraArgs`` item that refuses what :func:`owned_flag_of` refuses.

    The CRD carries this text (tests/test_crd.py checks it is current). Long flags are matched as
    :func:`_cel_long_flag_match` says; short ones by their letters, glued values included.
    """
    shorts = sorted(short[1:] for short in OWNED_SHORT_FLAGS)
    short_alternatives = list(shorts)
    short_alternatives += [f"{short[:n]}(?:[=.]|$)" for short in shorts for n in range(1, len(short))]
    return (
        f"!({_cel_long_flag_match('self', _owned_long_names())})"
        f" && !self.matches('^-(?:{'|'.join(short_alternatives)})')"
        f" && self != '{CONFIG_FILE_FLAG}'"
    )


def cel_lora_flag_rule() -> str:
    """The CEL rule on ``spec`` that refuses, with ``spec.adapters``, an ``spec.extraArgs`` item that
    :func:`lora_flag_of` takes for a LoRA flag (``vllm-runtime serve --adapters-file`` sets them from
    spec.maxLoras/maxLoraRank/maxCpuLoras and refuses them after ``--``). The CRD carries this text
    (tests/test_lora_flags.py checks it is current)."""
    return (
        "!has(self.adapters) || !has(self.extraArgs)"
        f" || self.extraArgs.all(a, !({_cel_long_flag_match('a', _lora_long_names())}))"
    )


def _cel_long_flag_match(var: str, long_names: Mapping[str, str]) -> str:
    """CEL that is true when the string ``var`` is a long flag :func:`_long_flag_of` takes for one of
    ``long_names``: a trie of the spellings where each further character is optional (portable CEL has no
    substring functions), dashes also written as underscores, followed by ``=``, ``.`` (a dotted JSON field)
    or the end; less the full vLLM flags that only look like abbreviations (``NOT_ABBREVIATIONS``)."""
    names = sorted({name[2:] for name in long_names})
    exceptions = sorted(e[2:] for e in NOT_ABBREVIATIONS if any(name.startswith(e) for name in long_names))
    match = f"{var}.matches('^--{_prefix_pattern(names)}(?:[=.]|$)')"
    if exceptions:
        match += f" && !{var}.matches('^--(?:{'|'.join(_dashes(e) for e in exceptions)})(?:[=.]|$)')"
    return match


def _dashes(text: str) -> str:
    return text.replace("-", "[-_]")


def _prefix_pattern(words: Sequence[str]) -> str:
    """An RE2 group matching every non-empty prefix of ``words``."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})

    def optional_rest(node: dict[str, Any]) -> str:
        if not node:
            return ""
        alternatives = [_dashes(char) + optional_rest(child) for char, child in sorted(node.items())]
        return "(?:" + "|".join(alternatives) + ")?"

    return optional_rest(trie)[:-1]  # the first character is not optional


def vllm_flags(spec: Mapping[str, Any]) -> list[str]:
    """vLLM flags for a VLLMModel spec (camelCase field names), in a stable order.

    ``model`` and ``revision`` are not included: the runtime passes the cached snapshot.
    Fields that are absent or None are left to vLLM's defaults; ``extraArgs`` come last.
    """
    flags: list[str] = []
    for field, flag in VALUE_FLAGS.items():
        value = spec.get(field)
        if value is None or (value == "auto" and field in ("maxModelLen", "tensorParallelSize")):
            continue
        flags += [flag, _format(value)]
    for field, flag in BOOL_FLAGS.items():
        if spec.get(field):
            flags.append(flag)
    extra = list(spec.get("extraArgs") or [])
    check_extra_args(extra)
    return flags + extra


def settings_from_flags(flags: Sequence[str]) -> dict[str, Any]:
    """The inverse of ``vllm_flags`` for the mapped fields (extra args are ignored).

    ``vllm-runtime serve`` reads its settings back from the flags it was given, so the
    Deployment's command line stays the single description of what runs.
    """
    by_flag = {flag: field for field, flag in VALUE_FLAGS.items()}
    by_bool = {flag: field for field, flag in BOOL_FLAGS.items()}
    out: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        arg = flags[i]
        name = _flag_name(arg)
        if name in by_bool:
            out[by_bool[name]] = True
        elif name in by_flag:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(flags):
                i += 1
                value = flags[i]
            else:
                raise ValueError(f"vLLM flag {arg} needs a value")
            out[by_flag[name]] = _parse(by_flag[name], value)
        i += 1
    return out


def compile_cache_key(*, vllm_version: str, commit: str, accelerator: str, settings: Mapping[str, Any]) -> str:
    """A directory-safe key: only identical configurations share a torch.compile cache."""
    material = {
        "vllm": vllm_version,
        "commit": commit,
        "accelerator": accelerator,
        **{field: settings.get(field) for field in COMPILE_KEY_FIELDS},
        **{field: settings[field] for field in LORA_KEY_FIELDS if settings.get(field) is not None},
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return f"vllm-{vllm_version}-{digest}".replace("/", "_").replace("+", "_")


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(field: str, value: str) -> Any:
    if field in ("maxModelLen", "tensorParallelSize", "seed"):
        return int(value)
    if field == "gpuMemoryUtilization":
        return float(value)
    return value
