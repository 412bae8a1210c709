"""The VLLMModel CustomResourceDefinition: where it is, its names, and its defaults applied in Python.

``crds/vllmmodel.yaml`` is the single source of truth. A wheel carries it as
``vllm_operator/crds/vllmmodel.yaml`` (hatch ``force-include`` in pyproject.toml); a source checkout
reads it from the repository's ``crds/`` folder.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

GROUP = "vllm-operator.io"
VERSION = "v1alpha1"
PLURAL = "vllmmodels"
SINGULAR = "vllmmodel"
KIND = "VLLMModel"
SHORT_NAMES = ("vllmm",)
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"
FILE_NAME = "vllmmodel.yaml"


def crd_path() -> Path:
    """The CRD file: the copy inside the installed package if there is one, else the checkout's ``crds/``."""
    packaged = resources.files("vllm_operator") / "crds" / FILE_NAME
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "crds" / FILE_NAME
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(f"the VLLMModel CRD ({FILE_NAME}) is neither in the package nor at {checkout}")


@functools.cache
def crd_text() -> str:
    """The CRD exactly as written in the file (``vllm-operator crd`` prints this)."""
    return crd_path().read_text(encoding="utf-8")


def load_crd() -> dict[str, Any]:
    """The CRD as a dict (a fresh copy each call, so callers may modify it)."""
    return copy.deepcopy(_parsed())


@functools.cache
def _parsed() -> dict[str, Any]:
    data = yaml.safe_load(crd_text())
    if not isinstance(data, dict):
        raise ValueError(f"{crd_path()} is not a YAML mapping")
    return data


def version_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the served version."""
    for version in _parsed()["spec"]["versions"]:
        if version["name"] == VERSION:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"the CRD has no version {VERSION}")


def spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = version_schema()["properties"]["spec"]
    return schema


def apply_defaults(spec: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``spec`` with the CRD schema's defaults filled in, as the API server would.

    The API server defaults objects it stores; tests against an emulator and ``render`` see
    objects no API server has touched, so the same defaults are applied here from the same
    schema (never a second list of defaults in Python).
    """
    result = default_value(copy.deepcopy(spec or {}), spec_schema())
    assert isinstance(result, dict)
    return result


def default_value(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting (Kubernetes' rules): null fields that are not nullable are pruned,
    then absent properties that have a ``default`` get it, recursively through objects and arrays."""
    if isinstance(value, dict):
        properties: dict[str, Any] = schema.get("properties") or {}
        for name, sub in properties.items():
            if name in value and value[name] is None and not sub.get("nullable", False):
                del value[name]
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = default_value(value[name], sub)
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for name in list(value):
                if name not in properties:
                    value[name] = default_value(value[name], additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [default_value(item, schema["items"]) for item in value]
    return value
