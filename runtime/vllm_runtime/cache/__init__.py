"""``vllm-runtime cache``: pinned, sha256-verified, crash-safe pre-caching of Hugging Face weights.

Public API used by serve, the planner and the operator:

- ``read_manifest(cache_dir, repo_id, commit) -> dict | None``: the completion manifest (see ``manifest``).
- ``find_complete_commit(cache_dir, repo_id, revision) -> str | None``: the cached commit for a revision,
  with no network.
- ``run_cache(CacheOptions) -> summary.Summary``: the whole step, in process.
- ``register(subparsers)``: the ``cache`` subcommand.
"""

from vllm_runtime.cache.command import CacheOptions, register, run_cache
from vllm_runtime.cache.manifest import find_complete_commit, list_manifests, read_manifest

__all__ = ["CacheOptions", "find_complete_commit", "list_manifests", "read_manifest", "register", "run_cache"]
