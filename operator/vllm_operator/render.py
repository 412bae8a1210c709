"""``vllm-operator render``: every object the operator would create, with no cluster.

It calls the same builders as the live operator's plan, which return each child complete. Three
things are only known in a cluster and are marked or left out instead: the commit a branch or tag
resolves to (the cache Job resolves it; a 40-hex ``spec.revision`` is used as is), the cache PVC's
uid (annotated on the Job and Deployment), and ownerReferences (added only when the input carries
``metadata.uid``, e.g. from ``kubectl get -o yaml``: an ownerReference to a uid that does not exist
would get the object garbage-collected; never on a PVC with ``cache.deletePolicy: Retain``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from vllm_runtime import layout

from . import builders, crd, inputs, lora, validation
from .config import Config
from .model import VLLMModel

YAML_SUFFIXES = (".yaml", ".yml")


class RenderError(ValueError):
    """Bad input: the message names the file, the object and the field."""


@dataclass(frozen=True)
class Rendered:
    """One child object and the comment printed above it."""

    comment: str
    obj: dict[str, Any]


def placeholder_commit(revision: str) -> str:
    """What the Deployment shows for a branch or tag: it serves the commit the cache Job resolves."""
    return f"<commit-resolved-from:{revision}>"


def commit_for(model: VLLMModel) -> str:
    return model.revision if layout.is_commit(model.revision) else placeholder_commit(model.revision)


def input_files(paths: Iterable[str]) -> list[str]:
    """Files to read: each path as given, or a directory's *.yaml/*.yml files in name order; '-' is stdin."""
    files: list[str] = []
    for path in paths:
        p = Path(path)
        if path == "-":
            files.append(path)
        elif p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.suffix in YAML_SUFFIXES and f.is_file())
            if not found:
                raise RenderError(f"{path}: no .yaml or .yml files in this directory")
            files += found
        elif p.is_file():
            files.append(path)
        else:
            raise RenderError(f"{path}: no such file or directory")
    return files


def read_documents(path: str, stdin: TextIO | None = None) -> Iterator[dict[str, Any]]:
    """The documents of one file ('-' is stdin), read as kubectl would and bounded (``inputs``: size,
    aliases, nesting, duplicate keys); every VLLMModel among them is validated against the CRD's schema
    and rules (``checked_document``) before anything is built from it."""
    source = "<stdin>" if path == "-" else path
    try:
        for number, document in enumerate(inputs.load_documents(inputs.read_text(path, stdin), source), start=1):
            yield checked_document(document, f"{source}: document {number}")
    except inputs.InputRefused as exc:
        raise RenderError(str(exc)) from exc


def checked_document(document: Any, where: str) -> dict[str, Any]:
    """``document`` when the API server would take it: a mapping with a string apiVersion and kind and,
    when it is or claims to be a VLLMModel (its kind or its API group), valid by the CRD
    (``validation``). Other kinds pass unchecked; ``render`` skips them."""
    if not isinstance(document, dict):
        raise RenderError(f"{where}: a YAML document is not a mapping (apiVersion, kind, metadata, spec)")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if not (isinstance(api_version, str) and api_version and isinstance(kind, str) and kind):
        raise RenderError(
            f"{where}: apiVersion and kind must both be set, as strings (kubectl refuses the document too);"
            f" for a VLLMModel: apiVersion: {crd.API_VERSION}, kind: {crd.KIND}"
        )
    if kind != crd.KIND and api_version.split("/")[0] != crd.GROUP:
        return document
    try:
        validation.validate(document)
    except validation.InvalidSpec as exc:
        metadata = document.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        problems = "\n".join(f"  {error}" for error in exc.errors)
        raise RenderError(f"{where}: VLLMModel {name or '<no name>'} would be refused by the API server:\n{problems}") from exc
    return document


def is_vllm_model(document: dict[str, Any]) -> bool:
    return document.get("kind") == crd.KIND and str(document.get("apiVersion", "")).startswith(crd.GROUP + "/")


