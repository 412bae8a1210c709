"""What the planner reads: config.json and the safetensors headers, never the weights.

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every
tensor's dtype, shape and byte offsets. From a local directory the planner reads just those bytes;
from the Hub it asks huggingface_hub to fetch them with HTTP Range requests
(``HfApi.parse_safetensors_file_metadata``), so planning a 140 GB model moves a few megabytes.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors format's own limit
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class ModelSourceError(Exception):
    """The model's config or weight headers could not be read; the message says what to fix."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # safetensors dtype name: BF16, F16, F32, I32, U8, F8_E4M3, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelFacts:
    """Everything the planner knows about one model revision."""

    model: str
    config: dict[str, Any]
    tensors: dict[str, TensorSpec]
    weight_files: list[str] = field(default_factory=list)
    revision: str | None = None
    commit: str | None = None
    source: str = "local"  # local | hub | summary
    notes: list[str] = field(default_factory=list)
    tensor_files: dict[str, list[str]] = field(default_factory=dict)  # file -> its tensor names

    def load_order(self) -> list[str]:
        """Tensor names in the order a loader meets them: file by file, names sorted within each."""
        if not self.tensor_files:
            return sorted(self.tensors)
        return [n for f in sorted(self.tensor_files) for n in sorted(self.tensor_files[f])]


