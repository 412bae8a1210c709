"""Which metrics the chart's alert rules and Grafana dashboards name, and which ones a scrape really exports.

``chart_metric_names()`` renders the chart with everything on and returns every metric name used by a PromQL
expression in a PrometheusRule or a dashboard (panels and template variables). ``exported_names(text)`` lists the
sample names a Prometheus text exposition offers, including those of metric families that have no sample yet
(a labelled metric nobody has touched still prints its ``# TYPE`` line). The end-to-end test compares the two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from chart_render import VALUE_SETS, render_objects

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = frozenset(
    "and or unless by without on ignoring group_left group_right offset bool inf nan start end".split()
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*?)(?:,\s*\w+\s*)?\)\s*$", re.S)
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def metric_names(expr: str) -> set[str]:
    """Metric names in one PromQL expression (or a Grafana ``label_values(...)`` query)."""
    expr = _GRAFANA_VARIABLE.sub("1", _STRING.sub('""', expr))
    match = _LABEL_VALUES.match(expr)
    if match:  # label_values(metric{...}, label) names a metric; label_values(label) names none
        expr = match.group(1) if "," in match.group(0) else ""
    expr = _MATCHERS.sub("", expr)
    expr = _RANGE.sub("", expr)
    expr = _GROUPING.sub("", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name not in _KEYWORDS}


def _walk_dashboard(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if node.get("type") == "datasource":  # a data-source picker: its query is a plugin type, not PromQL
            return
        for key in ("expr", "query", "definition"):
            value = node.get(key)
            if isinstance(value, str) and value:
                yield value
            elif isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
        for value in node.values():
            yield from _walk_dashboard(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_dashboard(value)


def chart_expressions(objects: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, PromQL) for every alert/record expression and every dashboard query in the rendered objects."""
    found: list[tuple[str, str]] = []
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "PrometheusRule":
            for group in obj["spec"]["groups"]:
                for rule in group["rules"]:
                    found.append((f"{name}: {rule.get('alert') or rule.get('record')}", rule["expr"]))
        elif obj["kind"] == "ConfigMap" and obj["metadata"].get("labels", {}).get("grafana_dashboard"):
            for file_name, text in obj["data"].items():
                dashboard = json.loads(text)
                found.extend((f"{name}/{file_name}", expr) for expr in _walk_dashboard(dashboard))
    return found


def chart_metric_names(objects: Iterable[dict[str, Any]] | None = None) -> dict[str, set[str]]:
    """Metric name -> where the chart uses it (alerts and dashboards of the chart rendered with all of them on)."""
    if objects is None:
        objects = render_objects(VALUE_SETS["monitoring"])
    used: dict[str, set[str]] = {}
    for where, expr in chart_expressions(objects):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    return used


_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\w+)", re.M)
_SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", re.M)


def exported_names(exposition: str) -> set[str]:
    """Sample names a Prometheus text exposition offers, including families that have no sample yet."""
    names = set(_SAMPLE_LINE.findall(exposition))
    for family, kind in _TYPE_LINE.findall(exposition):
        names.add(family)
        if kind == "counter" and not family.endswith("_total"):
            names.add(family + "_total")
        if kind in ("histogram", "gaugehistogram"):
            names.update(family + suffix for suffix in _HISTOGRAM_SUFFIXES)
        if kind == "summary":
            names.update(family + suffix for suffix in ("_sum", "_count", "_created"))
    return names