def render_model(
    body: dict[str, Any],
    config: Config,
    *,
    namespace: str = "default",
    commit: str | None = None,
    claim_uid: str | None = None,
    served: bool = False,
) -> list[Rendered]:
    """The children of one VLLMModel body, in creation order, with comments: the objects the operator
    applies (``builders.children_for``), ownerReferences and annotations included.

    ``commit``, ``claim_uid`` and ``served`` are what only a cluster knows (the commit the cache Job
    resolves a branch to, the cache PVC's uid, whether that commit is deployed yet); without them the
    commit is a marked placeholder (or the 40-hex ``spec.revision``), the claim-uid annotation is left
    out, and the cache Job is shown as first created (no ``ttlSecondsAfterFinished``).
    """
    model = VLLMModel.from_body(body, default_namespace=namespace)
    commit = commit or commit_for(model)
    where = f"VLLMModel {model.namespace}/{model.name}"
    # spec.adapters: each Hub adapter's commit as status.adapters records it (a cluster's fact), else marked.
    adapter_commits = {a.name: a.revision if layout.is_commit(a.revision) else placeholder_commit(a.revision)
                       for a in lora.adapters_of(model) if a.is_hub}  # fmt: skip
    adapter_commits.update(lora.status_commits(model))
    out: list[Rendered] = []
    for obj in builders.children_for(model, config, commit, claim_uid=claim_uid, served=served,
                                     adapter_commits=adapter_commits):  # fmt: skip
        kind = obj["kind"]
        comment = f"{where}: {kind} {obj['metadata']['name']}"
        adapter = (obj["metadata"].get("annotations") or {}).get(lora.ANNOTATION_ADAPTER)
        if kind == "Job" and adapter:
            comment += (f"\nLoRA adapter {adapter!r}: its own cache Job (one per adapter repo and revision); adding,"
                        " changing or removing an adapter never re-runs the base model's Job or restarts vLLM")
        if kind == "ConfigMap" and obj["metadata"]["name"] == lora.config_map_name(model):
            comment += (f"\nthe adapters file the model pods mount at {lora.ADAPTERS_FILE}: the runtime loads and "
                        "unloads to follow it (no restart); each Hub adapter is listed once its cache Job resolved "
                        f"and verified its commit; vLLM's LoRA limits: {' '.join(lora.limits(model).args())}")
            if any(c.startswith("<commit-resolved-from:") for c in adapter_commits.values()):
                comment += "\n<commit-resolved-from:...>: the commit each adapter's cache Job resolves its revision to"
        if kind == "Deployment" and commit == placeholder_commit(model.revision):
            comment += (
                f"\nrevision {model.revision!r} is a branch or tag: the operator deploys the 40-hex commit the"
                f" cache Job resolves it to, in place of {commit}"
            )
        if kind == "PersistentVolumeClaim" and not model.cache.get("size") and not builders.known_model_bytes(model):
            comment += "\nsize: the operator's default until the model's size is known (set spec.cache.size to fix it)"
        if kind == "PersistentVolumeClaim" and "ownerReferences" not in obj["metadata"]:
            comment += "\nownerReferences: none (spec.cache.deletePolicy: Retain keeps the cache when the model goes)"
        elif not model.uid:
            comment += "\nownerReferences: added by the operator (the VLLMModel's uid is only known in a cluster)"
        out.append(Rendered(comment, obj))
    return out


def render_paths(paths: Iterable[str], config: Config, *, namespace: str = "default") -> list[Rendered]:
    """Every child of every VLLMModel in ``paths``; other kinds of documents are skipped."""
    rendered: list[Rendered] = []
    for path in input_files(paths):
        for document in read_documents(path):
            if not is_vllm_model(document):
                continue
            name = (document.get("metadata") or {}).get("name", "<no name>")
            try:
                rendered += render_model(document, config, namespace=namespace)
            except ValueError as exc:
                raise RenderError(f"{path}: VLLMModel {name}: {exc}") from None
    return rendered


def to_yaml(rendered: Iterable[Rendered]) -> str:
    """Multi-document YAML, each document preceded by its comment lines."""
    parts = []
    for item in rendered:
        comment = "\n".join(f"# {line}" for line in item.comment.splitlines())
        parts.append(f"---\n{comment}\n" + yaml.safe_dump(item.obj, sort_keys=False, default_flow_style=False))
    return "".join(parts)
