"""Validate a VLLMModel the way the API server would, without one: shape, defaults, schema, CEL rules.

``vllm-operator render`` refuses with this what ``kubectl apply`` would refuse, and the tests judge the
CRD's rules with the same code, so the two cannot disagree. The live operator does not call it: the
API server has already validated every object it reads.

What stands in for what:
- Decoding (kubectl turns YAML into JSON): only JSON values, string keys, finite numbers and at most
  ``MAX_DEPTH`` levels of nesting are accepted; anything else is refused before the schema is looked at.
- The route (``apiVersion`` and ``kind``) and ObjectMeta: the served version only; ``metadata.name``
  required; name, namespace, labels and annotations of the types Kubernetes gives them.
- Defaulting: ``crd.default_value`` (the operator's own, from the same schema).
- OpenAPI schema validation: ``jsonschema``'s Draft 4 validator (Kubernetes' OpenAPI v3.0 schemas use
  Draft 4's boolean ``exclusiveMinimum``); ``x-kubernetes-int-or-string`` and unknown fields (kubectl's
  default strict field validation) are checked by the walk below, which jsonschema does not know.
- CEL (``x-kubernetes-validations``): ``cel-python`` (its ``matches`` is RE2, as in Kubernetes). Values
  are typed from the schema as Kubernetes types them (``number`` is a double even when written as
  ``1``; int-or-string is int or string). Like the API server, CEL rules are skipped when the schema
  already found a type error ("blocking" errors), and a rule's error is reported at its ``fieldPath``.
- Rules use only the portable subset (has, size, in, matches, startsWith, endsWith, contains, exists,
  all, type); no shim for Kubernetes' CEL libraries is needed.

``jsonschema`` and ``cel-python`` are imported on first use: ``vllm-operator run`` never needs them.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import crd

if TYPE_CHECKING:
    import celpy

# A VLLMModel's deepest legitimate field (affinity ... matchExpressions[].values[]) is about 10 levels.
MAX_DEPTH = 64
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class FieldError:
    """One refusal: the field's path (``spec.extraArgs[0]``) and a message that says what to write instead."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidSpec(ValueError):
    """A VLLMModel the API server would refuse. ``field`` and ``message`` are the first error's."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        if not errors:
            raise ValueError("InvalidSpec needs at least one error")
        self.errors = tuple(errors)
        self.field = self.errors[0].field
        self.message = self.errors[0].message
        super().__init__("; ".join(str(e) for e in self.errors))


def validate(obj: Any) -> None:
    """Raise :class:`InvalidSpec` naming every bad field when the API server would refuse ``obj``."""
    errors = problems(obj)
    if errors:
        raise InvalidSpec(errors)


def problems(obj: Any) -> list[FieldError]:
    """Every reason the API server would refuse ``obj`` (a VLLMModel as parsed from YAML or JSON); [] if none.

    Does not modify ``obj``.
    """
    shape = _shape_errors(obj)
    if shape:
        return shape
    assert isinstance(obj, dict)  # _shape_errors refuses anything else
    route = _route_errors(obj)
    if route:
        return route
    schema = crd.version_schema()
    defaulted = crd.default_value(copy.deepcopy(obj), schema)
    metadata_errors = _metadata_errors(defaulted.get("metadata"))
    schema_errors = list(_validator().iter_errors(defaulted))
    walk_errors, blocking = _walk_structure(defaulted, schema, "")
    errors = metadata_errors + [FieldError(_path(e.absolute_path), e.message) for e in schema_errors] + walk_errors
    # As on the API server, a value of the wrong type keeps the CEL rules from running.
    blocking = blocking or bool(metadata_errors) or any(e.validator == "type" for e in schema_errors)
    if not blocking:
        errors += _cel_errors(defaulted, schema, "")
    return errors


def all_rules() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (schema path, rule) in the CRD."""
    yield from _rules_in(crd.version_schema(), "")


def compile_rule(rule: str) -> celpy.Runner:
    """A CEL rule compiled by cel-python (raises on a syntax error); cached."""
    return _compile(rule)


# --- shape, route and metadata ----------------------------------------------------------------------


