"""Byte sizes: one parser and one formatter for every command, the planner and the operator.

Accepts what people and Kubernetes write: ``80GiB``, ``80Gi``, ``500MB``, ``500M``, ``1.5T`` or a plain number
of bytes. A trailing ``i`` means powers of 1024, none means powers of 1000.
"""

from __future__ import annotations

import re
from fractions import Fraction

# The binary marker ``i`` only after a prefix (``Gi``, ``GiB``): ``5i`` and ``1iB`` are typos, not sizes.
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kKmMgGtTpP])(i?))?[bB]?\s*")
_PREFIXES = " KMGTP"


def parse_size(text: str | int) -> int:
    """Bytes from a size; ValueError that shows the accepted forms otherwise.

    The result must be a whole number of bytes: ``1.5Gi`` is, ``0.5`` (half a byte) is not.
    """
    if isinstance(text, int):
        return text
    forms = "use e.g. 80GiB, 80Gi, 500MB or a whole number of bytes"
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r} ({forms})")
    base = 1024 if m.group(3) else 1000
    exact = Fraction(m.group(1)) * base ** _PREFIXES.index((m.group(2) or " ").upper())
    if exact.denominator != 1:
        raise ValueError(f"not a whole number of bytes: {text!r} ({forms})")
    return int(exact)


def human_bytes(n: float | None) -> str:
    """``1.5 GiB``-style text for logs, status messages and tables."""
    size = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
