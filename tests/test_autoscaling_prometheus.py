"""The autoscaling PromQL proven against a real Prometheus scraping a real vLLM (CPU build).

Debian's ``prometheus`` scrapes ``vllm-runtime serve``'s one ``/metrics`` on loopback (every second,
with the labels the chart's PodMonitor writes) while vLLM serves the tiny model one sequence at a
time (``--max-num-seqs 1``), so concurrent requests queue. The queries are the exact strings of the
rendered objects: the KEDA ScaledObject's trigger query and, for the HPA engine, the prometheus-adapter
rule that serves the HPA's Pods metric (the chart's values carry the same rules: tests/test_chart.py).
From the values Prometheus answers, the HPA's formula gives the desired replicas: up under load, and
back to minReplicas only after the (short, here) scale-down stabilization window.

Also here, on the same vLLM: the runtime's ``/metrics`` relays vLLM's routing signals unchanged, and
(last, as it stops the server) a SIGTERM under load takes the pod out of the endpoints while it still
takes requests, and vLLM finishes what is in flight.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_fixtures import (
    MODEL_NAME,
    MODEL_NAMESPACE,
    POD_LABELS,
    POD_NAME,
    LoadGenerator,
    PrometheusServer,
    SaturableServer,
    StabilizedHpa,
    hpa_desired_replicas,
    vllm_waiting,
    wait_until,
)

from vllm_operator import autoscaling, promql
from vllm_operator.config import Config
from vllm_operator.model import VLLMModel
from vllm_runtime.demo import complete, http_status, scrape

pytestmark = pytest.mark.e2e

SCRAPE_INTERVAL = 1.0
TARGET = 2  # waiting requests per replica
CONCURRENCY = 6  # one runs, five wait: 5 / 2 -> 3 replicas
MAX_REPLICAS = 4
SCALE_DOWN_WINDOW = 8  # seconds; GPU pods get 600 by default
ROUTING_SIGNALS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
LORA_INFO = "vllm:lora_requests_info"
RELAY_AGE = "vllm_runtime_vllm_metrics_age_seconds"
RELAY_FRESH_S = 0.5  # a read made for this scrape: its age is about vLLM's answer time, not a scrape interval


Sample = tuple[float, int, float, int]  # KEDA value, its desired replicas, adapter average, the HPA's desired
Evaluation = tuple[float, Sample, int]  # (time, sample, replicas after the stabilization windows)


def model_body(engine: str, server_address: str, metric: str = "queueDepth", target: float = TARGET) -> VLLMModel:
    return VLLMModel.from_body({
        "metadata": {"name": MODEL_NAME, "namespace": MODEL_NAMESPACE, "uid": "u-1", "generation": 1},
        "spec": {
            "model": "test-org/tiny-llama",
            "autoscaling": {
                "engine": engine, "minReplicas": 1, "maxReplicas": MAX_REPLICAS, "metric": metric,
                "target": target, "serverAddress": server_address,
                "behavior": {"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": SCALE_DOWN_WINDOW},
            },
        },
    })  # fmt: skip


@pytest.fixture(scope="module")
def prometheus(saturable_server: SaturableServer) -> Iterator[PrometheusServer]:
    server = PrometheusServer([saturable_server.metrics_target], POD_LABELS, scrape_interval=SCRAPE_INTERVAL).start()
    try:
        wait_until(server.targets_up, timeout=60, what="prometheus scraping the runtime's /metrics")
        yield server
    finally:
        server.stop()


def quantity_value(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


class Signals:
    """The two engines' queries, as rendered for the model, and their evaluation in Prometheus."""

    def __init__(self, prometheus: PrometheusServer) -> None:
        self.prometheus = prometheus
        config = Config()
        keda_model = model_body("keda", prometheus.url)
        scaled_object = autoscaling.autoscaler_for(keda_model, config)
        assert scaled_object is not None and scaled_object["kind"] == "ScaledObject"
        (trigger,) = scaled_object["spec"]["triggers"]
        assert trigger["metricType"] == "AverageValue" and trigger["metadata"]["serverAddress"] == prometheus.url
        self.keda_query: str = trigger["metadata"]["query"]
        self.keda_target = float(trigger["metadata"]["threshold"])
        behavior = scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        self.scale_down_window = float(behavior["scaleDown"]["stabilizationWindowSeconds"])
        self.scale_up_window = float(behavior["scaleUp"]["stabilizationWindowSeconds"])

        hpa = autoscaling.autoscaler_for(model_body("hpa", prometheus.url), config)
        assert hpa is not None and hpa["kind"] == "HorizontalPodAutoscaler"
        (pods_metric,) = hpa["spec"]["metrics"]
        name = pods_metric["pods"]["metric"]["name"]
        (rule,) = [r for r in promql.adapter_rules() if r["name"]["as"] == name]  # the chart's values, too
        series = rule["seriesQuery"].split("{", 1)[0]
        # The adapter's query for the HPA's pods of the model's namespace (one pod here).
        self.adapter_query = promql.render_adapter_query(
            rule["metricsQuery"], series=series, label_matchers={"namespace": MODEL_NAMESPACE, "pod": POD_NAME}
        )
        self.adapter_target = quantity_value(pods_metric["pods"]["target"]["averageValue"])
        assert self.keda_target == self.adapter_target == TARGET

    def keda(self, at: float | None = None) -> float:
        """The trigger query's one sample (KEDA reads an empty result as 0)."""
        return self.prometheus.scalar(self.keda_query, at=at) or 0.0

    def adapter(self, at: float | None = None) -> dict[str, float]:
        """The adapter's value per pod (the custom-metrics API answer the HPA averages)."""
        return {labels["pod"]: value for labels, value in self.prometheus.query(self.adapter_query, at=at)}

    def desired(self) -> Sample:
        """(KEDA value, KEDA's desired replicas, adapter average, the HPA's desired replicas) for the pods now
        reporting: ceil(current * value / target) with current the pods whose signal made the value."""
        # Both at one instant a little in the past, so that no scrape lands between the two queries.
        # A scrape's samples carry its start time, so a slow scrape can still add a sample before ``at``
        # after the first query: read the KEDA query again and retry until nothing landed in between.
        while True:
            at = time.time() - 2 * SCRAPE_INTERVAL
            keda = self.keda(at)
            per_pod = self.adapter(at)
            if self.keda(at) == keda:
                break
        assert set(per_pod) <= {POD_NAME}, per_pod
        pods = max(1, len(per_pod))
        average = sum(per_pod.values()) / pods
        # External AverageValue (KEDA): value is the sum, per replica = sum / pods.
        return (
            keda, hpa_desired_replicas(current=pods, value=keda / pods, target=self.keda_target),
            average, hpa_desired_replicas(current=pods, value=average, target=self.adapter_target),
        )  # fmt: skip


