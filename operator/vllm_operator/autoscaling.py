"""Pure builders for ``spec.autoscaling`` and ``spec.routing``: the KEDA ScaledObject, the autoscaling/v2
HorizontalPodAutoscaler and the Gateway API Inference Extension InferencePool of a VLLMModel.

Both autoscalers target the VLLMModel's scale subresource (``scaleTargetRef`` kind VLLMModel), never
the Deployment: the autoscaler writes ``spec.replicas`` through ``/scale``, the operator reads it and
stays the only writer of the Deployment's replicas, so nothing fights over them. ``status.selector``
(the scale subresource's ``labelSelectorPath``) lets the HPA find the model's pods.

The queries come from ``promql`` (one place for the PromQL of every signal). No I/O here: the plan
(``plan.autoscaling_step``) and ``render`` call the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import builders, crd, promql
from .config import Config
from .model import VLLMModel

JSON = dict[str, Any]

ENGINE_KEDA = "keda"
ENGINE_HPA = "hpa"
CUSTOM_QUERY = "prometheusQuery"

# Per-replica targets when the spec gives none. vLLM's queue should stay short (a waiting request
# waits for a whole slot); a GPU replica runs dozens of sequences at once; above 80 % KV cache vLLM
# starts preempting requests.
DEFAULT_TARGETS: Mapping[str, float] = {"queueDepth": 3, "runningRequests": 32, "kvCacheUsage": 0.8}
# GPU pods take minutes to pull, load and compile: add replicas at once, remove them slowly (a pod
# removed too early costs a cold start when the load comes back).
DEFAULT_SCALE_UP_STABILIZATION_SECONDS = 0
DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS = 600
KEDA_POLLING_INTERVAL_SECONDS = 15
DEFAULT_COOLDOWN_SECONDS = 300  # KEDA: idle this long at minReplicas 0 before scaling to zero
# The activation trigger only wakes a model from zero: a target so high it never asks for more than
# one replica, so scaling from 1 to maxReplicas follows the model's own signal.
ACTIVATION_ONLY_TARGET = "1000000000"

ENDPOINT_PICKER_PORT = 9002  # the Gateway API Inference Extension's default ext-proc port

KEDA_INSTALL_HINT = (
    "install KEDA (https://keda.sh/docs/latest/deploy/, e.g. `helm install keda kedacore/keda -n keda "
    "--create-namespace`) or set spec.autoscaling.engine: hpa"
)
INFERENCE_POOL_INSTALL_HINT = (
    "install the Gateway API Inference Extension CRDs (https://gateway-api-inference-extension.sigs.k8s.io/, "
    "`kubectl apply -f https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/latest/"
    "download/manifests.yaml`) or set spec.routing.inferencePool: false"
)


class MissingPrometheusAddress(ValueError):
    """A KEDA ScaledObject needs a Prometheus URL and neither the spec nor the operator has one."""

    def __init__(self, model: VLLMModel) -> None:
        super().__init__(
            f"VLLMModel {model.namespace}/{model.name}: spec.autoscaling.engine keda needs a Prometheus URL: set "
            "spec.autoscaling.serverAddress, or the chart value config.prometheusAddress "
            "(VLLM_OPERATOR_PROMETHEUS_ADDRESS)"
        )


@dataclass(frozen=True)
class Autoscaling:
    """``spec.autoscaling`` with its defaults applied."""

    engine: str
    min_replicas: int
    max_replicas: int
    metric: str  # a promql.METRICS name, or CUSTOM_QUERY
    target: float  # per replica: the metric's target, or the custom query's threshold
    query: str | None  # the custom query (metric == CUSTOM_QUERY)
    server_address: str | None
    activation_query: str | None
    activation_threshold: float
    scale_up_window: int
    scale_down_window: int
    cooldown_seconds: int

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0


def autoscaling_of(model: VLLMModel) -> Autoscaling | None:
    """The model's autoscaling settings, None when ``spec.autoscaling`` is absent.

    Raises ``promql.UnknownMetricError`` for a metric the CRD would refuse (a body no API server saw).
    """
    spec: Mapping[str, Any] | None = model.spec.get("autoscaling")
    if not spec:
        return None
    query = spec.get("prometheusQuery")
    if query:
        metric, target = CUSTOM_QUERY, float(spec["threshold"])
    else:
        metric = str(spec.get("metric") or "queueDepth")
        promql.signal_metric(metric)
        target = float(spec["target"]) if spec.get("target") is not None else DEFAULT_TARGETS[metric]
    behavior: Mapping[str, Any] = spec.get("behavior") or {}
    activation: Mapping[str, Any] = spec.get("activation") or {}
    return Autoscaling(
        engine=str(spec.get("engine") or ENGINE_KEDA),
        min_replicas=int(spec.get("minReplicas", 1)),
        max_replicas=int(spec["maxReplicas"]),
        metric=metric,
        target=target,
        query=str(query) if query else None,
        server_address=str(spec["serverAddress"]) if spec.get("serverAddress") else None,
        activation_query=str(activation["query"]) if activation.get("query") else None,
        activation_threshold=float(activation.get("threshold") or 0),
        scale_up_window=int(behavior.get("scaleUpStabilizationSeconds", DEFAULT_SCALE_UP_STABILIZATION_SECONDS)),
        scale_down_window=int(behavior.get("scaleDownStabilizationSeconds", DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS)),
        cooldown_seconds=int(spec.get("cooldownSeconds", DEFAULT_COOLDOWN_SECONDS)),
    )


def wants_inference_pool(model: VLLMModel) -> bool:
    return bool((model.spec.get("routing") or {}).get("inferencePool"))


# --- names -------------------------------------------------------------------------------------------


def scaled_object_name(model: VLLMModel) -> str:
    return model.name


def hpa_name(model: VLLMModel) -> str:
    return model.name


def inference_pool_name(model: VLLMModel) -> str:
    return model.name


def endpoint_picker_name(model: VLLMModel) -> str:
    """The endpoint picker Service the InferencePool names (deployed with the gateway, not by the operator)."""
    picker: Mapping[str, Any] = (model.spec.get("routing") or {}).get("endpointPicker") or {}
    return str(picker.get("name") or f"{model.name}-epp")


# --- shared pieces -----------------------------------------------------------------------------------


def quantity(value: float) -> str:
    """A number as a Kubernetes quantity (to a thousandth): 3 -> "3", 0.8 -> "800m"."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def _threshold(value: float) -> str:
    """KEDA parses thresholds as floats (strconv.ParseFloat): no quantity suffixes."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def scale_target_ref(model: VLLMModel) -> JSON:
    """The VLLMModel's scale subresource: what both autoscalers write replicas to."""
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": model.name}


