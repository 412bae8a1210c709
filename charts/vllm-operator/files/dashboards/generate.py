"""Generates vllm-models.json, the chart's Grafana dashboard (edit this, then run it; a test checks they agree).

    python charts/vllm-operator/files/dashboards/generate.py

Per model (a row repeated for each selected model): readiness and start-up phases, load, KV cache, autoscaling
(desired vs current replicas, the scaling signal), GPU memory, the weight cache and its download; on top, the
operator's reconciles. Queries use the `model` and `component`
labels that the chart's PodMonitor/ServiceMonitor add.
"""

import json
import sys
from pathlib import Path

from vllm_operator import promql  # the autoscaling queries: the dashboard shows what the autoscaler reads
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", model="$model"'
panels = []
pid = [0]
y = [0]

def nid():
    pid[0] += 1
    return pid[0]

def row(title, repeat=None, collapsed=False):
    p = {"type": "row", "id": nid(), "title": title, "collapsed": collapsed,
         "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]}, "panels": []}
    if repeat:
        p["repeat"] = repeat
    y[0] += 1
    panels.append(p)

def panel(kind, title, targets, x, w, h, unit=None, desc=None, extra=None):
    p = {"type": kind, "id": nid(), "title": title, "datasource": DS,
         "gridPos": {"h": h, "w": w, "x": x, "y": y[0]},
         "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l}
                     for i, (e, l) in enumerate(targets)],
         "fieldConfig": {"defaults": {}, "overrides": []}, "options": {}}
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    if desc:
        p["description"] = desc
    if extra:
        for k, v in extra.items():
            p[k] = v
    panels.append(p)

row("Operator")
panel("stat", "Models by phase", [("sum by (phase) (vllm_operator_models)", "{{phase}}")], 0, 6, 6,
      desc="VLLMModels the operator knows, by status.phase.")
panel("timeseries", "Reconciles by result", [("sum by (result) (rate(vllm_operator_reconcile_total[$__rate_interval]))", "{{result}}")], 6, 6, 6, unit="ops")
panel("timeseries", "Reconcile errors", [("sum(rate(vllm_operator_reconcile_errors_total[$__rate_interval]))", "errors/s")], 12, 6, 6, unit="ops")
panel("timeseries", "Reconcile duration p50 / p95", [
    ("histogram_quantile(0.5, sum by (le) (rate(vllm_operator_reconcile_duration_seconds_bucket[$__rate_interval])))", "p50"),
    ("histogram_quantile(0.95, sum by (le) (rate(vllm_operator_reconcile_duration_seconds_bucket[$__rate_interval])))", "p95")], 18, 6, 6, unit="s")
y[0] += 6

row("Model $model", repeat="model")
mapping = [{"type": "value", "options": {"0": {"text": "not ready", "color": "red"}}}]
panel("stat", "Ready pods", [(f"sum(vllm_runtime_ready{{{SEL}}})", "ready")], 0, 4, 5,
      desc="Model server pods whose vLLM answers /health.")
panel("stat", "Time to ready", [(f"max(vllm_runtime_time_to_ready_seconds{{{SEL}}})", "")], 4, 4, 5, unit="s",
      desc="Seconds from process start to ready, slowest pod.")
panel("bargauge", "Start-up phases", [(f"max by (phase) (vllm_runtime_startup_phase_seconds{{{SEL}}})", "{{phase}}")], 8, 8, 5, unit="s",
      desc="Seconds from process start to each start-up phase: weights loaded, compile done, KV cache allocated, healthy.")
panel("stat", "Cache", [(f"max(vllm_runtime_cache_complete{{{SEL}}})", "complete"),
                        (f"max(vllm_runtime_cache_bytes{{{SEL}}})", "size"),
                        (f"max(vllm_runtime_cache_files{{{SEL}}})", "files"),
                        (f"max(vllm_runtime_cache_verification_seconds{{{SEL}}})", "sha256 verification (s)")], 16, 8, 5,
      desc="The verified weight cache of the commit served: complete (1) or not, bytes, files, verification time.",
      extra={"fieldConfig": {"defaults": {}, "overrides": [
          {"matcher": {"id": "byName", "options": "size"}, "properties": [{"id": "unit", "value": "bytes"}]}]}})
