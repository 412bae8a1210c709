"""Validate a VLLMModel the way the API server would, without one: defaults, schema, CEL rules.

What stands in for what:
- Defaulting: ``vllm_operator.crd.default_value`` (the operator's own, from the same schema).
- OpenAPI schema validation: ``jsonschema``'s Draft 4 validator (Kubernetes' OpenAPI v3.0 schemas use
  Draft 4's boolean ``exclusiveMinimum``); ``x-kubernetes-int-or-string`` and unknown fields (kubectl's
  default strict field validation) are checked by the walk below, which jsonschema does not know.
- CEL (``x-kubernetes-validations``): ``cel-python``. Values are typed from the schema as Kubernetes
  types them (``number`` is a double even when written as ``1``; int-or-string is int or string).
  Like the API server, CEL rules are skipped when the schema already found a type error
  ("blocking" errors), and a rule's error is reported at its ``fieldPath`` when it has one.
- Rules use only the portable subset (has, size, in, matches, startsWith, contains, exists, all,
  type); no shim for Kubernetes' CEL libraries is needed.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
from celpy import celtypes

from vllm_operator import crd

Errors = list[str]


def validate(obj: dict[str, Any]) -> Errors:
    """All validation errors of a VLLMModel object after defaulting ("<field path>: <message>"); [] if valid."""
    schema = crd.version_schema()
    defaulted = crd.default_value(copy.deepcopy(obj), schema)
    errors = [f"{_path(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(defaulted)]
    type_errors = [e for e in _validator().iter_errors(defaulted) if e.validator == "type"]
    walk_errors, blocking = _walk_structure(defaulted, schema, "")
    errors += walk_errors
    if not type_errors and not blocking:
        errors += list(_cel_errors(defaulted, schema, ""))
    return errors


def all_rules() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (schema path, rule) in the CRD."""
    yield from _rules_in(crd.version_schema(), "")


def compile_rule(rule: str) -> celpy.Runner:
    return _compile(rule)


# --- schema walk -----------------------------------------------------------------------------------


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(crd.version_schema())


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _walk_structure(value: Any, schema: dict[str, Any], path: str) -> tuple[Errors, bool]:
    """Int-or-string types and unknown fields (strict field validation). Returns (errors, blocking)."""
    errors: Errors = []
    blocking = False
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: must be an integer or a string"], True
        return [], False
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
        return [], False
    if isinstance(value, dict):
        props = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub_path = f"{path}.{key}" if path else key
            if props is not None and key in props:
                sub, sub_blocking = _walk_structure(item, props[key], sub_path)
            elif isinstance(additional, dict):
                sub, sub_blocking = _walk_structure(item, additional, sub_path)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields") and path != "metadata":
                sub, sub_blocking = [f'{sub_path}: unknown field "{key}"'], False
            else:
                sub, sub_blocking = [], False
            errors += sub
            blocking = blocking or sub_blocking
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            sub, sub_blocking = _walk_structure(item, schema["items"], f"{path}[{index}]")
            errors += sub
            blocking = blocking or sub_blocking
    return errors, blocking


# --- CEL -------------------------------------------------------------------------------------------


@functools.cache
def _compile(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _rules_in(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule
    for name, sub in (schema.get("properties") or {}).items():
        yield from _rules_in(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from _rules_in(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _rules_in(schema["additionalProperties"], f"{path}[*]")


def _cel_errors(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        self_value = value
        if path == "":
            # At the root, rules see metadata.name and metadata.generateName only (as on the API server).
            meta = value.get("metadata") or {}
            self_value = {**value, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
        activation = {"self": _typed(self_value, schema)}
        for rule in rules:
            where = path + rule.get("fieldPath", "") if rule.get("fieldPath") else (path or "<root>")
            try:
                result = _compile(rule["rule"]).evaluate(activation)
            except celpy.CELEvalError as exc:  # an evaluation error fails the rule, as in Kubernetes
                yield f"{where}: {rule.get('message', rule['rule'])} (evaluation error: {exc.args[0]})"
                continue
            if not (isinstance(result, celtypes.BoolType) and bool(result)):
                yield f"{where}: {rule.get('message', 'failed rule: ' + rule['rule'])}"
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) if key in props else (additional if isinstance(additional, dict) else None)
            if sub is not None:
                yield from _cel_errors(item, sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _cel_errors(item, schema["items"], f"{path}[{index}]")


def _typed(value: Any, schema: dict[str, Any] | None) -> Any:
    """A JSON value as a CEL value of the type the schema gives it."""
    schema = schema or {}
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): _typed(v, props.get(k, additional if isinstance(additional, dict) else None))
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else None
        return celtypes.ListType([_typed(v, items) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number" and isinstance(value, int | float):
        return celtypes.DoubleType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    return celpy.json_to_cel(value)
