"""Reading YAML manifests from a user safely: bounded in size, time and memory, decoded as kubectl would.

``vllm-operator render`` reads files a user hands it, possibly written by someone else. What kubectl
and the API server would refuse is refused here, before any object is built:
- a file over ``MAX_INPUT_BYTES`` (checked before it is read, so a 50 MB file costs nothing);
- text that is not UTF-8;
- YAML aliases (``*name``): they can multiply a small file into a huge object ("billion laughs"), and
  an output must never carry them;
- nesting deeper than ``validation.MAX_DEPTH`` and duplicate keys (kubectl's strict decoding refuses
  both; a second ``model:`` under the first is easy to miss in a review);
- keys that are not plain scalars.
Timestamps stay strings, as kubectl's YAML-to-JSON conversion leaves them.

The checks walk libyaml's event stream (a state machine: no recursion however deep the input), then
the document is loaded with the C loader, so a file at the size limit loads in about a second.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from .validation import MAX_DEPTH

# The API server refuses an object over 1.5 MiB (etcd's request limit); a file of VLLMModels is far smaller.
MAX_INPUT_BYTES = 2 * 1024 * 1024

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_TOO_DEEP = f"is nested more than {MAX_DEPTH} levels deep; no VLLMModel field is"
# libyaml (0.2.5) refuses flow collections nested about 1,000 deep while scanning ahead for a key, before
# it emits the events the depth check reads: the same refusal, said the same way.
_LIBYAML_TOO_DEEP = "exceeded maximum nesting depth"


class InputRefused(ValueError):
    """A manifest refused before it is parsed into objects; the message names the place and the fix."""

    def __init__(self, source: str, message: str, *, line: int | None = None) -> None:
        self.source = source
        self.line = line
        self.message = message
        super().__init__(f"{source}{f', line {line}' if line else ''}: {message}")


class _Loader(_BaseLoader):  # type: ignore[misc]
    """The safe loader, with timestamps read as strings (as kubectl does)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_text(path: str, stdin: TextIO | None = None) -> str:
    """The text of ``path`` ('-' is stdin), refused when over ``MAX_INPUT_BYTES`` or not UTF-8."""
    too_big = f"is larger than {MAX_INPUT_BYTES // 1024 // 1024} MiB; split it into smaller files"
    if path == "-":
        text = (stdin or sys.stdin).read(MAX_INPUT_BYTES + 1)  # never more than the limit, whatever comes
        if len(text) > MAX_INPUT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
            raise InputRefused("<stdin>", too_big)
        return text
    if Path(path).stat().st_size > MAX_INPUT_BYTES:
        raise InputRefused(path, too_big)
    data = Path(path).read_bytes()[: MAX_INPUT_BYTES + 1]  # a file that grew since stat() is cut, then refused
    if len(data) > MAX_INPUT_BYTES:
        raise InputRefused(path, too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRefused(path, f"is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


def load_documents(text: str, source: str) -> Iterator[Any]:
    """Every non-empty YAML document in ``text``, after the checks in the module docstring."""
    try:
        _check_events(yaml.parse(text, Loader=_Loader), source)
        for document in yaml.load_all(text, Loader=_Loader):
            if document is not None:
                yield document
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        if problem == _LIBYAML_TOO_DEEP:  # libyaml's scanner looks ahead past MAX_DEPTH in flow style
            raise InputRefused(source, _TOO_DEEP, line=line) from exc
        raise InputRefused(source, f"not valid YAML: {problem}", line=line) from exc
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        if isinstance(exc, InputRefused):
            raise
        raise InputRefused(source, f"not valid YAML: {exc}") from exc


@dataclass
class _Open:
    """A mapping or sequence being read: for a mapping, whether a key comes next and the keys seen."""

    mapping: bool
    expect_key: bool = True
    keys: set[str] = field(default_factory=set)


def _check_events(events: Iterator[yaml.Event], source: str) -> None:
    stack: list[_Open] = []
    for event in events:
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent):
            raise InputRefused(
                source, f"uses the YAML alias *{event.anchor}; write the value out in full (aliases are refused)", line=line
            )
        if isinstance(event, yaml.ScalarEvent | yaml.MappingStartEvent | yaml.SequenceStartEvent):
            parent = stack[-1] if stack else None
            if parent is not None and parent.mapping:
                if parent.expect_key:
                    if not isinstance(event, yaml.ScalarEvent):
                        raise InputRefused(source, "has a mapping or list as a key; keys are strings", line=line)
                    if event.value in parent.keys:
                        raise InputRefused(source, f"has the key {event.value!r} twice in one mapping; keep one", line=line)
                    parent.keys.add(event.value)
                parent.expect_key = not parent.expect_key
            if not isinstance(event, yaml.ScalarEvent):
                stack.append(_Open(mapping=isinstance(event, yaml.MappingStartEvent)))
                if len(stack) > MAX_DEPTH:
                    raise InputRefused(source, _TOO_DEEP, line=line)
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            stack.pop()