y[0] += 5
panel("bargauge", "vLLM start-up steps", [(f"max by (step) (vllm_runtime_vllm_reported_seconds{{{SEL}}})", "{{step}}")], 0, 8, 5, unit="s",
      desc="Durations vLLM itself logs while starting: weight loading, torch.compile, engine init.")
panel("stat", "Compile cache hit", [(f"min(vllm_runtime_compile_cache_hit{{{SEL}}})", "")], 8, 4, 5,
      desc="1 when vLLM loaded its compiled graphs from the cache volume instead of compiling again.")
panel("stat", "KV cache capacity (tokens)", [(f"min(vllm_runtime_kv_cache_tokens{{{SEL}}})", "")], 12, 6, 5, unit="short")
panel("stat", "Max concurrency at max length", [(f"min(vllm_runtime_max_concurrency{{{SEL}}})", "")], 18, 6, 5, unit="short",
      desc="Requests of maxModelLen tokens that fit the KV cache at once, as vLLM logged it.")
y[0] += 5
panel("timeseries", "Requests", [(f"sum(vllm:num_requests_running{{{SEL}}})", "running"),
                                 (f"sum(vllm:num_requests_waiting{{{SEL}}})", "waiting")], 0, 8, 7, unit="short")
panel("timeseries", "Tokens per second", [(f"sum(rate(vllm:prompt_tokens_total{{{SEL}}}[$__rate_interval]))", "prompt"),
                                          (f"sum(rate(vllm:generation_tokens_total{{{SEL}}}[$__rate_interval]))", "generation")], 8, 8, 7, unit="short")
panel("timeseries", "KV cache usage", [(f"max by (pod) (vllm:kv_cache_usage_perc{{{SEL}}})", "{{pod}}")], 16, 8, 7, unit="percentunit",
      extra={"fieldConfig": {"defaults": {"unit": "percentunit", "min": 0, "max": 1}, "overrides": []}})
y[0] += 7
# Autoscaling (spec.autoscaling): the replicas the autoscaler asks for against those there are, and the signal it
# scales on, per replica, with the very queries of vllm_operator.promql (the ScaledObject's and the adapter's).
SERVER = '{' + SEL + ', component="server"}'
panel("timeseries", "Replicas: desired vs current", [
    (f"max(vllm_operator_autoscaling_desired_replicas{{{SEL}}})", "desired (autoscaler)"),
    (f"max(vllm_operator_autoscaling_current_replicas{{{SEL}}})", "current (Deployment)"),
    (f"sum(max by (pod) (vllm_runtime_ready{SERVER}))", "ready"),
    (f"max(vllm_operator_autoscaling_max_replicas{{{SEL}}})", "maxReplicas"),
    (f"max(vllm_operator_autoscaling_min_replicas{{{SEL}}})", "minReplicas")], 0, 12, 7, unit="short",
      desc="spec.autoscaling: the autoscaler's spec.replicas (desired), the Deployment's pods (current), ready pods, and "
           "the bounds. Empty for a model without autoscaling.")
panel("timeseries", "Scaling signal per replica", [
    (promql.average_per_replica_query_matching("queueDepth", SERVER), "queueDepth (waiting)"),
    (promql.average_per_replica_query_matching("runningRequests", SERVER), "runningRequests (running)"),
    (promql.average_per_replica_query_matching("kvCacheUsage", SERVER), "kvCacheUsage (fraction)")], 12, 12, 7, unit="short",
      desc="What the autoscaler compares with spec.autoscaling.target, per replica: vLLM's signal per pod (engines "
           "added up, a fraction averaged), averaged over the model's pods.")
y[0] += 7
# LoRA adapters (spec.adapters): on how many ready replicas each adapter is loaded (the operator's gauges, what the
# alert VLLMModelAdapterNotLoaded compares), the runtime's loads and failures, and vLLM's own adapter gauge.
panel("timeseries", "LoRA adapters: loaded / ready replicas", [
    (f"max by (adapter) (vllm_operator_adapter_replicas_loaded{{{SEL}}})", "{{adapter}} loaded"),
    (f"max by (adapter) (vllm_operator_adapter_replicas_ready{{{SEL}}})", "{{adapter}} ready replicas")], 0, 8, 7,
      unit="short", desc="spec.adapters: per adapter, the ready replicas whose runtime reports it loaded at its "
      "published commit, and the ready replicas. Below ready for long: see the AdaptersReady condition.")