def test_rendered_queries_rise_past_the_target_under_load_and_scale_back_after_the_window(
    saturable_server: SaturableServer, prometheus: PrometheusServer
) -> None:
    signals = Signals(prometheus)
    assert signals.scale_down_window == SCALE_DOWN_WINDOW and signals.scale_up_window == 0

    # Idle: the series is there (the adapter answers for the pod) and says no queue: 1 replica.
    wait_until(lambda: signals.adapter() == {POD_NAME: 0.0}, timeout=30, what="idle pod's queue in Prometheus")
    keda, keda_desired, average, hpa_desired = signals.desired()
    assert (keda, keda_desired, average, hpa_desired) == (0.0, 1, 0.0, 1)
    stabilized = StabilizedHpa(current=1, min_replicas=1, max_replicas=MAX_REPLICAS,
                               scale_up_window=signals.scale_up_window, scale_down_window=signals.scale_down_window)  # fmt: skip

    # Long requests (96 tokens each, one at a time) keep the queue full between a completion and the client's
    # next request, even when the client's threads are slow on a loaded machine.
    load = LoadGenerator(saturable_server.api, saturable_server.repo_id, concurrency=CONCURRENCY, max_tokens=96,
                         deadline_s=150)  # fmt: skip
    history: list[Evaluation] = []

    def evaluate() -> Evaluation:
        """One autoscaler evaluation, as KEDA's/the HPA's controller makes them every period."""
        sample = signals.desired()
        assert sample[1] == sample[3], sample  # KEDA's and the HPA's formula agree on the same signal
        history.append((time.monotonic(), sample, stabilized.observe(sample[1])))
        return history[-1]

    with load:
        # Under load: both queries pass the target, and both engines ask for more replicas, at once.
        def above_target() -> bool:
            evaluate()
            return sum(1 for _, s, _ in history if s[0] > TARGET and s[2] > TARGET) >= 3  # not a one-scrape blip

        # First vLLM's own count: the load has built its queue (the clients' threads may start slowly).
        wait_until(lambda: vllm_waiting(saturable_server.api) > TARGET, timeout=60, what="vLLM's own queue")
        wait_until(above_target, timeout=60, interval=SCRAPE_INTERVAL, what=f"queue above {TARGET} per replica")
        # The other two signals, through their rendered ScaledObjects' queries: one sequence runs at a time
        # (--max-num-seqs 1), and it holds some of the KV cache.
        running_query = rendered_keda_query(prometheus.url, "runningRequests", 0.5)
        kv_query = rendered_keda_query(prometheus.url, "kvCacheUsage", 0.8)
        running = wait_until(lambda: prometheus.scalar(running_query), timeout=30, interval=SCRAPE_INTERVAL,
                             what="a running request in Prometheus")  # fmt: skip
        assert running == 1.0 and hpa_desired_replicas(current=1, value=running, target=0.5) == 2
        kv_cache = wait_until(lambda: prometheus.scalar(kv_query), timeout=30, interval=SCRAPE_INTERVAL,
                              what="KV cache in use in Prometheus")  # fmt: skip
        assert 0.0 < kv_cache < 0.8
        crossed = [(s, replicas) for _, s, replicas in history if s[0] > TARGET]
        for (keda, keda_desired, average, hpa_desired), replicas in crossed:
            assert keda_desired == hpa_desired > 1, crossed  # ceil(1 pod * queue / 2) > 1
            assert keda_desired <= CONCURRENCY  # never more replicas than requests
            assert replicas >= keda_desired  # scale-up window 0: up at once (down only after the window)

        # Idle again (no new requests; those queued finish): the value drops below the target, the replicas
        # stay up for the scale-down window after the last high recommendation, then go back to minReplicas.
        load.stop_sending()

        def below_target() -> Evaluation | None:
            evaluation = evaluate()
            return evaluation if evaluation[1][0] < TARGET else None

        below_at, sample, replicas = wait_until(below_target, timeout=60, interval=SCRAPE_INTERVAL,
                                                what="queue back below the target")  # fmt: skip
    assert load.completed > 0 and not load.errors, load.errors[:3]
    keda, keda_desired, average, hpa_desired = sample
    assert keda < TARGET and average < TARGET and keda_desired == hpa_desired == 1
    last_high = max(t for t, s, _ in history if s[1] > 1)
    # On a loaded machine an evaluation can take long enough that the drop is first seen after the window.
    window_open = below_at - last_high < SCALE_DOWN_WINDOW
    if window_open:
        assert replicas > 1  # the window still remembers the load
    else:
        assert replicas == 1  # the window had already passed: down, as the HPA would be

    def scaled_down() -> Evaluation | None:
        evaluation = evaluate()
        return evaluation if evaluation[2] == 1 else None

    scaled_down_at, _, _ = wait_until(scaled_down, timeout=SCALE_DOWN_WINDOW + 30, interval=SCRAPE_INTERVAL,
                                      what="scale down after the window")  # fmt: skip
    assert all(replicas > 1 for t, _, replicas in history if below_at <= t < scaled_down_at)
    assert scaled_down_at - last_high >= SCALE_DOWN_WINDOW  # not before the window ended ...
    if window_open:
        assert scaled_down_at - below_at >= SCALE_DOWN_WINDOW - 2 * SCRAPE_INTERVAL  # ... measured from the real drop
    wait_until(lambda: signals.desired() == (0.0, 1, 0.0, 1), timeout=30, what="queue empty")
    wait_until(lambda: prometheus.scalar(rendered_keda_query(prometheus.url, "runningRequests", 0.5)) == 0.0,
               timeout=30, what="no request running")  # fmt: skip
    assert prometheus.scalar(rendered_keda_query(prometheus.url, "kvCacheUsage", 0.8)) == 0.0


