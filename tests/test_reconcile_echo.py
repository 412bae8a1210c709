"""Child watch events: an echo of the operator's own apply triggers no reconcile; the children are observed
from the watches once read, and the resync reads them again."""

from __future__ import annotations

from typing import Any

from vllm_operator import kube
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_operator.plan import Apply
from vllm_operator.reconcile import Reconciler


class _ApplyingClient:
    """Answers a server-side apply as the API server does: the object with its new resourceVersion."""

    def __init__(self) -> None:
        self.version = 0

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}


def _model() -> VLLMModel:
    return VLLMModel.from_body(
        {
            "apiVersion": "vllm-operator.io/v1alpha1",
            "kind": "VLLMModel",
            "metadata": {"name": "m", "namespace": "ns", "uid": "uid-1", "generation": 1},
            "spec": {"model": "org/tiny"},
        }
    )


def _service(version: str) -> dict[str, Any]:
    metadata = {"name": "m", "namespace": "ns", "resourceVersion": version}
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata}


async def test_only_the_exact_echo_of_an_own_apply_is_skipped_and_only_once() -> None:
    reconciler = Reconciler(_ApplyingClient(), Config())  # type: ignore[arg-type]
    model = _model()
    await reconciler._act(model, Apply({**_service(""), "spec": {}}, created=True))  # version 1

    assert not reconciler.is_own_write(kube.SERVICES, "ns", "m", _service("2"))  # a newer change: reconcile
    assert not reconciler.is_own_write(kube.DEPLOYMENTS, "ns", "m", _service("1"))  # another kind
    assert not reconciler.is_own_write(kube.SERVICES, "other", "m", _service("1"))  # another model

    await reconciler._act(model, Apply({**_service(""), "spec": {}}, created=False))  # written again: version 2
    assert reconciler.is_own_write(kube.SERVICES, "ns", "m", _service("2"))
    assert not reconciler.is_own_write(kube.SERVICES, "ns", "m", _service("2"))  # the same event again: reconcile


async def test_forgetting_a_model_drops_its_own_writes() -> None:
    reconciler = Reconciler(_ApplyingClient(), Config())  # type: ignore[arg-type]
    await reconciler._act(_model(), Apply({**_service(""), "spec": {}}, created=True))
    reconciler.forget("ns", "m")
    assert not reconciler.is_own_write(kube.SERVICES, "ns", "m", _service("1"))


def _child(kind: str, name: str, version: str) -> dict[str, Any]:
    labels = {"vllm-operator.io/model": "m", "app.kubernetes.io/managed-by": "vllm-operator"}
    metadata = {"name": name, "namespace": "ns", "resourceVersion": version, "labels": labels}
    return {"apiVersion": "apps/v1" if kind == "Deployment" else "v1", "kind": kind, "metadata": metadata}


class _ReadingClient(_ApplyingClient):
    """The API as read once: a Deployment and no other child."""

    def __init__(self, deployment: dict[str, Any]) -> None:
        super().__init__()
        self.reads = 0
        self.deployment = deployment

    async def get(self, resource: kube.Resource, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += resource != kube.PVCS  # the PVC is always read
        return self.deployment if resource == kube.DEPLOYMENTS else None

    async def list(self, resource: kube.Resource, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        self.reads += 1
        return []


async def test_children_come_from_the_watches_after_one_read_and_a_deletion_is_seen() -> None:
    from vllm_operator import builders

    model = _model()
    deployment = _child("Deployment", builders.deployment_name(model), "5")
    client = _ReadingClient(deployment)
    reconciler = Reconciler(client, Config())  # type: ignore[arg-type]

    first = await reconciler.observe(model, fresh=False)  # never read: reads the API
    assert first.deployment == deployment and client.reads > 0
    reads = client.reads

    reconciler.seen(kube.DEPLOYMENTS, "ns", "m", _child("Deployment", deployment["metadata"]["name"], "4"))
    assert (await reconciler.observe(model, fresh=False)).deployment == deployment  # an older report: ignored
    newer = _child("Deployment", deployment["metadata"]["name"], "6")
    reconciler.seen(kube.DEPLOYMENTS, "ns", "m", newer)
    assert (await reconciler.observe(model, fresh=False)).deployment == newer
    reconciler.seen(kube.DEPLOYMENTS, "ns", "m", newer, deleted=True)  # deleted by hand
    assert (await reconciler.observe(model, fresh=False)).deployment is None
    assert client.reads == reads  # all from the watches

    assert (await reconciler.observe(model, fresh=True)).deployment == deployment  # the resync reads again
