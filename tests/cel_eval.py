"""The tests' name for the product's validation (``vllm_operator.validation``), as "<field>: <message>" strings.

``render`` refuses bad input with the same code, so what these tests accept is what ``render`` accepts.
"""

from __future__ import annotations

from typing import Any

from vllm_operator.validation import all_rules, compile_rule, problems

__all__ = ["all_rules", "compile_rule", "validate"]


def validate(obj: Any) -> list[str]:
    """All validation errors of a VLLMModel object after defaulting ("<field path>: <message>"); [] if valid."""
    return [str(error) for error in problems(obj)]
