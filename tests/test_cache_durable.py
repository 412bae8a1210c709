"""Cached bytes reach the disk as they land (``cache/durable.py``), from the Hub and from a sibling.

That every file is flushed before the manifest is in ``test_cache.py``; here, that the writeback starts
while the download runs, stretch by stretch, on the file being written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cache_helpers import cache_in_process
from hub_fixtures import TINY_REPO
from test_siblings_server import seeded, sibling  # noqa: F401 - fixtures

from vllm_runtime.cache import durable
from vllm_runtime.layout import CacheLayout
from vllm_runtime.sibling_server import SiblingServer

Calls = list[tuple[str, int, int, int]]  # file (as named when asked), offset, length, flags


@pytest.fixture
def writeback_calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    calls: Calls = []

    def recording(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, flags))
        return 0

    monkeypatch.setattr(durable, "_sync_file_range", recording)
    monkeypatch.setattr(durable, "WRITEBACK_BYTES", 4096)  # the tiny model's weights are a few hundred KB
    return calls


def test_writeback_hands_each_landed_stretch_to_the_kernel_once(writeback_calls: Calls, tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        writeback = durable.Writeback(f.fileno(), every=100)
        for end in (50, 150, 200, 260, 300):
            writeback.landed(end)
    assert [(offset, length) for _, offset, length, _ in writeback_calls] == [(0, 150), (150, 110)]
    assert {flags for *_, flags in writeback_calls} == {durable.SYNC_FILE_RANGE_WRITE}


def test_a_refused_writeback_is_asked_again_from_the_same_offset(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:  # fmt: skip
    asked: list[tuple[int, int]] = []
    answers = iter([-1, 0])
    monkeypatch.setattr(durable, "_sync_file_range", lambda fd, off, n, flags: asked.append((off, n)) or next(answers))
    with open(tmp_path / "f", "wb") as f:
        writeback = durable.Writeback(f.fileno(), every=100)
        writeback.landed(120)
        writeback.landed(240)
    assert asked == [(0, 120), (0, 240)]


def test_start_writeback_reaches_the_kernel(tmp_path: Path) -> None:
    if durable._sync_file_range is None:
        pytest.skip("no sync_file_range in this C library")
    path = tmp_path / "f"
    path.write_bytes(b"x" * 65536)
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor is enough, as for fsync
    try:
        assert durable.start_writeback(fd, 0, 65536)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        durable.fsync_path(tmp_path / "missing")


def _covered(calls: Calls, name_part: str) -> int:
    """Bytes from offset 0 handed to the kernel, contiguous, for the file whose name holds ``name_part``."""
    end = 0
    for _, offset, length, _ in sorted(c for c in calls if name_part in c[0]):
        assert offset == end, f"a gap or an overlap at {offset} (expected {end})"
        end = offset + length
    return end


def _weights_blob(cache: Path, commit: str) -> tuple[str, int]:
    blob = (CacheLayout(cache).snapshot_dir(TINY_REPO, commit) / "model.safetensors").resolve()
    return blob.name, blob.stat().st_size


def test_a_fill_from_the_hub_starts_writeback_as_bytes_land(
    writeback_calls: Calls, tiny_repo: tuple[str, str], hub_environ: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    result = cache_in_process(tmp_path / "cache", TINY_REPO)
    assert result.ok, result
    name, size = _weights_blob(tmp_path / "cache", tiny_repo[1])
    assert size > 4 * 4096
    # the stream's reader asked for every stretch it hashed (all but a last one under 4096 bytes)
    assert size - 4096 < _covered(writeback_calls, name) <= size


def test_a_fill_from_a_sibling_starts_writeback_as_bytes_land(
    writeback_calls: Calls, sibling: SiblingServer, seeded: tuple[Path, str], tmp_path: Path,  # noqa: F811
) -> None:  # fmt: skip
    writeback_calls.clear()  # the seed's own fill
    result = cache_in_process(tmp_path / "new", TINY_REPO, siblings=[sibling.url])
    assert result.ok and result.extra["siblingBytes"] == result.bytes, result
    name, size = _weights_blob(tmp_path / "new", seeded[1])
    assert size - 4096 < _covered(writeback_calls, name) <= size
    assert all(".sibling-" in path for path, *_ in writeback_calls if name in path)
