"""Render the Helm chart offline (helm-python-sdk bundles Helm's library; no helm binary) for the chart tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "vllm-operator"
RELEASE = "vo"
NAMESPACE = "vllm-system"

_MONITORING = {
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "models": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True, "interval": "30s"}},
    "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml-platform"}},
    "dashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "vLLM"}},
}

# The value sets every chart test renders: each switches on a different part of the templates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": _MONITORING,
    "namespaced-monitoring": {**_MONITORING, "watchNamespaces": ["llm"], "models": {"podMonitor": {"enabled": True}}},
    "pinned": {
        "image": {"digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
        "runtimeImage": {"repository": "registry.example/vllm-runtime", "tag": "v9"},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"create": False, "name": "existing-operator-sa"},
        "config": {"hfEndpoint": "https://hf-mirror.example", "startupTimeoutSeconds": 7200,
                   "cacheSizeHeadroom": 2.5, "gpuResource": "", "defaultStorageClass": "fast-rwx"},
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
        "fullnameOverride": "vllm-operator",
    },
}


def render(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would print it (values checked by the schema)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        return chart.render(copy.deepcopy(values or {}), name=RELEASE, namespace=namespace)


def render_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt left out)."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def chart_crds() -> list[dict[str, Any]]:
    """The CRDs the chart installs from its crds/ directory."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        return [doc for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]
