"""LoRA adapters in the runtime, without vLLM: the loopback Hub's generated adapters, ``cache --adapters-file``
(pinned, verified, one manifest per adapter, the compact summary), the adapter checks, the converger against
a scripted adapter API (file changes, failures alone, backoff), ``ls``/``rm``/``gc`` and the leases.

The same paths against real vLLM are in ``test_adapters_e2e.py``.
"""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hub_fixtures import TINY_REPO
from safetensors.numpy import load_file

from vllm_runtime import cli, manage, summary
from vllm_runtime.adapters import caching, checks, errors
from vllm_runtime.adapters.converge import FAILED, LOADED, AdapterConverger
from vllm_runtime.adapters.desired import parse_adapters
from vllm_runtime.adapters.settings import lora_settings
from vllm_runtime.cache import read_manifest
from vllm_runtime.cache.usage import in_use_by
from vllm_runtime.devhub import tiny_adapter
from vllm_runtime.devhub.server import DevHub
from vllm_runtime.layout import CacheLayout
from vllm_runtime.planner.sources import load_model

ADAPTER_REPO = "test-org/tiny-lora"


# ---- the loopback Hub's adapters ------------------------------------------------------------------------


def test_generated_adapter_is_peft_lora_with_nonzero_b_for_attention(tmp_path: Path) -> None:
    out = tiny_adapter.generate(tmp_path / "a", rank=8, seed=3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    b = [t for n, t in tensors.items() if n.endswith("lora_B.weight")]
    assert len(b) == 2 * 4 and all(abs(t).sum() > 0 for t in b)  # 2 layers x 4 projections, B non-zero
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (8, 64)
    # Deterministic per seed, different across seeds.
    again = load_file(str(tiny_adapter.generate(tmp_path / "b", rank=8, seed=3) / "adapter_model.safetensors"))
    other = load_file(str(tiny_adapter.generate(tmp_path / "c", rank=8, seed=4) / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert (again[name] == tensors[name]).all() and not (other[name] == tensors[name]).all()


def test_devhub_serves_an_adapter_at_several_revisions(devhub: DevHub, tmp_path: Path, hub_environ: Any) -> None:
    from huggingface_hub import HfApi

    commits = tiny_adapter.publish(devhub, ADAPTER_REPO, tmp_path / "gen", seeds=(1, 2, 3))
    assert len(set(commits)) == 3
    api = HfApi(endpoint=devhub.url, token=False)
    assert api.repo_info(ADAPTER_REPO, revision="main").sha == commits[-1]
    for i, commit in enumerate(commits, start=1):
        assert api.repo_info(ADAPTER_REPO, revision=f"v{i}").sha == commit
    files = {f.path for f in api.list_repo_tree(ADAPTER_REPO, revision="v1")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files


# ---- cache --adapters-file ------------------------------------------------------------------------------


def _adapters_file(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"adapters": entries}))
    return path


def _cache(cache: Path, adapters_file: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    term = tmp_path / f"term-{len(list(tmp_path.glob('term-*')))}.json"
    code = cli.main(["cache", "--model", TINY_REPO, "--cache-dir", str(cache), "--termination-message-path",
                     str(term), "--retry-backoff", "0.01", "--retries", "1", "--adapters-file", str(adapters_file),
                     *extra])  # fmt: skip
    message = summary.parse_termination_message(term.read_text())
    assert message is not None
    return code, message


@pytest.fixture
def hub_with_adapters(devhub: DevHub, tiny_repo: tuple[str, str], tmp_path: Path, hub_environ: Any) -> dict[str, Any]:
    gen = tmp_path / "gen"
    return {
        "base": tiny_repo[1],
        "sql": tiny_adapter.publish(devhub, "test-org/sql-lora", gen, seeds=(1, 2)),
        "chat": tiny_adapter.publish(devhub, "test-org/chat-lora", gen, seeds=(5,), rank=16),
        "high": tiny_adapter.publish(devhub, "test-org/high-lora", gen, variant="rank-too-high"),
    }


def test_cache_adapters_after_the_base_each_pinned_verified_with_its_manifest(
    devhub: DevHub, hub_with_adapters: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    file = _adapters_file(tmp_path / "adapters.json", [
        {"name": "sql", "model": "test-org/sql-lora", "revision": "v1"},
        {"name": "chat", "model": "test-org/chat-lora"},
        {"name": "missing", "model": "test-org/no-such-lora", "revision": "main"},
        {"name": "local", "model": "pvc://loras/chat"},
    ])  # fmt: skip
    code, message = _cache(cache, file, tmp_path)
    assert code == summary.EXIT_OK and message["ok"] is True  # the base model's outcome
    assert message["commit"] == hub_with_adapters["base"]
    entries = summary.adapter_entries(message)
    assert [e["name"] for e in entries] == ["sql", "chat", "missing", "local"]
    sql, chat, missing, local = entries
    assert sql["commit"] == hub_with_adapters["sql"][0] and sql["revision"] == "v1" and sql["rank"] == 8
    assert chat["commit"] == hub_with_adapters["chat"][0] and chat["revision"] == "main" and chat["rank"] == 16
    assert missing["reason"] == "RepoNotFound" and missing["retryable"] is False and "commit" not in missing
    assert local == {"name": "local", "model": "pvc://loras/chat", "local": True}
    for entry, repo in ((sql, "test-org/sql-lora"), (chat, "test-org/chat-lora")):
        manifest = read_manifest(cache, repo, entry["commit"])
        assert manifest is not None and manifest["verified"] is True and manifest["bytes"] == entry["bytes"]
        assert {f["path"] for f in manifest["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
        snapshot = CacheLayout(cache).snapshot_dir(repo, entry["commit"])
        for f in manifest["files"]:
            import hashlib

            assert hashlib.sha256((snapshot / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert len(json.dumps(message)) <= summary.MAX_TERMINATION_MESSAGE_BYTES

    # Warm: the same file again reads no file contents from the Hub and opens no weight file on the volume.
    devhub.clear_log()
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def note(path: Any) -> None:
        if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).endswith(".safetensors"):
            opened.append(os.fsdecode(path))

    with monkeypatch.context() as patch:
        for module in (builtins, io):  # pathlib opens through io.open
            patch.setattr(module, "open", lambda f, *a, **k: (note(f), real_open(f, *a, **k))[1])
        patch.setattr(os, "open", lambda f, *a, **k: (note(f), real_os_open(f, *a, **k))[1])
        code, again = _cache(cache, file, tmp_path)
    assert code == summary.EXIT_OK
    assert [e.get("commit") for e in summary.adapter_entries(again)] == [e.get("commit") for e in entries]
    assert devhub.content_gets() == []
    assert opened == []


def test_base_failure_attempts_no_adapter(devhub: DevHub, hub_with_adapters: dict[str, Any], tmp_path: Path) -> None:
    file = _adapters_file(tmp_path / "a.json", [{"name": "sql", "model": "test-org/sql-lora"}])
    term = tmp_path / "term.json"
    code = cli.main(["cache", "--model", "test-org/nope", "--cache-dir", str(tmp_path / "c"),
                     "--termination-message-path", str(term), "--adapters-file", str(file)])  # fmt: skip
    message = summary.parse_termination_message(term.read_text())
    assert code == summary.EXIT_PERMANENT and message is not None and message["reason"] == "RepoNotFound"
    assert "adapters" not in message
    assert not any("sql-lora" in r.path for r in devhub.log_snapshot())


def test_adapter_repo_without_config_fails_alone(devhub: DevHub, tiny_repo: Any, tmp_path: Path,
                                                 hub_environ: Any, tiny_model_dir: Path) -> None:
    devhub.add_repo("test-org/not-an-adapter", tiny_model_dir)  # a model, not an adapter
    file = _adapters_file(tmp_path / "a.json", [{"name": "x", "model": "test-org/not-an-adapter"}])
    code, message = _cache(tmp_path / "cache", file, tmp_path)
    assert code == summary.EXIT_OK
    (entry,) = summary.adapter_entries(message)
    assert entry["reason"] == "AdapterFilesMissing" and "adapter_config.json" in entry["message"]


def test_bad_adapters_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "a.json"
    bad.write_text("{not json")
    code = cli.main(["cache", "--model", TINY_REPO, "--cache-dir", str(tmp_path / "c"), "--adapters-file", str(bad),
                     "--termination-message-path", str(tmp_path / "t")])  # fmt: skip
    assert code == summary.EXIT_USAGE and "--adapters-file" in capsys.readouterr().err


def test_cache_entries_take_revision_or_commit_and_refuse_bad_ones() -> None:
    entries = parse_adapters(
        {"adapters": [{"name": "a", "model": "o/a"}, {"name": "b", "model": "o/b", "commit": "a" * 40},
                      {"name": "c", "model": "o/c", "commit": "main"}, {"name": "a", "model": "o/d"}]},
        path="f", require_commit=False,
    )  # fmt: skip
    assert [e.problem is None for e in entries] == [True, True, False, False]
    assert "commit" in str(entries[2].problem) and "unique" in str(entries[3].problem)
    # serve needs the commit
    (served,) = parse_adapters({"adapters": [{"name": "a", "model": "o/a"}]}, path="f")
    assert served.problem is not None and "40-hex" in served.problem


def test_summary_with_many_adapters_stays_within_4096_bytes_and_keeps_outcomes() -> None:
    result = summary.Summary(ok=True, command="cache", model="org/" + "m" * 90, revision="main", commit="c" * 40,
                             bytes=1, files=1, verified=True, extra={"plan": {"fits": True, "reason": "x" * 300}})
    entries: list[dict[str, Any]] = []
    for i in range(80):
        if i % 2:
            entries.append({"name": f"adapter-{i:02d}-" + "n" * 40, "model": "org/" + "a" * 90, "revision": "main",
                            "reason": "HubUnavailable", "retryable": True, "message": "m" * 200})
        else:
            entries.append({"name": f"adapter-{i:02d}-" + "n" * 40, "model": "org/" + "a" * 90, "revision": "main",
                            "commit": "d" * 40, "bytes": 10**9, "rank": 16})
    result.extra["adapters"] = entries
    caching.fit_summary(result)
    line = result.to_json()
    assert len(line.encode()) <= summary.MAX_TERMINATION_MESSAGE_BYTES
    data = json.loads(line)
    kept = summary.adapter_entries(data)
    assert kept and "truncated" not in data  # the adapters were shortened, never dropped as a whole
    assert data["adaptersTruncated"] == 80 - len(kept)
    assert [e["name"] for e in kept] == [e["name"] for e in entries[: len(kept)]]  # file order, a prefix
    for e in kept:
        assert ("commit" in e and "bytes" in e) or ("reason" in e and "retryable" in e)
    # A few adapters fit whole.
    small = summary.Summary(ok=True, command="cache", model="o/m", revision="main",
                            extra={"adapters": [dict(entries[0]), dict(entries[1])]})  # fmt: skip
    caching.fit_summary(small)
    assert summary.adapter_entries(json.loads(small.to_json())) == entries[:2]


# ---- checks against the base model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_facts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    from vllm_runtime.devhub.tiny_model import generate

    facts = load_model(str(generate(tmp_path_factory.mktemp("base"))))
    return facts.config, dict(facts.tensors)


@pytest.mark.parametrize(
    ("variant", "reason", "words"),
    [
        ("good", None, None),
        ("rank-too-high", "AdapterRankTooHigh", "maxLoraRank to at least 64"),
        ("other-base", "AdapterBaseMismatch", "another base model"),
        ("unsupported-module", "AdapterUnsupportedModules", "input_layernorm"),
        ("no-weights", "AdapterFilesMissing", "adapter_model.safetensors"),
    ],
)
def test_each_broken_variant_has_its_reason_and_fix(
    tmp_path: Path, base_facts: tuple[dict[str, Any], dict[str, Any]], variant: str, reason: str | None,
    words: str | None,
) -> None:
    config, tensors = base_facts
    directory = tiny_adapter.generate(tmp_path / variant, variant=variant)
    try:
        facts = checks.read_adapter_facts(directory, "x")
        checks.check_adapter(facts, adapter="x", max_lora_rank=16, base_config=config, base_tensors=tensors)
    except errors.AdapterError as exc:
        assert exc.reason == reason and words is not None and words in exc.message, exc.message
        assert not exc.retryable
    else:
        assert reason is None


# vLLM 0.32 CPU's answers to POST /v1/load_lora_adapter, captured from a live server (tiny Llama, max rank 8).
CAPTURED_VLLM_REFUSALS = {
    "AdapterRankTooHigh": "Call to add_lora method failed: Worker failed with error 'LoRA rank 64 is greater than "
                          "max_lora_rank 8.', please check the stack trace above for the root cause",
    "AdapterBaseMismatch": "Call to add_lora method failed: Worker failed with error 'The size of tensor a (64) must "
                           "match the size of tensor b (128) at non-singleton dimension 1', please check the stack "
                           "trace above for the root cause",
    "AdapterUnsupportedModules": "Call to add_lora method failed: Worker failed with error 'While loading <path>, "
                                 "expected target modules in {'k_proj', 'up_proj', 'gate_proj', 'down_proj', "
                                 "'embed_tokens', 'v_proj', 'lm_head', 'o_proj', 'q_proj'} but received "
                                 "['model.layers.0.input_layernorm']. Please verify that the loaded LoRA module is "
                                 "correct', please check the stack trace above for the root cause",
}  # fmt: skip


@pytest.mark.parametrize("reason", sorted(CAPTURED_VLLM_REFUSALS))
def test_captured_vllm_refusals_are_classified(reason: str) -> None:
    body = json.dumps({"error": {"message": CAPTURED_VLLM_REFUSALS[reason], "type": "InternalServerError",
                                 "param": None, "code": 500}})  # fmt: skip
    error = errors.classify_vllm_error("x", 500, body)
    assert error.reason == reason and not error.retryable and "vLLM:" in error.message


def test_vllm_error_words_are_classified() -> None:
    body = json.dumps({"error": {"message": "LoRA rank 64 is greater than max_lora_rank 16."}})
    assert errors.classify_vllm_error("a", 400, body).reason == "AdapterRankTooHigh"
    assert errors.classify_vllm_error("a", 503, "busy").retryable is True
    unknown = errors.classify_vllm_error("a", 400, json.dumps({"error": {"message": "something new"}}))
    assert unknown.reason == "AdapterLoadFailed" and "something new" in unknown.message and not unknown.retryable


def test_lora_settings_defaults_from_ranks_and_refusals() -> None:
    entries = parse_adapters({"adapters": [{"name": "a", "model": "o/a", "commit": "a" * 40},
                                           {"name": "b", "model": "o/b", "commit": "b" * 40}]}, path="f")
    s = lora_settings(entries, [("a", 8), ("b", 20)])
    assert (s.max_loras, s.max_lora_rank, s.max_cpu_loras) == (2, 32, 2)
    assert lora_settings(entries, []).max_lora_rank == 16
    with pytest.raises(ValueError, match="max-lora-rank 12"):
        lora_settings(entries, [], max_lora_rank=12)
    with pytest.raises(ValueError, match="max-cpu-loras"):
        lora_settings(entries, [], max_loras=4, max_cpu_loras=2)


# ---- the converger against a scripted adapter API ----------------------------------------------------------


class ScriptedAPI:
    """vLLM's adapter endpoints as the converger sees them; ``fail`` maps a name to errors to raise once each."""

    def __init__(self) -> None:
        self.loaded: dict[str, Path] = {}
        self.calls: list[tuple[str, str, bool]] = []
        self.fail: dict[str, list[errors.AdapterError]] = {}

    def load(self, name: str, path: Path, *, in_place: bool) -> None:
        self.calls.append(("load", name, in_place))
        if self.fail.get(name):
            raise self.fail[name].pop(0)
        if name in self.loaded and not in_place:
            raise errors.AdapterLoadFailed(name, "already loaded")
        self.loaded[name] = path

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name, False))
        self.loaded.pop(name, None)


class Gauges:
    """The converger's metrics sink, keeping what /metrics would show for vllm_runtime_adapter_loaded."""

    def __init__(self) -> None:
        self.loaded: dict[str, bool] = {}
        self.failures: list[tuple[str, str]] = []

    def adapter_loaded(self, name: str, loaded: bool) -> None:
        self.loaded[name] = loaded

    def adapter_removed(self, name: str) -> None:
        self.loaded.pop(name, None)

    def adapter_load_seconds(self, name: str, seconds: float) -> None: ...
    def adapter_unload_seconds(self, name: str, seconds: float) -> None: ...

    def adapter_failure(self, name: str, reason: str) -> None:
        self.failures.append((name, reason))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cached_adapters(devhub: DevHub, hub_with_adapters: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Base + sql (v1, v2) + chat + high cached into one volume; the commits by name."""
    cache = tmp_path / "cache"
    file = _adapters_file(tmp_path / "cache-adapters.json", [
        {"name": "sql", "model": "test-org/sql-lora", "revision": "v1"},
        {"name": "sql2", "model": "test-org/sql-lora", "revision": "v2"},
        {"name": "chat", "model": "test-org/chat-lora"},
        {"name": "high", "model": "test-org/high-lora"},
    ])  # fmt: skip
    code, message = _cache(cache, file, tmp_path)
    assert code == 0
    return {"cache": cache, **{e["name"]: e["commit"] for e in summary.adapter_entries(message)}}


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the file the way a ConfigMap volume does: a new file, then an atomic rename over the old."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"adapters": entries}))
    os.replace(tmp, path)


def _converger(tmp_path: Path, cache: Path, base: tuple[dict[str, Any], dict[str, Any]],
               entries: list[dict[str, Any]]) -> tuple[AdapterConverger, ScriptedAPI, Clock]:
    """A converger on ``tmp_path/adapters.json`` (written with ``entries``), a scripted API and a fake clock."""
    api, clock = ScriptedAPI(), Clock()
    _write(tmp_path / "adapters.json", entries)
    conv = AdapterConverger(
        adapters_file=tmp_path / "adapters.json", api=api, cache_dir=cache, base_config=base[0],  # type: ignore[arg-type]
        base_tensors=base[1], max_lora_rank=16, served_names=("tiny",), clock=clock, metrics=Gauges(),
    )  # fmt: skip
    return conv, api, clock


def test_converger_follows_the_file_and_fails_each_adapter_alone(
    tmp_path: Path, cached_adapters: dict[str, Any], base_facts: Any
) -> None:
    c = cached_adapters
    conv, api, clock = _converger(tmp_path, c["cache"], base_facts, [
        {"name": "sql", "model": "test-org/sql-lora", "commit": c["sql"]},
        {"name": "chat", "model": "test-org/chat-lora", "commit": c["chat"]},
        {"name": "high", "model": "test-org/high-lora", "commit": c["high"]},
        {"name": "uncached", "model": "test-org/other-lora", "commit": "e" * 40},
        {"name": "tiny", "model": "test-org/x", "commit": "f" * 40},  # the base model's served name
    ])  # fmt: skip
    file = conv.adapters_file
    conv.step()
    status = {i["name"]: i for i in conv.status()["items"]}
    assert set(api.loaded) == {"sql", "chat"}
    assert status["sql"]["state"] == LOADED and status["sql"]["commit"] == c["sql"] and status["sql"]["rank"] == 8
    assert status["high"]["state"] == FAILED and status["high"]["reason"] == "AdapterRankTooHigh"
    assert status["uncached"]["reason"] == "AdapterNotCached" and status["uncached"]["retryable"] is True
    assert status["tiny"]["reason"] == "InvalidAdapter" and "served name" in status["tiny"]["message"]
    assert conv.status()["converged"] is False and conv.status()["loaded"] == 2
    gauges = conv.metrics
    assert isinstance(gauges, Gauges)
    assert gauges.loaded == {"sql": True, "chat": True, "high": False, "uncached": False, "tiny": False}
    assert ("high", "AdapterRankTooHigh") in gauges.failures
    # the commits loaded are leased: rm refuses them, gc keeps them
    assert in_use_by(c["cache"], "test-org/sql-lora", c["sql"])
    with pytest.raises(PermissionError):
        manage.remove(c["cache"], "test-org/sql-lora", c["sql"])

    # A permanent failure is not retried until its entry changes; a retryable one backs off.
    calls = len(api.calls)
    conv.step()
    assert len(api.calls) == calls  # "high" permanent; "uncached" waits for its backoff (1 s)
    clock.now += 1.5
    conv.step()
    assert status["uncached"]["attempts"] == 1 and conv.status()["items"][3]["attempts"] == 2

    # Change: sql to v2 (in place), chat removed, high gone; no other call.
    _write(file, [{"name": "sql", "model": "test-org/sql-lora", "commit": c["sql2"]}])
    api.calls.clear()
    conv.step()
    assert ("unload", "chat", False) in api.calls and ("load", "sql", True) in api.calls
    assert set(api.loaded) == {"sql"} and conv.status()["converged"] is True
    assert gauges.loaded == {"sql": True}  # removed adapters' series go, loaded or not
    assert conv.status()["items"][0]["commit"] == c["sql2"]
    assert not in_use_by(c["cache"], "test-org/chat-lora", c["chat"])  # released on unload
    assert not in_use_by(c["cache"], "test-org/sql-lora", c["sql"])  # the old commit released
    assert in_use_by(c["cache"], "test-org/sql-lora", c["sql2"])
    assert any(e.repo_id == "test-org/sql-lora" and e.commit == c["sql"] for e in manage.list_cache(c["cache"]))


def test_converger_retries_a_busy_vllm_with_backoff_and_keeps_the_last_good_file(
    tmp_path: Path, cached_adapters: dict[str, Any], base_facts: Any
) -> None:
    c = cached_adapters
    conv, api, clock = _converger(tmp_path, c["cache"], base_facts,
                                  [{"name": "sql", "model": "test-org/sql-lora", "commit": c["sql"]}])
    file = conv.adapters_file
    api.fail["sql"] = [errors.VllmUnavailable("sql", "busy"), errors.VllmUnavailable("sql", "busy")]
    conv.step()
    item = conv.status()["items"][0]
    assert item["state"] == FAILED and item["reason"] == "VllmUnavailable" and item["nextAttemptSeconds"] == 1.0
    clock.now += 1.1
    conv.step()
    assert conv.status()["items"][0]["nextAttemptSeconds"] == 2.0  # doubled
    clock.now += 0.5
    conv.step()
    assert len(api.calls) == 2  # not before its time
    clock.now += 2
    conv.step()
    assert conv.status()["items"][0]["state"] == LOADED and conv.status()["converged"]
    # A broken file keeps the loaded set and says why.
    file.write_text("{broken")
    conv.step()
    assert conv.status()["fileError"] and set(api.loaded) == {"sql"}


def test_ls_marks_adapters_and_their_rank(cached_adapters: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    entries = manage.list_cache(cached_adapters["cache"])
    kinds = {(e.repo_id, e.adapter) for e in entries}
    assert (TINY_REPO, False) in kinds and ("test-org/sql-lora", True) in kinds
    assert next(e for e in entries if e.repo_id == "test-org/chat-lora").lora_rank == 16
    # a rank_pattern above r counts (vLLM sizes by the largest module rank)
    sql = next(e for e in entries if e.repo_id == "test-org/sql-lora")
    config_path = CacheLayout(cached_adapters["cache"]).snapshot_dir(sql.repo_id, sql.commit) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.unlink()  # a symlink into blobs/: replace it, the blob stays as it was
    config_path.write_text(json.dumps({**config, "rank_pattern": {"q_proj": 32}}))
    assert next(e for e in manage.list_cache(cached_adapters["cache"]) if e.commit == sql.commit).lora_rank == 32
    assert cli.main(["ls", "--cache-dir", str(cached_adapters["cache"])]) == 0
    out = capsys.readouterr().out
    assert "adapter" in out and "model" in out


def test_plain_cache_of_an_adapter_repo_reports_its_rank(
    devhub: DevHub, hub_with_adapters: dict[str, Any], tmp_path: Path
) -> None:
    """The operator's per-adapter cache Job runs the plain cache command: the summary says it is an adapter."""
    term = tmp_path / "t.json"
    assert cli.main(["cache", "--model", "test-org/chat-lora", "--cache-dir", str(tmp_path / "c"),
                     "--termination-message-path", str(term)]) == summary.EXIT_OK  # fmt: skip
    message = summary.parse_termination_message(term.read_text())
    assert message is not None and message["commit"] == hub_with_adapters["chat"][0]
    assert message["adapter"] == {"rank": 16, "targetModules": ["k_proj", "o_proj", "q_proj", "v_proj"],
                                  "baseModel": TINY_REPO}  # fmt: skip
    assert cli.main(["cache", "--model", TINY_REPO, "--cache-dir", str(tmp_path / "c"),
                     "--termination-message-path", str(term)]) == summary.EXIT_OK  # fmt: skip
    assert "adapter" not in (summary.parse_termination_message(term.read_text()) or {})


def test_adapter_names_follow_the_crd() -> None:
    names = ["sql-lora", "Qwen/Qwen2.5-0.5B-Instruct", "a:b", "x" * 128, "-bad", "x" * 129, "sp ace", ""]
    entries = parse_adapters({"adapters": [{"name": n, "model": "o/m", "commit": "a" * 40} for n in names]}, path="f")
    assert [e.problem is None for e in entries] == [True, True, True, True, False, False, False, False]