def rendered_keda_query(server_address: str, metric: str, target: float) -> str:
    """The trigger query of the ScaledObject rendered for ``metric``."""
    scaled_object = autoscaling.autoscaler_for(model_body("keda", server_address, metric, target), Config())
    assert scaled_object is not None
    (trigger,) = scaled_object["spec"]["triggers"]
    assert float(trigger["metadata"]["threshold"]) == target
    return str(trigger["metadata"]["query"])


def _samples(text: str, names: tuple[str, ...]) -> dict[str, list[tuple[tuple[tuple[str, str], ...], float]]]:
    from vllm_runtime.metrics import parse_exposition

    parsed = parse_exposition(text)
    return {n: sorted((tuple(sorted(labels.items())), v) for labels, v in parsed.get(n, [])) for n in names}


def _family_lines(text: str, name: str) -> list[str]:
    """The HELP/TYPE lines and the sample lines' name+labels (no value) of ``name``."""
    out = []
    for line in text.splitlines():
        if line.startswith((f"# HELP {name} ", f"# TYPE {name} ")):
            out.append(line)
        elif line.startswith((name + "{", name + " ")):
            out.append(line.rsplit(" ", 1)[0])
    return out


def test_runtime_metrics_relay_vllms_routing_signals_unchanged(
    saturable_server: SaturableServer, prometheus: PrometheusServer
) -> None:
    """What an inference gateway's endpoint picker reads from the pod's scrape: vLLM's names, labels and
    values, compared with vLLM's own /metrics at the same moment (under load, so the values are not 0)."""
    del prometheus  # the load is easier to see when Prometheus is up too; it is not needed here
    vllm_metrics = saturable_server.api  # vLLM's own /metrics, on its OpenAI port
    with LoadGenerator(saturable_server.api, saturable_server.repo_id, concurrency=3, max_tokens=48, deadline_s=120):
        wait_until(lambda: vllm_waiting(vllm_metrics) > 0, timeout=60, what="requests waiting in vLLM")
        names = ROUTING_SIGNALS

        tries: dict[str, int] = {}  # why a try did not count, for the failure message

        def same_moment() -> tuple[Any, Any, Any, str, str] | None:
            before_text = scrape(vllm_metrics)[0]
            relayed_text = scrape(saturable_server.metrics)[0]
            after_text = scrape(vllm_metrics)[0]
            before, relayed, after = (_samples(t, (*names, LORA_INFO)) for t in (before_text, relayed_text, after_text))
            for n in names:  # names and labels must match on every try; values only when nothing moved
                assert [labels for labels, _ in relayed[n]] == [labels for labels, _ in before[n]], n
            age = _samples(relayed_text, (RELAY_AGE,))[RELAY_AGE]
            # The relay hands on an earlier read when vLLM answers slowly (its age says so): compare values only
            # for a read made for this scrape. A request can also start or end between the scrapes, and a value
            # can come back (2 -> 0 -> 2): only three equal readings show the relay's value is vLLM's own.
            if not age or age[0][1] > RELAY_FRESH_S:
                reason = "relayed an earlier read"
            elif any(not (before[n] == relayed[n] == after[n]) for n in names):
                reason = "values moved between the scrapes"
            elif not any(v > 0 for _, v in before["vllm:num_requests_running"]):
                reason = "between two requests"  # zeros would not show a value passing through
            else:
                return before, relayed, after, before_text, relayed_text
            tries[reason] = tries.get(reason, 0) + 1
            return None

        try:
            before, relayed, after, direct_text, relayed_text = wait_until(
                same_moment, timeout=90, interval=0.05, what="two equal scrapes of vLLM around the relay"
            )
        except TimeoutError as error:
            raise AssertionError(f"{error}; tries that did not count: {tries}") from error
    for name in names:
        assert before[name], f"vLLM exports no {name}"
        assert relayed[name] == before[name], name  # names, labels and values
        assert _family_lines(relayed_text, name) == _family_lines(direct_text, name), name  # HELP/TYPE verbatim
    # LoRA is on (the fixture's --enable-lora): vLLM's adapter info passes too. Its value is the time of
    # vLLM's last update, so it lies between the two direct scrapes' values.
    assert before[LORA_INFO], f"vLLM with --enable-lora exports no {LORA_INFO}"
    assert [labels for labels, _ in relayed[LORA_INFO]] == [labels for labels, _ in before[LORA_INFO]]
    for (_, low), (_, mid), (_, high) in zip(before[LORA_INFO], relayed[LORA_INFO], after[LORA_INFO], strict=True):
        assert low <= mid <= high
    assert _family_lines(relayed_text, LORA_INFO) == _family_lines(direct_text, LORA_INFO)
    (labels, _), *_ = relayed[LORA_INFO]
    assert {"running_lora_adapters", "waiting_lora_adapters", "max_lora"} <= {k for k, _ in labels}
    # The runtime adds its own series beside vLLM's, never under vLLM's names.
    runtime_only = {line.split("{")[0].split(" ")[0] for line in relayed_text.splitlines() if line.startswith("vllm_runtime_")}
    assert runtime_only and not any(n.startswith("vllm:") for n in runtime_only)