def _shape_errors(obj: Any) -> list[FieldError]:
    """Only what JSON can carry, at most MAX_DEPTH deep (iterative: a deep input cannot exhaust the stack)."""
    if not isinstance(obj, dict):
        return [FieldError("<root>", f"a VLLMModel is a mapping (apiVersion, kind, metadata, spec), not {_kind(obj)}")]
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        where = path or "<root>"
        if depth > MAX_DEPTH:
            return [FieldError(where, f"is nested more than {MAX_DEPTH} levels deep; no VLLMModel field is")]
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return [FieldError(where, f"has the key {key!r} ({_kind(key)}); keys are strings: quote it")]
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            return [FieldError(where, f"{value} is not a number JSON can carry; write a finite number")]
        elif not (value is None or isinstance(value, str | int | float | bool)):
            return [FieldError(where, f"is {_kind(value)}, which JSON cannot carry; write it as a quoted string")]
    return []


def _kind(value: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}
    return names.get(type(value), "null" if value is None else f"a YAML {type(value).__name__}")


def _route_errors(obj: dict[str, Any]) -> list[FieldError]:
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    errors = []
    if api_version != crd.API_VERSION:
        errors.append(FieldError("apiVersion", f"is {api_version!r}; the VLLMModel CRD serves {crd.API_VERSION!r}: write that"))
    if kind != crd.KIND:
        errors.append(FieldError("kind", f"is {kind!r}; write {crd.KIND!r} (the group {crd.GROUP} has no other kind)"))
    return errors


def _metadata_errors(metadata: Any) -> list[FieldError]:
    """The parts of ObjectMeta's validation that render and the operator read."""
    if metadata is None:
        return [FieldError("metadata.name", "is required: give the VLLMModel a name, e.g. 'qwen-chat'")]
    if not isinstance(metadata, dict):
        return []  # the schema reports the type
    errors = []
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        errors.append(FieldError("metadata.name", "is required and is a string: give the VLLMModel a name, e.g. 'qwen-chat'"))
    namespace = metadata.get("namespace")
    if namespace is not None and not (isinstance(namespace, str) and _DNS_LABEL_RE.match(namespace)):
        errors.append(FieldError("metadata.namespace", "must be a namespace's name (a lower-case DNS label), e.g. 'llm'"))
    for field in ("labels", "annotations"):
        value = metadata.get(field)
        if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            errors.append(FieldError(f"metadata.{field}", "must map names to strings: quote numbers and booleans"))
    for field, kind in (("uid", str), ("generation", int)):
        if field in metadata and not isinstance(metadata[field], kind):
            errors.append(FieldError(f"metadata.{field}", f"must be {_kind(kind())}"))
    return errors


# --- schema walk -----------------------------------------------------------------------------------


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft4Validator(crd.version_schema())


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _walk_structure(value: Any, schema: dict[str, Any], path: str) -> tuple[list[FieldError], bool]:
    """Int-or-string types and unknown fields (strict field validation). Returns (errors, blocking)."""
    errors: list[FieldError] = []
    blocking = False
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [FieldError(path, "must be an integer or a string")], True
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
                sub, sub_blocking = [FieldError(sub_path, f'unknown field "{key}" (check its spelling)')], False
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
    import celpy

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


def _cel_errors(value: Any, schema: dict[str, Any], path: str) -> list[FieldError]:
    from celpy import celtypes
    from celpy.evaluation import CELEvalError

    errors: list[FieldError] = []
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        self_value = value
        if path == "":
            # At the root, rules see metadata.name and metadata.generateName only (as on the API server).
            meta = value.get("metadata") or {}
            self_value = {**value, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
        activation = {"self": _typed(self_value, schema)}
        for rule in rules:
            where = path + rule["fieldPath"] if rule.get("fieldPath") else (path or "<root>")
            message = rule.get("message", "failed rule: " + rule["rule"])
            try:
                result = _compile(rule["rule"]).evaluate(activation)
            except CELEvalError as exc:  # an evaluation error fails the rule, as in Kubernetes
                errors.append(FieldError(where, f"{message} (evaluation error: {exc.args[0]})"))
                continue
            if not (isinstance(result, celtypes.BoolType) and bool(result)):
                errors.append(FieldError(where, message))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) if key in props else (additional if isinstance(additional, dict) else None)
            if sub is not None:
                errors += _cel_errors(item, sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += _cel_errors(item, schema["items"], f"{path}[{index}]")
    return errors


def _typed(value: Any, schema: dict[str, Any] | None) -> Any:
    """A JSON value as a CEL value of the type the schema gives it."""
    from celpy import celtypes
    from celpy.adapter import json_to_cel

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
    return json_to_cel(value)
