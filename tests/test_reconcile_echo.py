"""A child's watch event that only echoes the operator's own apply triggers no reconcile; anything else does."""

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