def _signal_state(pid: int) -> str:
    """Pending signals and what each thread of ``pid`` waits in (for a failure message)."""
    from pathlib import Path

    def fields(path: Path) -> str:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return "gone"
        return " ".join(line for line in lines if line.startswith(("SigPnd", "ShdPnd", "SigBlk")))

    tasks = sorted(Path(f"/proc/{pid}/task").glob("*"))
    threads = [f"{t.name}:{(t / 'comm').read_text().strip()}:{(t / 'wchan').read_text()}:{fields(t / 'status')}"
               for t in tasks if (t / "wchan").exists()]  # fmt: skip
    return f"serve {fields(Path(f'/proc/{pid}/status'))}; threads {threads}"


def test_sigterm_under_load_leaves_the_endpoints_first_and_finishes_requests_in_flight(
    saturable_server: SaturableServer,
) -> None:
    """Stops the module's vLLM: the last test here. serve's default --endpoint-drain-seconds (5 s), which is
    what the operator passes too (builders.ENDPOINT_DRAIN_SECONDS)."""
    from vllm_operator.builders import ENDPOINT_DRAIN_SECONDS

    serve = saturable_server.server
    assert serve.proc is not None
    load = LoadGenerator(saturable_server.api, saturable_server.repo_id, concurrency=3, max_tokens=48, deadline_s=60)
    with load:
        wait_until(lambda: load.completed >= 1, timeout=60, what="the load's first completion")
        signalled = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        seen: list[tuple[float, int]] = []  # (seconds after SIGTERM, /ready's answer): the message if it fails

        def not_ready() -> bool:
            seen.append((round(time.monotonic() - signalled, 2), http_status(serve.metrics + "/ready")))
            return seen[-1][1] == 503

        try:
            wait_until(not_ready, timeout=ENDPOINT_DRAIN_SECONDS, interval=0.05, what="/ready failing after SIGTERM")
        except TimeoutError as err:
            raise AssertionError(f"{err}; /ready answered {seen}; {_signal_state(serve.proc.pid)}; "
                                 f"serve's log: {serve.log_text()[-1500:]}") from err
        out_of_endpoints = time.monotonic() - signalled
        load.stop_sending()  # the load's requests in flight must finish; it sends no new ones
        # A new request while the pod is leaving the endpoints is still served (a gateway may not know yet).
        assert time.monotonic() - signalled < ENDPOINT_DRAIN_SECONDS
        late = complete(saturable_server.api, saturable_server.repo_id, "Still there?", max_tokens=4)
        assert late["usage"]["completion_tokens"] >= 1
    assert not load.errors, load.errors[:3]  # nothing in flight was cut off
    code = serve.proc.wait(timeout=90)
    stopped = time.monotonic() - signalled
    assert code == 0, serve.log_text()[-3000:]
    assert out_of_endpoints < ENDPOINT_DRAIN_SECONDS <= stopped  # out of the endpoints first, stopped later
    log = serve.log_text()
    assert log.index("keeps serving") < log.index("forwarding SIGTERM") < log.index("[shutdown]")
