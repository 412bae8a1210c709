"""The operator benchmark's API-load accounting and its markdown tables (current vs a baseline, side by side).

A request the operator makes to the emulated API server is counted under a verb and a resource:

=============  =================================================================================
verb           request
=============  =================================================================================
GET            GET of one named object (``/namespaces/ns/jobs/name``)
LIST           GET of a collection without ``watch=true``
WATCH          GET with ``watch=true`` (the streams kopf holds; re-opened after a timeout)
POST           create
PATCH apply    server-side apply (``application/apply-patch+yaml``)
PATCH status   any PATCH of the ``/status`` subresource
PATCH other    merge/JSON/strategic PATCH of an object (kopf's annotations, for instance)
PUT, DELETE    as named
Event POST     create of a ``v1`` or ``events.k8s.io`` Event
Event PATCH    PATCH of an Event (a repeated Event's count)
discovery      ``/api``, ``/apis``, ``/version`` and the like (no resource)
=============  =================================================================================

"Reads beyond the watches" are GET + LIST: what the operator reads although kopf's watch streams
already deliver every object it watches. A "per-model LIST" is a LIST whose label selector names one
model (``vllm-operator.io/model=NAME``): a resync that makes one per model scales with the model count.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

LABEL_MODEL = "vllm-operator.io/model"
IMPORTED_FROM = "bench child: vllm_operator imported from "  # the child's first log line
READS = ("GET", "LIST")
VERB_ORDER = ("GET", "LIST", "WATCH", "POST", "PATCH apply", "PATCH status", "PATCH other", "PUT", "DELETE",
              "Event POST", "Event PATCH", "discovery", "other")  # fmt: skip
EVENT_PLURALS = {"events"}


def classify(method: str, action: str | None, plural: str | None, group: str | None, subresource: str | None,
             content_type: str, watch: bool) -> tuple[str, str]:  # fmt: skip
    """(verb, resource) of one request; the resource is ``plural`` or ``plural.group``."""
    if plural is None:
        return "discovery", "-"
    resource = f"{plural}.{group}" if group else plural
    if subresource and subresource != "status":
        resource = f"{resource}/{subresource}"
    method = method.upper()
    if plural in EVENT_PLURALS and method in ("POST", "PATCH"):
        return f"Event {method}", resource
    if method == "GET":
        if watch or action == "WATCH":
            return "WATCH", resource
        return ("LIST", resource) if action == "LIST" else ("GET", resource)
    if method == "PATCH":
        if subresource == "status":
            return "PATCH status", resource
        return ("PATCH apply" if "apply-patch" in content_type else "PATCH other"), resource
    if method in ("POST", "PUT", "DELETE"):
        return method, resource
    return "other", resource


def is_per_model_list(verb: str, label_selector: str) -> bool:
    return verb == "LIST" and any(t.strip().startswith(LABEL_MODEL + "=") for t in label_selector.split(","))


def diff(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def load_summary(counts: Mapping[str, int], errors: Mapping[str, int], per_model_lists: int,
                 models: int) -> dict[str, Any]:  # fmt: skip
    """One phase's requests (keys ``"VERB resource"``), totals by verb and the figures per model."""
    by_verb: Counter[str] = Counter()
    for key, n in counts.items():
        by_verb[key.rsplit(" ", 1)[0]] += n
    reads = sum(by_verb.get(v, 0) for v in READS)
    total = sum(by_verb.values())
    per = max(1, models)
    return {
        "models": models,
        "requests": dict(sorted(counts.items())),
        "errors": dict(sorted(errors.items())),
        "by_verb": {v: by_verb[v] for v in VERB_ORDER if by_verb.get(v)},
        "total": total,
        "per_model": {v: by_verb[v] / per for v in VERB_ORDER if by_verb.get(v)},
        "total_per_model": total / per,
        "lists": by_verb.get("LIST", 0),
        "reads_beyond_watches": reads,
        "reads_beyond_watches_per_model": reads / per,
        "per_model_lists": per_model_lists,
    }


def slope_per(samples: list[tuple[int, float]], unit: int) -> float:
    """Least-squares slope of (x, y) samples, per ``unit`` of x; nan with fewer than two x values."""
    xs = [x for x, _ in samples]
    if len(set(xs)) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(y for _, y in samples) / len(samples)
    sxx = sum((x - mx) ** 2 for x in xs)
    return unit * sum((x - mx) * (y - my) for x, y in samples) / sxx


# --- markdown ---------------------------------------------------------------------------------------------


