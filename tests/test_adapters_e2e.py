"""End to end with real vLLM (CPU build) and LoRA adapters: ``vllm-runtime cache --adapters-file`` fills the
volume from the loopback Hub, ``vllm-runtime serve --adapters-file`` serves the base model and converges to
the file (a ConfigMap volume's symlink swap) without restarting vLLM. One vLLM start for the whole module.

- base model and each adapter give different greedy completions; each adapter's is stable;
- a third adapter added and one removed while serving: vLLM's pid unchanged, completions follow;
- an adapter of too high a rank and one for another base model fail with their reason, the rest serve;
- ``/metrics`` relays vLLM's ``vllm:lora_requests_info`` unchanged, next to the runtime's adapter gauges.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hub_fixtures import TINY_REPO, hub_environment
from vllm_fixtures import READY_TIMEOUT, serve_env

from vllm_runtime import summary
from vllm_runtime.demo import RUNTIME, ServeProcess, complete, get_json, scrape
from vllm_runtime.devhub import tiny_adapter
from vllm_runtime.devhub.server import DevHub

pytestmark = pytest.mark.e2e

PROMPT = "Hello, my name is"
CONVERGE_TIMEOUT = 180.0  # a pass every 0.5 s; loads take well under a second, but the machine is shared
ADAPTERS = {  # name -> (repo, variant, seed)
    "sql": ("test-org/sql-lora", "good", 1),
    "chat": ("test-org/chat-lora", "good", 2),
    "code": ("test-org/code-lora", "good", 3),
    "high": ("test-org/high-lora", "rank-too-high", 4),
    "other": ("test-org/other-base-lora", "other-base", 5),
}


class ConfigMapFile:
    """A file updated the way the kubelet updates a ConfigMap volume: ``..data`` -> a timestamped directory,
    ``adapters.json`` -> ``..data/adapters.json``, and an update renames a new ``..data`` link over the old."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.version = 0
        self.path = directory / "adapters.json"

    def write(self, entries: list[dict[str, Any]]) -> None:
        self.version += 1
        payload = self.directory / f"..v{self.version}"
        payload.mkdir()
        (payload / "adapters.json").write_text(json.dumps({"adapters": entries}))
        tmp = self.directory / "..data_tmp"
        tmp.symlink_to(payload.name)
        os.replace(tmp, self.directory / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/adapters.json")


@dataclass
class AdapterServer:
    server: ServeProcess
    file: ConfigMapFile
    commits: dict[str, str]
    cache_summary: dict[str, Any]

    def entry(self, name: str) -> dict[str, Any]:
        return {"name": name, "model": ADAPTERS[name][0], "revision": "main", "commit": self.commits[name]}

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = get_json(self.server.metrics + "/status")["adapters"]
        return data

    def items(self) -> dict[str, dict[str, Any]]:
        return {i["name"]: i for i in self.status()["items"]}

    def wait(self, what: str, done: Callable[[dict[str, dict[str, Any]]], bool]) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        items: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            assert self.server.proc is not None and self.server.proc.poll() is None, self.server.log_text()[-3000:]
            items = self.items()
            if done(items):
                return items
            time.sleep(0.25)
        raise AssertionError(f"not {what} after {CONVERGE_TIMEOUT:.0f} s: {json.dumps(items, indent=1)}")

    def vllm_pid(self) -> int:
        """vLLM's process: the one child of ``vllm-runtime serve``."""
        assert self.server.proc is not None
        pid = self.server.proc.pid
        children = [
            int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        ]  # fmt: skip
        assert len(children) == 1, children
        return children[0]

    def text(self, model: str) -> str:
        return str(complete(self.server.api, model, PROMPT, max_tokens=8)["choices"][0]["text"])


def _cache(cache_dir: Path, adapters_file: Path, env: dict[str, str]) -> dict[str, Any]:
    term = cache_dir.parent / "cache-summary.json"
    done = subprocess.run(
        [*RUNTIME, "cache", "--model", TINY_REPO, "--revision", "main", "--cache-dir", str(cache_dir),
         "--adapters-file", str(adapters_file), "--termination-message-path", str(term)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    result = summary.parse_termination_message(term.read_text() if term.exists() else None)
    assert done.returncode == 0 and result is not None and result["ok"], done.stdout + done.stderr
    return result


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[AdapterServer]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]')")
    work = tmp_path_factory.mktemp("adapters-e2e")
    cache_dir = work / "cache"
    with DevHub() as hub:
        base_commit = hub.add_repo(TINY_REPO, tiny_model_dir)
        for repo, variant, seed in ADAPTERS.values():
            tiny_adapter.publish(hub, repo, work / "gen", seeds=(seed,), variant=variant)
        wanted = work / "cache-adapters.json"
        wanted.write_text(json.dumps({"adapters": [
            {"name": name, "model": repo, "revision": "main"} for name, (repo, _, _) in ADAPTERS.items()
        ]}))  # fmt: skip
        home = work / "hf-home"
        home.mkdir()
        cached = _cache(cache_dir, wanted, hub_environment(hub, home))
    assert cached["commit"] == base_commit
    commits = {e["name"]: e["commit"] for e in summary.adapter_entries(cached)}
    assert set(commits) == set(ADAPTERS), cached  # all five cached and verified (their faults show at load)
    file = ConfigMapFile(work / "configmap")
    server = ServeProcess(
        model=TINY_REPO, revision=base_commit, cache_dir=cache_dir, log_path=work / "serve.log", env=serve_env(),
        vllm_args=("--max-model-len", "256", "--enforce-eager", "--seed", "0"),
        serve_args=("--adapters-file", str(file.path), "--max-loras", "2", "--max-lora-rank", "16",
                    "--max-cpu-loras", "4", "--adapter-poll-interval", "0.5"),
    )  # fmt: skip
    served = AdapterServer(server, file, commits, cached)
    file.write([served.entry(n) for n in ("sql", "chat", "high", "other")])
    served.server.start()
    try:
        served.server.wait_ready(timeout=READY_TIMEOUT)
        yield served
    finally:
        served.server.stop()


def _completion_error(api: str, model: str) -> int:
    try:
        complete(api, model, PROMPT, max_tokens=2)
    except urllib.error.HTTPError as err:
        return int(err.code)
    return 200


def test_adapters_serve_fail_alone_and_follow_the_file_without_a_restart(adapter_server: AdapterServer) -> None:
    s = adapter_server
    items = s.wait("converged", lambda i: all(i[n]["state"] != "Pending" for n in i) and i["sql"]["loaded"]
                   and i["chat"]["loaded"])  # fmt: skip
    assert items["sql"]["commit"] == s.commits["sql"] and items["sql"]["rank"] == 8
    # The two broken adapters fail alone, each with its reason and fix; the rest keep serving.
    assert items["high"]["state"] == "Failed" and items["high"]["reason"] == "AdapterRankTooHigh"
    assert "maxLoraRank" in items["high"]["message"]
    assert items["other"]["state"] == "Failed" and items["other"]["reason"] == "AdapterBaseMismatch"
    assert s.status()["converged"] is False and s.status()["maxLoraRank"] == 16

    base, sql, chat = s.text(TINY_REPO), s.text("sql"), s.text("chat")
    assert len({base, sql, chat}) == 3, (base, sql, chat)  # each adapter changes the greedy completion
    assert (s.text("sql"), s.text("chat"), s.text(TINY_REPO)) == (sql, chat, base)  # and each is stable
    assert _completion_error(s.server.api, "high") == 404  # never loaded

    _, samples = scrape(s.server.metrics)
    loaded = {labels["adapter"]: v for labels, v in samples["vllm_runtime_adapter_loaded"]}
    assert loaded == {"sql": 1.0, "chat": 1.0, "high": 0.0, "other": 0.0}
    failures = {(lb["adapter"], lb["reason"]) for lb, v in samples["vllm_runtime_adapter_load_failures_total"] if v}
    assert failures == {("high", "AdapterRankTooHigh"), ("other", "AdapterBaseMismatch")}
    assert samples["vllm:lora_requests_info"], "vLLM's LoRA gauge is relayed"

    # Add "code", remove "chat" (and the broken ones): no restart, completions follow.
    pid = s.vllm_pid()
    s.file.write([s.entry("sql"), s.entry("code")])
    items = s.wait("switched to sql + code", lambda i: set(i) == {"sql", "code"} and i["code"]["loaded"])
    assert s.status()["converged"] is True
    assert s.vllm_pid() == pid  # the same vLLM process
    code = s.text("code")
    assert code not in (base, sql) and s.text("code") == code
    assert s.text("sql") == sql and s.text(TINY_REPO) == base
    assert _completion_error(s.server.api, "chat") == 404  # unloaded
    models = {m["id"] for m in get_json(s.server.api + "/v1/models")["data"]}
    assert {"sql", "code", TINY_REPO} <= models and "chat" not in models

    # /metrics relays vLLM's vllm:lora_requests_info exactly as vLLM exports it.
    with urllib.request.urlopen(s.server.api + "/metrics", timeout=30) as resp:  # noqa: S310 - loopback
        direct = sorted(line for line in resp.read().decode().splitlines() if line.startswith("vllm:lora_requests_info"))
    relayed_text, samples = scrape(s.server.metrics)
    relayed = sorted(line for line in relayed_text.splitlines() if line.startswith("vllm:lora_requests_info"))
    assert direct and relayed == direct
    loaded = {labels["adapter"]: v for labels, v in samples["vllm_runtime_adapter_loaded"]}
    assert loaded == {"sql": 1.0, "code": 1.0}
