"""The package layout keeps the standard library's ``operator`` module importable."""

import subprocess
import sys


def test_stdlib_operator_module_is_not_shadowed() -> None:
    # A fresh interpreter with the project installed: `operator` must be the standard library's.
    code = "import operator, collections, vllm_operator, vllm_runtime; print(operator.__file__); operator.itemgetter(0)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "vllm_operator" not in out and out.strip().endswith("operator.py")
    assert "site-packages" not in out and "/operator/" not in out