def behavior_for(settings: Autoscaling) -> JSON:
    """autoscaling/v2 ``behavior``: fast up (double or +4 pods a minute), slow down (one pod per 5 min)."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": settings.scale_up_window,
            "selectPolicy": "Max",
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 60},
                         {"type": "Pods", "value": 4, "periodSeconds": 60}],  # fmt: skip
        },
        "scaleDown": {
            "stabilizationWindowSeconds": settings.scale_down_window,
            "selectPolicy": "Min",
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
        },
    }


def signal_query(model: VLLMModel, settings: Autoscaling) -> str:
    """The PromQL the autoscaler compares with the per-replica target (summed over the model's pods)."""
    if settings.query is not None:
        return settings.query
    return promql.keda_query(settings.metric, namespace=model.namespace, model=model.name)


# --- KEDA ScaledObject -------------------------------------------------------------------------------


def scaled_object_for(model: VLLMModel, config: Config, settings: Autoscaling) -> JSON:
    """A KEDA ScaledObject with a Prometheus trigger on the model's signal (keda.sh/v1alpha1).

    ``metricType: AverageValue``: KEDA's HPA divides the query's value (summed over the pods) by the
    per-replica target. With ``minReplicas: 0`` a second trigger on ``activation.query`` (a signal
    from outside the model's pods, e.g. a gateway's request rate) wakes the model from zero.
    """
    address = settings.server_address or config.prometheus_address
    if not address:
        raise MissingPrometheusAddress(model)
    triggers: list[JSON] = [{
        "type": "prometheus",
        "name": settings.metric.lower(),
        "metricType": "AverageValue",
        "metadata": {"serverAddress": address, "query": signal_query(model, settings),
                     "threshold": _threshold(settings.target)},
    }]  # fmt: skip
    if settings.activation_query is not None:
        triggers.append({
            "type": "prometheus",
            "name": "activation",
            "metricType": "AverageValue",
            "metadata": {"serverAddress": address, "query": settings.activation_query,
                         "threshold": ACTIVATION_ONLY_TARGET,
                         "activationThreshold": _threshold(settings.activation_threshold)},
        })  # fmt: skip
    spec: JSON = {
        "scaleTargetRef": scale_target_ref(model),
        "minReplicaCount": settings.min_replicas,
        "maxReplicaCount": settings.max_replicas,
        "pollingInterval": KEDA_POLLING_INTERVAL_SECONDS,
        "cooldownPeriod": settings.cooldown_seconds,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior_for(settings)}},
        "triggers": triggers,
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": builders.child_metadata(model, scaled_object_name(model), builders.COMPONENT_SERVER),
        "spec": spec,
    }


