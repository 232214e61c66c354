"""Start a real gateway process for tests, the way an operator would (``chatai gateway``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import AsyncOpenAI, OpenAI

from chatai.devstack.broker_node import free_port
from gateway.keys import KeyStore


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    port: int
    api_key: str
    state_dir: Path
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> OpenAI:
        return OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0, **kw)

    def async_client(self, **kw) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(self.base_url + "/health", timeout=5).json()

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> dict:
        """Poll /health until ``predicate(health)`` holds."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if predicate(last):
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last health: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_gateway(state_dir: Path, broker_url: str, *, extra_env: dict[str, str] | None = None,
                  args: list[str] | None = None, direct: bool = True, timeout: float = 30.0) -> GatewayProcess:
    state_dir.mkdir(parents=True, exist_ok=True)
    keys = KeyStore(state_dir / "gateway.db")
    api_key = keys.create("tests")[1]
    keys.close()
    port = free_port()
    log_path = state_dir / "gateway.log"
    env = {**os.environ, "CHATAI_GATEWAY_BROKER_URL": broker_url, "CHATAI_GATEWAY_STATE_DIR": str(state_dir),
           **(extra_env or {})}
    argv = [sys.executable, "-m", "chatai.cli", "gateway", "--port", str(port), *(args or [])]
    if direct:
        argv.append("--broker-direct")
    proc = subprocess.Popen(argv, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    gw = GatewayProcess(proc, port, api_key, state_dir, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(gw.base_url + "/health", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    gw.stop()
    raise RuntimeError(f"gateway did not become healthy: {log_path.read_text()[-2000:]}")