panel("timeseries", "LoRA adapter loads: p95 time, failures", [
    (f"histogram_quantile(0.95, sum by (le, adapter) (rate(vllm_runtime_adapter_load_seconds_bucket{{{SEL}}}[$__rate_interval])))",
     "{{adapter}} load p95 (s)"),
    (f"sum by (adapter, reason) (increase(vllm_runtime_adapter_load_failures_total{{{SEL}}}[$__rate_interval]))",
     "{{adapter}} failed: {{reason}}")], 8, 8, 7, unit="short",
      desc="Loads into the running vLLM (no restart) and failed loads by reason (AdapterRankTooHigh, ...).")
panel("timeseries", "LoRA adapters loaded per pod", [
    (f"max by (pod, adapter) (vllm_runtime_adapter_loaded{{{SEL}}})", "{{pod}} {{adapter}}")], 16, 8, 7, unit="short",
      desc="The runtime's own view (1: loaded at the desired commit). vLLM's vllm:lora_requests_info (the adapters of "
      "running and waiting requests) is relayed unchanged on the same scrape for ad-hoc queries.")
y[0] += 7
panel("timeseries", "GPU memory", [(f"sum by (pod, gpu) (vllm_runtime_gpu_memory_used_bytes{{{SEL}}})", "used {{pod}} gpu {{gpu}}"),
                                   (f"sum by (pod, gpu) (vllm_runtime_gpu_memory_total_bytes{{{SEL}}})", "total {{pod}} gpu {{gpu}}")], 0, 12, 7, unit="bytes",
      desc="From NVML. Empty when vllm_runtime_gpu_metrics_available is 0 (no GPU visible to the pod).")
panel("timeseries", "vLLM host memory (RSS)", [(f"sum by (pod) (vllm_runtime_vllm_resident_memory_bytes{{{SEL}}})", "{{pod}}")], 12, 6, 7, unit="bytes")
panel("stat", "GPU metrics available", [(f"min(vllm_runtime_gpu_metrics_available{{{SEL}}})", "")], 18, 6, 7)
y[0] += 7
panel("timeseries", "Weight download", [(f"max(vllm_runtime_cache_downloaded_bytes{{{SEL}}}) / max(vllm_runtime_cache_total_bytes{{{SEL}}})", "progress")], 0, 6, 7,
      unit="percentunit", desc="Progress of the cache Job (needs the PodMonitor: cache Job pods have no Service).")
panel("timeseries", "Download rate", [(f"sum(vllm_runtime_cache_download_rate_bytes_per_second{{{SEL}}})", "rate")], 6, 6, 7, unit="Bps")
panel("timeseries", "Download ETA", [(f"max(vllm_runtime_cache_eta_seconds{{{SEL}}})", "eta")], 12, 6, 7, unit="s")
panel("timeseries", "Download stalls and retries", [(f"sum(increase(vllm_runtime_cache_stalls_total{{{SEL}}}[$__rate_interval]))", "stalls"),
                                                    (f"sum(increase(vllm_runtime_cache_retries_total{{{SEL}}}[$__rate_interval]))", "retries")], 18, 6, 7, unit="short")
y[0] += 7

dash = {
    "title": "vLLM models",
    "uid": "vllm-operator-models",
    "description": "Per VLLMModel: load, GPU memory, weight cache, start-up phases; and the operator's reconciles.",
    "tags": ["vllm", "vllm-operator"],
    "editable": True,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "timezone": "",
    "graphTooltip": 1,
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
         "current": {}, "hide": 0, "refresh": 1},
        {"name": "namespace", "type": "query", "label": "Namespace", "datasource": DS,
         "query": {"query": "label_values(vllm_runtime_cache_bytes, namespace)", "refId": "namespace"},
         "definition": "label_values(vllm_runtime_cache_bytes, namespace)",
         "includeAll": True, "multi": True, "current": {}, "refresh": 2, "sort": 1},
        {"name": "model", "type": "query", "label": "Model", "datasource": DS,
         "query": {"query": 'label_values(vllm_runtime_cache_bytes{namespace=~"$namespace"}, model)', "refId": "model"},
         "definition": 'label_values(vllm_runtime_cache_bytes{namespace=~"$namespace"}, model)',
         "includeAll": True, "multi": True, "current": {}, "refresh": 2, "sort": 1},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
OUTPUT = Path(__file__).with_name("vllm-models.json")


def render() -> str:
    return json.dumps(dash, indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUTPUT.read_text() == render() else 1)
    OUTPUT.write_text(render())