# --- autoscaling/v2 HorizontalPodAutoscaler ----------------------------------------------------------


def hpa_for(model: VLLMModel, config: Config, settings: Autoscaling) -> JSON:
    """An autoscaling/v2 HPA on a Pods metric that prometheus-adapter serves (the chart's adapter rules)."""
    del config  # same signature as the other builders
    metric = {
        "type": "Pods",
        "pods": {
            "metric": {"name": promql.adapter_metric_name(settings.metric)},
            "target": {"type": "AverageValue", "averageValue": quantity(settings.target)},
        },
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": builders.child_metadata(model, hpa_name(model), builders.COMPONENT_SERVER),
        "spec": {
            "scaleTargetRef": scale_target_ref(model),
            "minReplicas": max(1, settings.min_replicas),
            "maxReplicas": settings.max_replicas,
            "metrics": [metric],
            "behavior": behavior_for(settings),
        },
    }


def autoscaler_for(model: VLLMModel, config: Config) -> JSON | None:
    """The model's autoscaler object (ScaledObject or HPA), None without ``spec.autoscaling``.

    Raises ``MissingPrometheusAddress`` for engine keda without a Prometheus URL.
    """
    settings = autoscaling_of(model)
    if settings is None:
        return None
    if settings.engine == ENGINE_HPA:
        return hpa_for(model, config, settings)
    return scaled_object_for(model, config, settings)


# --- Gateway API Inference Extension InferencePool ---------------------------------------------------


def inference_pool_for(model: VLLMModel, config: Config) -> JSON | None:
    """An InferencePool (inference.networking.k8s.io/v1, the GA API) over the model's server pods on the
    OpenAI port, naming the endpoint picker that routes by queue, KV cache and prefix; None when
    ``spec.routing.inferencePool`` is off."""
    del config
    if not wants_inference_pool(model):
        return None
    picker: Mapping[str, Any] = (model.spec.get("routing") or {}).get("endpointPicker") or {}
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": builders.child_metadata(model, inference_pool_name(model), builders.COMPONENT_SERVER),
        "spec": {
            "selector": {"matchLabels": builders.selector_for(model)},
            "targetPorts": [{"number": builders.HTTP_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": endpoint_picker_name(model),
                "port": {"number": int(picker.get("port") or ENDPOINT_PICKER_PORT)},
                "failureMode": str(picker.get("failureMode") or "FailClose"),
            },
        },
    }


def children_for(model: VLLMModel, config: Config) -> list[JSON]:
    """The autoscaler (when buildable) and the InferencePool, as ``render`` prints them."""
    children: list[JSON | None] = []
    try:
        children.append(autoscaler_for(model, config))
    except MissingPrometheusAddress:
        pass  # the plan reports it in the AutoscalerReady condition; nothing to render
    children.append(inference_pool_for(model, config))
    return [child for child in children if child is not None]
