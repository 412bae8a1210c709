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
PVC_URI_RE = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?P<path>/.*)?$")


# git check-ref-format's forbidden characters: controls, DEL, space, ~ ^ : ? * [ and backslash.
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
MAX_REVISION_LENGTH = 255  # git has no limit; one path component on most file systems


def is_commit(revision: str) -> bool:
    """True when ``revision`` is a full 40-hex commit id (no resolution needed)."""
    return bool(COMMIT_RE.fullmatch(revision))


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` is not a valid git ref name (``git check-ref-format --allow-onelevel``), or None.

    A 40-hex commit is itself a valid ref name. The rules keep every ``refs/<revision>`` file inside
    the repo's ``refs`` folder: no ``..``, no component starting with ``.``, no leading or double ``/``.
    """
    if not revision:
        return "it is empty"
    if len(revision) > MAX_REVISION_LENGTH:
        return f"it is longer than {MAX_REVISION_LENGTH} characters"
    if revision == "@":
        return "it is the single character '@'"
    if _REF_FORBIDDEN_RE.search(revision):
        return "it contains a space, a control character or one of ~ ^ : ? * [ \\"
    if ".." in revision:
        return "it contains '..'"
    if "@{" in revision:
        return "it contains '@{'"
    if revision.startswith("/") or revision.endswith("/") or "//" in revision:
        return "it starts or ends with '/' or contains '//'"
    if revision.endswith("."):
        return "it ends with '.'"
    for component in revision.split("/"):
        if component.startswith("."):
            return f"its component {component!r} starts with '.'"
        if component.endswith(".lock"):
            return f"its component {component!r} ends with '.lock'"
    return None


def is_valid_revision(revision: str) -> bool:
    """True for a git ref name (branch, tag, ``refs/pr/1``) or a 40-hex commit: what ``spec.revision`` accepts."""
    return revision_problem(revision) is None


_REPO_PART_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


def is_valid_repo_id(repo_id: str) -> bool:
    """huggingface_hub's ``validate_repo_id`` rules for ``org/name``: each part 1-96 of ``[A-Za-z0-9._-]``,
    not starting or ending with ``-`` or ``.``, no ``--`` or ``..``, not ending with ``.git``.

    Written out rather than imported so the operator's image needs no huggingface_hub for it."""
    org, slash, name = repo_id.partition("/")
    return (
        bool(slash)
        and all(_REPO_PART_RE.fullmatch(part) for part in (org, name))
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith(".git")
    )


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
    if m and any(part in (".", "..") for part in (m.group("path") or "").split("/")):
        raise ValueError(
            f"spec.model {uri!r} has a '.' or '..' segment: a pvc:// path must stay inside its claim "
            "(write it without '..', e.g. 'pvc://models/llama')"
        )
    if m:
        return ModelSource(uri=uri, claim=m.group("claim"), path=(m.group("path") or "").rstrip("/"))
    if is_valid_repo_id(uri):
        return ModelSource(uri=uri, repo_id=uri)
    raise ValueError(
        f"spec.model {uri!r} is neither a Hugging Face repo id ('org/name': letters, digits, '-', '_', '.', each "
        "part at most 96 characters, no '--' or '..', not starting or ending with '-' or '.') nor a volume path "
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
