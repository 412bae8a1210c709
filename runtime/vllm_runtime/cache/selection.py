"""Which files of a repo the cache downloads: what vLLM needs, in one weight format.

- Metadata (top level only): ``*.json`` (config, generation config, tokenizer config, weight index),
  tokenizer files (``*.txt`` such as merges/vocab, ``*.model``, ``*.tiktoken``, ``*.jinja``), and
  ``*.py`` (custom code for ``trustRemoteCode``). The index of the weight format not chosen is left out.
- Weights (top level only; sub-folders such as ``original/`` hold other formats): safetensors when
  the repo has any, otherwise PyTorch ``.bin``/``.pt``/``.pth``. Never both.
- When the chosen format's index exists (``model.safetensors.index.json``), only the shards it
  names are taken, as vLLM does (repos like Mistral's also carry a ``consolidated.safetensors``).
- ``--include PATTERN`` adds matching files (fnmatch on the repo path, e.g. ``original/*``);
  ``--exclude PATTERN`` removes matching files from the selection.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

METADATA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
IGNORED_METADATA = ("README", ".gitattributes", "LICENSE", "USE_POLICY")
FORMATS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("safetensors", (".safetensors",), "model.safetensors.index.json"),
    ("pytorch", (".bin", ".pt", ".pth"), "pytorch_model.bin.index.json"),
)
ALL_INDEXES = {index for _, _, index in FORMATS}


@dataclass(frozen=True)
class HubFile:
    """One file of the tree listing at the pinned commit."""

    path: str
    size: int
    git_oid: str
    sha256: str | None  # the LFS oid the Hub publishes; None for small non-LFS files

    @property
    def blob_name(self) -> str:
        """huggingface_hub's blob name (the etag): sha256 for LFS files, the git oid otherwise."""
        return self.sha256 or self.git_oid


@dataclass(frozen=True)
class Selection:
    weight_format: str
    metadata: list[HubFile]
    weights: list[HubFile]

    @property
    def files(self) -> list[HubFile]:
        return self.metadata + self.weights

    @property
    def index_name(self) -> str | None:
        names = {f.path for f in self.metadata}
        return next((index for fmt, _, index in FORMATS if fmt == self.weight_format and index in names), None)


class NoWeightsError(ValueError):
    pass


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def select_files(
    files: Sequence[HubFile], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> Selection:
    top = [f for f in files if "/" not in f.path]
    chosen: tuple[str, tuple[str, ...], str] | None = None
    for fmt in FORMATS:
        if any(f.path.endswith(fmt[1]) for f in top):
            chosen = fmt
            break
    extra = [f for f in files if include and _matches(f.path, include)]
    if chosen is None and not extra:
        raise NoWeightsError("no weights at the top level of the repo (neither *.safetensors nor *.bin)")
    weight_format, suffixes, index = chosen or ("custom", (), "")
    other_indexes = ALL_INDEXES - {index}
    metadata = [
        f for f in top
        if f.path.endswith(METADATA_SUFFIXES)
        and not f.path.startswith(IGNORED_METADATA)
        and f.path not in other_indexes
    ]
    weights = [f for f in top if suffixes and f.path.endswith(suffixes)]
    selected = {f.path for f in metadata + weights}
    for f in extra:
        if f.path not in selected:
            (weights if f.path.endswith((".safetensors", ".bin", ".pt", ".pth")) else metadata).append(f)
            selected.add(f.path)
    metadata = [f for f in metadata if not _matches(f.path, exclude)]
    weights = [f for f in weights if not _matches(f.path, exclude)]
    return Selection(weight_format, metadata, weights)


def restrict_to_index(selection: Selection, indexed: set[str], include: Sequence[str] = ()) -> Selection:
    """Keep only the shards the weight index names (plus files the user asked for by --include)."""
    weights = [f for f in selection.weights if f.path in indexed or (include and _matches(f.path, include))]
    return Selection(selection.weight_format, selection.metadata, weights)
