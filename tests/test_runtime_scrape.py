"""The runtime's scrape stays cheap under load: vLLM's process-tree memory read from the tree alone.

bench/autoscaling_bench.py measured psutil's ``children(recursive=True)`` (which reads every process of the
machine) as most of a scrape's cost; ``process_tree_rss`` now walks /proc's ``children`` files instead. Same
numbers as psutil's, for a tree of three generations.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vllm_runtime import metrics

GRANDCHILD = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux /proc")
def test_tree_rss_from_proc_equals_psutils() -> None:
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}]); time.sleep(60)"])  # noqa: E501
    try:
        root = psutil.Process(parent.pid)
        deadline = time.monotonic() + 30
        while len(root.children(recursive=True)) < 2:  # child and grandchild started
            assert time.monotonic() < deadline, "the process tree did not start"
            time.sleep(0.05)
        procs = [root, *root.children(recursive=True)]
        assert len(procs) == 3
        from_psutil = sum(p.memory_info().rss for p in procs)
        from_proc = metrics._proc_tree_rss(parent.pid)
        assert from_proc is not None
        assert abs(from_proc - from_psutil) <= 3 * 256 * 1024  # the same pages, read a moment apart
        assert from_proc > sum(p.memory_info().rss for p in procs[:2])  # the grandchild is counted
        assert metrics.process_tree_rss(parent.pid) == pytest.approx(from_proc, abs=3 * 256 * 1024)
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()
    assert metrics._proc_tree_rss(parent.pid) is None  # gone
    assert metrics.process_tree_rss(parent.pid) is None