def _fmt(value: Any, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "per model":
        return f"{value:,.2f}"
    if unit in ("ms", "MB", "MB/1k"):
        return f"{value:,.1f} {unit}"
    if unit == "s":
        return f"{value:,.2f} s"
    return f"{value:,.3g} {unit}".strip()


def _get(result: Mapping[str, Any] | None, path: str) -> Any:
    node: Any = result
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def summary_rows(results: list[Mapping[str, Any]]) -> list[tuple[str, str, list[Any], str]]:
    """(measure, unit, one value per side, goal) for the side-by-side table."""
    first = next((r for r in results if r.get("load")), results[0])
    lat_n, burst_n = _get(first, "load/latency/models"), _get(first, "load/burst/models")
    models_n, cycles_n = _get(first, "load/memory/models"), _get(first, "cycles/cycles")
    window, every = _get(first, "load/api/idle_window_s"), _get(first, "load/api/resync_interval_s")
    idle = f"idle {window or 0:.0f} s" + (f", resync every {every:g} s" if every else "")
    rows: list[tuple[str, str, str, str]] = [
        (f"create -> first status, p99 ({lat_n} models one at a time)", "ms", "load/latency/first_p99_ms", ""),
        (f"create -> Ready, p50 ({lat_n} models one at a time)", "ms", "load/latency/ready_p50_ms", ""),
        (f"create -> Ready, p99 ({lat_n} models one at a time)", "ms", "load/latency/ready_p99_ms", "< 250 ms"),
        (f"{burst_n} models at once -> all Ready, wall", "s", "load/burst/wall_s", "1,000 within 60 s"),
        (f"{burst_n} models at once: Ready count", "count", "load/burst/reconciled", f"{burst_n}"),
        (f"operator RSS at {models_n} models", "MB", "load/memory/rss_loaded_mb", "< 200 MB"),
        ("operator peak RSS (VmHWM) after the burst", "MB", "load/memory/rss_peak_mb", ""),
        ("operator CPU per model, one at a time", "ms", "load/cpu/operator_ms_per_model_latency", ""),
        ("operator CPU per model, burst", "ms", "load/cpu/operator_ms_per_model_burst", ""),
        ("emulator CPU per model, burst", "ms", "load/cpu/emulator_ms_per_model_burst", ""),
        ("reconciles per model (operator's own metric)", "per model", "load/reconciles/per_model", ""),
        ("burst: API requests per model (all verbs)", "per model", "load/api/burst/total_per_model", ""),
        ("burst: reads beyond the watches per model (GET + LIST)", "per model",
         "load/api/burst/reads_beyond_watches_per_model", "<= 3"),
        ("one at a time: reads beyond the watches per model", "per model",
         "load/api/latency/reads_beyond_watches_per_model", ""),
        (f"{idle}: LIST requests", "count", "load/api/idle/lists", ""),
        (f"{idle}: per-model LISTs", "count", "load/api/idle/per_model_lists", "0"),
        (f"{idle}: reads per model", "per model", "load/api/idle/reads_beyond_watches_per_model", ""),
        (f"create/delete cycles: RSS first sample ({cycles_n} cycles)", "MB", "cycles/rss_first_mb", ""),
        ("create/delete cycles: RSS last sample", "MB", "cycles/rss_last_mb", ""),
        ("create/delete cycles: RSS max sample", "MB", "cycles/rss_max_mb", ""),
        ("create/delete cycles: RSS slope", "MB/1k", "cycles/slope_mb_per_1000", "~0 (flat)"),
        ("create/delete cycles: rate", "cycles/s", "cycles/cycles_per_s", ""),
        ("create/delete cycles: models timed out (120 s a batch)", "count", "cycles/not_ready", "0"),
        ("create/delete cycles: reads beyond the watches per cycle", "per model",
         "cycles/api/reads_beyond_watches_per_model", ""),
    ]  # fmt: skip
    out = []
    for measure, unit, path, goal in rows:
        values = [_get(r, path) for r in results]
        if any(v is not None for v in values):
            out.append((measure, unit, values, goal))
    return out


def verb_rows(results: list[Mapping[str, Any]], phase: str) -> list[tuple[str, list[Any]]]:
    """Requests per model by verb and resource in one phase, one value per side."""
    keys: set[str] = set()
    for r in results:
        keys |= set((_get(r, f"{phase}/requests") or {}).keys())

    def order(key: str) -> tuple[int, str]:
        verb = key.rsplit(" ", 1)[0]
        return (VERB_ORDER.index(verb) if verb in VERB_ORDER else len(VERB_ORDER), key)

    rows = []
    for key in sorted(keys, key=order):
        values: list[Any] = []
        for r in results:
            phase_result = _get(r, phase)
            if phase_result is None:
                values.append(None)
                continue
            values.append(phase_result["requests"].get(key, 0) / max(1, phase_result["models"]))
        rows.append((key, values))
    return rows


def _ratio(values: list[Any]) -> str:
    if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
        return ""
    base, cur = values
    if not base or math.isnan(base) or math.isnan(cur):
        return ""
    return f"{cur / base:.2f}"


def _met(goal: str, unit: str, value: Any) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return ""
    if goal.startswith("< ") or goal.startswith("<= "):
        limit = float(goal.split()[1].replace(",", ""))
        ok = value < limit if goal.startswith("< ") else value <= limit
        return "yes" if ok else "**no**"
    if goal == "0":
        return "yes" if value == 0 else "**no**"
    return ""


def markdown(results: list[Mapping[str, Any]], labels: list[str]) -> str:
    """The side-by-side tables (one column per side; the ratio is the last side over the first)."""
    two = len(results) == 2
    head = ["Measure", *labels, *(["ratio"] if two else []), "Goal", "Met (last)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for measure, unit, values, goal in summary_rows(results):
        cells = [measure, *(_fmt(v, unit) for v in values), *([_ratio(values)] if two else []), goal,
                 _met(goal, unit, values[-1])]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    for phase, title in (("load/api/burst", "burst"), ("load/api/idle", "idle window")):
        rows = verb_rows(results, phase)
        if not rows:
            continue
        models = [_get(r, f"{phase}/models") for r in results]
        lines += ["", f"Requests per model by verb and resource, {title} ({models[-1]} models):", "",
                  "| Request | " + " | ".join(labels) + (" | ratio |" if two else " |"),
                  "|---|" + "---|" * (len(labels) + (1 if two else 0))]  # fmt: skip
        for key, values in rows:
            cells = [key, *(_fmt(v, "per model") for v in values), *([_ratio(values)] if two else [])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact(samples: Iterable[tuple[int, float]]) -> list[list[float]]:
    return [[x, round(y, 1)] for x, y in samples]
