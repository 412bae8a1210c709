"""The layout of the model cache volume: one contract shared by the cache, serve and the operator.

Everything lives under the volume's mount point (``--cache-dir``)::

    <cache-dir>/
      hub/                                    HF_HUB_CACHE: huggingface_hub's own cache layout
        models--org--name/{blobs,refs,snapshots/<commit>/...}
      manifests/models--org--name/<commit>.json
                                              completion manifests, written atomically after verification
      locks/                                  file locks that make concurrent caches download once
      compile/<key>/                          VLLM_CACHE_ROOT per identical serving configuration
      state/                                  small status files (start-up phases) the operator can show

A model is "cached" for a commit if and only if its manifest exists; the manifest is the
last thing written (write to a temporary name, fsync, rename), so a crash at any moment
never leaves a cache that is reported complete but isn't.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Where the operator mounts the cache volume in the cache Job and in model pods.
CACHE_MOUNT_PATH = "/cache"
# Where a ``pvc://<claim>/<path>`` model's claim is mounted (read-only), as /models/<claim>.
MODELS_MOUNT_ROOT = "/models"
# Kubernetes' default termination message path; the cache Job writes its one-line JSON summary here.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PVC_URI_RE = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?P<path>/.*)?$")


def is_commit(revision: str) -> bool:
    """True when ``revision`` is a full 40-hex commit id (no resolution needed)."""
    return bool(COMMIT_RE.match(revision))


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a Hub repo, or a directory on a volume."""

    uri: str
    repo_id: str | None = None  # "org/name" for Hub models
    claim: str | None = None  # PVC name for pvc:// models
    path: str = ""  # path inside the claim ("" for its root)

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def local_dir(self, models_root: str = MODELS_MOUNT_ROOT) -> str:
        """The directory a pvc:// model's weights are at inside a pod."""
        if self.claim is None:
            raise ValueError(f"{self.uri!r} is a Hub model, not a pvc:// model")
        return f"{models_root}/{self.claim}{self.path}".rstrip("/")


def parse_model(uri: str) -> ModelSource:
    """Parse ``spec.model``: ``org/name`` or ``pvc://<claim>/<path>``.

    Raises ValueError with a message that names the field and the accepted forms.
    """
    m = PVC_URI_RE.match(uri)
    if m:
        return ModelSource(uri=uri, claim=m.group("claim"), path=(m.group("path") or "").rstrip("/"))
    if REPO_ID_RE.match(uri) and ".." not in uri:
        return ModelSource(uri=uri, repo_id=uri)
    raise ValueError(
        f"spec.model {uri!r} is neither a Hugging Face repo id ('org/name') nor a volume path "
        "('pvc://<claim>/<path>'); use for example 'Qwen/Qwen2.5-0.5B-Instruct' or 'pvc://models/llama'"
    )


def repo_folder_name(repo_id: str) -> str:
    """huggingface_hub's folder name for a model repo: ``models--org--name``."""
    return "models--" + repo_id.replace("/", "--")


@dataclass(frozen=True)
class CacheLayout:
    """Paths under one cache volume."""

    root: Path

    @property
    def hub_cache(self) -> Path:
        """The value for HF_HUB_CACHE: huggingface_hub's cache lives here."""
        return self.root / "hub"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def compile_root(self) -> Path:
        return self.root / "compile"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def repo_dir(self, repo_id: str) -> Path:
        return self.hub_cache / repo_folder_name(repo_id)

    def snapshot_dir(self, repo_id: str, commit: str) -> Path:
        return self.repo_dir(repo_id) / "snapshots" / commit

    def manifest_path(self, repo_id: str, commit: str) -> Path:
        return self.manifests / repo_folder_name(repo_id) / f"{commit}.json"

    def lock_path(self, repo_id: str, commit: str) -> Path:
        return self.locks / f"{repo_folder_name(repo_id)}--{commit}.lock"

    def compile_dir(self, key: str) -> Path:
        """VLLM_CACHE_ROOT for one serving configuration key (see ``vllm_args.compile_cache_key``)."""
        return self.compile_root / key
