"""`vllm-operator run` as shipped: a process that logs in with a kubeconfig, serves kopf's liveness
endpoint and its metrics, reconciles a VLLMModel on the kmock emulator, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import kmock
import pytest
from kube_emulator import VLLMMODELS, KubeEmulator

pytestmark = [pytest.mark.kmock]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


async def test_run_command_with_a_kubeconfig(tmp_path: Path) -> None:
    async with KubeEmulator() as emu, kmock.Server(emu) as server:
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "operator", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}],
        }  # fmt: skip
        (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
        health, metrics_port = _free_port(), _free_port()
        env = dict(os.environ, KUBECONFIG=str(tmp_path / "kubeconfig"), VLLM_OPERATOR_METRICS_PORT=str(metrics_port))
        log = (tmp_path / "operator.log").open("w")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm_operator.cli", "run", "-A", "--liveness", f"http://127.0.0.1:{health}/healthz",
            env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            body = {"apiVersion": "vllm-operator.io/v1alpha1", "kind": "VLLMModel",
                    "metadata": {"name": "m", "namespace": "cli"}, "spec": {"model": "org/tiny"}}  # fmt: skip
            async with emu.post("/apis/vllm-operator.io/v1alpha1/namespaces/cli/vllmmodels", data=json.dumps(body),
                                headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
                assert resp.status == 200
            for _ in range(300):
                if ((emu.read(VLLMMODELS, "cli", "m") or {}).get("status") or {}).get("phase") == "Ready":
                    break
                await asyncio.sleep(0.1)
            status = (emu.read(VLLMMODELS, "cli", "m") or {}).get("status") or {}
            assert status.get("phase") == "Ready", (tmp_path / "operator.log").read_text()[-3000:]
            # The operator's own client authenticated with the kubeconfig's token.
            ours = [r for r in emu._requests if "kopf" not in r.headers.get("User-Agent", "")]
            assert any(r.headers.get("Authorization") == "Bearer not-a-secret" for r in ours)
            assert "vllm_operator_reconcile_total" in await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")
            await asyncio.to_thread(_get, f"http://127.0.0.1:{health}/healthz")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert "not-a-secret" not in (tmp_path / "operator.log").read_text(), "the token never reaches the logs"
