"""Filling a cache from siblings: the file list, sizes and sha256 (and the token) from the Hub, the bytes from a
sibling; ``serve --sibling-port`` seeding and reporting. In-process caches against in-process servers.

The server's own rules: tests/test_siblings_server.py; real processes and faults: tests/test_siblings_loopback.py;
real vLLM: tests/test_siblings_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from cache_helpers import cache_in_process
from hub_fixtures import TINY_REPO
from test_siblings_server import manifest_of, seeded, sibling  # noqa: F401 - fixtures

from vllm_runtime.cache import read_manifest
from vllm_runtime.cache.siblings import SiblingURLError, sibling_urls
from vllm_runtime.devhub.server import DevHub
from vllm_runtime.sibling_server import SiblingServer


def test_sibling_urls() -> None:
    assert sibling_urls(["http://a:8090/", "b:8090"], "http://c:8090, http://a:8090") == [
        "http://a:8090", "http://b:8090", "http://c:8090",
    ]
    for bad in ("ftp://a", "http://user:pw@a:8090", "http://a:8090/?token=x", "http://a:notaport"):
        with pytest.raises(SiblingURLError):
            sibling_urls([bad], None)


def test_fill_from_a_sibling_takes_only_metadata_from_the_hub(
    sibling: SiblingServer, seeded: tuple[Path, str], devhub: DevHub, tmp_path: Path,
) -> None:
    cache, commit = seeded
    devhub.clear_log()
    result = cache_in_process(tmp_path / "new", TINY_REPO, siblings=[sibling.url])
    assert result.ok and result.verified, result
    assert result.extra["siblingBytes"] == result.bytes and result.extra["hubBytes"] == 0
    assert result.extra["siblingFiles"] == result.files and result.extra["siblingFallbacks"] == 0
    assert devhub.content_gets() == []
    assert [r.path for r in devhub.repo_requests()] == [
        f"/api/models/{TINY_REPO}/revision/main", f"/api/models/{TINY_REPO}/tree/{commit}",
    ]
    new = read_manifest(tmp_path / "new", TINY_REPO, commit)
    assert new is not None and new["sources"]["siblingBytes"] == result.bytes
    assert {f["path"]: f["sha256"] for f in new["files"]} == {p: f["sha256"] for p, f in manifest_of(cache, commit).items()}
    # warm: no sibling, no Hub file request, no bytes
    again = cache_in_process(tmp_path / "new", TINY_REPO, siblings=["http://127.0.0.1:9"])
    assert again.ok and again.extra["reused"] and again.extra["siblingBytes"] == 0


def test_gated_model_the_token_goes_to_the_hub_only(tmp_path: Path, tiny_model_dir: Path,
                                                    hub_environ: dict[str, str], devhub: DevHub) -> None:
    """A second loopback Hub with the same files plays the sibling: it records whether a token came."""
    commit = devhub.add_repo(TINY_REPO, tiny_model_dir, gated=True, token="hf_gated_secret")
    with DevHub() as recording_sibling:
        assert recording_sibling.add_repo(TINY_REPO, tiny_model_dir) == commit  # same files, same commit id
        result = cache_in_process(tmp_path / "new", TINY_REPO, token="hf_gated_secret",
                                  siblings=[recording_sibling.url])
        assert result.ok and result.extra["siblingBytes"] == result.bytes, result
        sibling_requests = recording_sibling.repo_requests()
    assert sibling_requests and all(r.path.startswith(f"/{TINY_REPO}/resolve/{commit}/") for r in sibling_requests)
    assert not any(r.authorized for r in sibling_requests)
    hub_requests = devhub.repo_requests()
    assert hub_requests and all(r.authorized for r in hub_requests) and devhub.content_gets() == []
    assert "hf_gated_secret" not in result.to_json()


def test_local_model_ignores_siblings(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = cache_in_process(tmp_path / "cache", str(tiny_model_dir), siblings=["http://127.0.0.1:9"])
    assert result.ok and result.extra["source"] == "local"


def test_serve_with_sibling_port_seeds_and_reports(seeded: tuple[Path, str], tmp_path: Path, devhub: DevHub) -> None:
    """``vllm-runtime serve --sibling-port`` (with the stand-in vLLM) serves the cache to a new replica; the pod's
    metrics show what it served and how its own cache was filled."""
    from test_serve_drain import FakeVllmServe

    from vllm_runtime.demo import free_port, scrape
    from vllm_runtime.metrics import first_value

    cache, commit = seeded
    port = free_port()
    server = FakeVllmServe(model=TINY_REPO, revision=commit, cache_dir=cache, log_path=tmp_path / "serve.log",
                           vllm_args=(), serve_flags=("--sibling-port", str(port), "--sibling-host", "127.0.0.1"))
    server.start()
    try:
        server.wait_ready(timeout=60)
        devhub.clear_log()
        result = cache_in_process(tmp_path / "new", TINY_REPO, siblings=[f"http://127.0.0.1:{port}"])
        assert result.ok and result.extra["siblingBytes"] == result.bytes and devhub.content_gets() == [], result
        _, samples = scrape(server.metrics)
        assert first_value(samples, "vllm_runtime_sibling_served_bytes_total") == result.bytes
        assert first_value(samples, "vllm_runtime_cache_source_bytes", source="hub") == result.bytes
        assert first_value(samples, "vllm_runtime_cache_source_bytes", source="sibling") == 0
    finally:
        server.stop()


def test_a_sibling_without_the_commit_is_asked_once(tiny_repo: tuple[str, str], hub_environ: dict[str, str],
                                                   tmp_path: Path) -> None:
    """A peer that has not cached the commit (yet) answers RevisionNotFound: it is not asked again in this run."""
    (tmp_path / "empty").mkdir()
    empty = SiblingServer(tmp_path / "empty", host="127.0.0.1", port=0).start()
    try:
        result = cache_in_process(tmp_path / "new", TINY_REPO, siblings=[empty.url])
    finally:
        empty.stop()
    assert result.ok and result.extra["hubBytes"] == result.bytes and result.extra["siblingBytes"] == 0, result
    # the files asked for at once before the first answer came, and none after it (the weights come later)
    asked = empty.metrics.requests.labels(code="404")._value.get()
    assert 1 <= result.extra["siblingFallbacks"] == asked < result.files
    assert "commit not cached there" in result.extra["siblingErrors"][0]


def test_metrics_answer_while_a_sibling_transfer_runs(seeded: tuple[Path, str], tmp_path: Path) -> None:
    """A transfer in progress (slowed with --sibling-rate-limit) holds neither serve's metrics port nor vLLM's API."""
    import threading
    import time
    import urllib.request

    from test_serve_drain import FakeVllmServe

    from vllm_runtime.layout import CacheLayout

    from vllm_runtime.demo import free_port, http_status, scrape
    from vllm_runtime.metrics import first_value

    cache, commit = seeded
    port = free_port()
    server = FakeVllmServe(model=TINY_REPO, revision=commit, cache_dir=cache, log_path=tmp_path / "serve.log",
                           vllm_args=(), serve_flags=("--sibling-port", str(port), "--sibling-host", "127.0.0.1",
                                                      "--sibling-rate-limit", "100000"))
    server.start()
    try:
        server.wait_ready(timeout=60)
        url = f"http://127.0.0.1:{port}/{TINY_REPO}/resolve/{commit}/model.safetensors"
        received: list[int] = []

        def download() -> None:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - loopback
                received.append(len(response.read()))

        transfer = threading.Thread(target=download, daemon=True)
        transfer.start()
        deadline = time.monotonic() + 30
        while True:
            began = time.monotonic()
            _, samples = scrape(server.metrics)
            assert time.monotonic() - began < 5
            if first_value(samples, "vllm_runtime_sibling_active_transfers") == 1:
                break
            assert time.monotonic() < deadline, "the transfer never showed as active"
        for _ in range(3):  # while it runs (about 7 s at 100 kB/s)
            began = time.monotonic()
            assert http_status(server.metrics + "/ready") == 200 and http_status(server.api + "/v1/models") == 200
            assert time.monotonic() - began < 5
        _, samples = scrape(server.metrics)
        assert first_value(samples, "vllm_runtime_sibling_active_transfers") == 1  # still running meanwhile
        transfer.join(timeout=60)
        size = (CacheLayout(cache).snapshot_dir(TINY_REPO, commit) / "model.safetensors").stat().st_size
        assert received == [size]
    finally:
        server.stop()