def tensors_from_header(header: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Tensor specs from a parsed safetensors JSON header (the ``__metadata__`` entry is skipped)."""
    return {
        name: TensorSpec(str(info["dtype"]), tuple(int(d) for d in info["shape"]))
        for name, info in header.items()
        if name != "__metadata__"
    }


def read_local_header(path: Path) -> dict[str, TensorSpec]:
    """Read only the header of a local safetensors file."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelSourceError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER_BYTES:
            raise ModelSourceError(f"{path} is not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ModelSourceError(f"{path}: the safetensors header is not valid JSON ({exc})") from exc
    return tensors_from_header(header)


def choose_weight_files(files: Iterable[str], index: Mapping[str, Any] | None) -> list[str]:
    """The safetensors files that make up the model, the way transformers and vLLM pick them.

    The index decides when there is one; otherwise ``model.safetensors``; otherwise every top-level
    ``*.safetensors`` except Mistral's ``consolidated*`` duplicates (repos often carry both layouts).
    """
    if index is not None:
        return sorted(set(index.get("weight_map", {}).values()))
    names = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    if SINGLE_FILE in names:
        return [SINGLE_FILE]
    plain = [f for f in names if not f.startswith("consolidated")]
    return sorted(plain or names)


def load_local(path: str | Path) -> ModelFacts:
    """Facts from a local model directory (a snapshot, a PVC mount, a generated model)."""
    root = Path(path)
    config = _read_json(root / "config.json", f"{root} has no config.json: is it a Hugging Face model directory?")
    index_path = root / INDEX_FILE
    index = _read_json(index_path, "") if index_path.exists() else None
    files = choose_weight_files((p.name for p in root.iterdir()), index)
    if not files:
        raise ModelSourceError(f"{root} has no *.safetensors weights; the planner reads safetensors headers only")
    tensors: dict[str, TensorSpec] = {}
    tensor_files: dict[str, list[str]] = {}
    for name in files:
        part = read_local_header(root / name)
        tensors.update(part)
        tensor_files[name] = list(part)
    return ModelFacts(
        model=str(root), config=config, tensors=tensors, weight_files=files, source="local", tensor_files=tensor_files
    )


def load_hub(
    repo_id: str,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    max_workers: int = 8,
) -> ModelFacts:
    """Facts from a Hub repo: config.json and the index through huggingface_hub's cache, headers by Range.

    ``endpoint`` defaults to huggingface_hub's (``HF_ENDPOINT``); ``token`` to its usual lookup.
    With ``cache_dir`` the JSON files go through huggingface_hub's cache there; without, nothing is
    written to disk (the operator's case).
    Errors are huggingface_hub's typed errors (RepositoryNotFoundError, GatedRepoError,
    RevisionNotFoundError, ...) so callers can tell a bad spec from an unreachable Hub.
    """
    from huggingface_hub import HfApi, get_session, hf_hub_download, hf_hub_url, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # public, not re-exported

    api = HfApi(endpoint=endpoint, token=token)
    commit = revision if _COMMIT_RE.match(revision) else api.model_info(repo_id, revision=revision).sha
    if commit is None:
        raise ModelSourceError(f"the Hub did not resolve revision {revision!r} of {repo_id} to a commit")
    files = api.list_repo_files(repo_id, revision=commit)

    def fetch_json(filename: str) -> dict[str, Any]:
        if cache_dir is not None:
            local = hf_hub_download(
                repo_id, filename, revision=commit, endpoint=endpoint, token=token, cache_dir=cache_dir
            )
            return _read_json(Path(local), f"{repo_id}: {filename} could not be read")
        # No cache given (the operator): read the small JSON straight into memory, write nothing to disk.
        url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
        response = get_session().get(url, headers=build_hf_headers(token=token), timeout=30)
        hf_raise_for_status(response)
        try:
            data = response.json()
        except ValueError as exc:
            raise ModelSourceError(f"{repo_id}: {filename} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ModelSourceError(f"{repo_id}: {filename} does not hold a JSON object")
        return data

    if "config.json" not in files:
        raise ModelSourceError(f"{repo_id}@{commit} has no config.json: is it a transformers model repo?")
    config = fetch_json("config.json")
    index = fetch_json(INDEX_FILE) if INDEX_FILE in files else None
    weight_files = choose_weight_files(files, index)
    if not weight_files:
        raise ModelSourceError(
            f"{repo_id}@{commit} has no *.safetensors weights; the planner reads safetensors headers only"
        )

    def header(filename: str) -> dict[str, TensorSpec]:
        meta = api.parse_safetensors_file_metadata(repo_id, filename, revision=commit)
        return {
            name: TensorSpec(str(info.dtype), tuple(int(d) for d in info.shape)) for name, info in meta.tensors.items()
        }

    tensors: dict[str, TensorSpec] = {}
    tensor_files: dict[str, list[str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(weight_files)))) as pool:
        for filename, part in zip(weight_files, pool.map(header, weight_files), strict=True):
            tensors.update(part)
            tensor_files[filename] = list(part)
    return ModelFacts(
        model=repo_id,
        config=config,
        tensors=tensors,
        weight_files=weight_files,
        revision=revision,
        commit=commit,
        source="hub",
        tensor_files=tensor_files,
    )


def load_summary(directory: str | Path) -> ModelFacts:
    """Facts from a fixture directory: config.json plus ``tensors.json`` (file -> tensor -> [dtype, shape]).

    The test fixtures of well-known models keep their real config and header contents this way,
    without any weights.
    """
    root = Path(directory)
    config = _read_json(root / "config.json", f"{root} has no config.json")
    summary = _read_json(root / "tensors.json", f"{root} has no tensors.json")
    tensors: dict[str, TensorSpec] = {}
    tensor_files: dict[str, list[str]] = {}
    for filename, per_file in summary["files"].items():
        tensor_files[filename] = list(per_file)
        for name, (dtype, shape) in per_file.items():
            tensors[name] = TensorSpec(dtype, tuple(shape))
    return ModelFacts(
        model=str(summary.get("repo_id", root.name)),
        config=config,
        tensors=tensors,
        weight_files=sorted(summary["files"]),
        source="summary",
        tensor_files=tensor_files,
    )


def load_model(
    model: str,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> ModelFacts:
    """A local directory when ``model`` is one, else a Hub repo id."""
    if Path(model).is_dir():
        return load_local(model)
    if model.count("/") != 1 or model.startswith(("/", ".")):
        raise ModelSourceError(f"model {model!r} is neither a local directory nor a Hub repo id (org/name)")
    return load_hub(model, revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir)


def _read_json(path: Path, missing: str) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise ModelSourceError(missing or f"{path} is missing") from exc
    except ValueError as exc:
        raise ModelSourceError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    return data
