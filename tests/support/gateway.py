"""A real gateway process for tests (``chatai devstack``'s), with an API key and SDK clients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import AsyncOpenAI, OpenAI

from chatai.devstack import processes
from gateway import private
from gateway.keys import KeyStore


@dataclass
class GatewayProcess(processes.Child):
    """The gateway's process (``.proc``, ``.log_path``) and what a client needs to reach it."""

    port: int = 0
    api_key: str = ""
    state_dir: Path = Path()
    database: str = ""  # its keys' and batches' database (URL or SQLite path)

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
        """Poll /health until ``predicate(health)`` holds; returns that health. Blocks, even when
        called from a coroutine (``await asyncio.to_thread(gw.wait_for, ...)`` keeps a loop going)."""
        last: dict = {}

        def holds() -> dict | None:
            nonlocal last
            try:
                last = self.health()
            except httpx.HTTPError:
                return None
            return last if predicate(last) else None

        try:
            return processes.wait_until(holds, timeout, what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; last health: {last}") from None

    def stop(self, timeout: float = 20.0, group: bool = False) -> int | None:
        return super().stop(timeout, group)


def start_gateway(state_dir: Path, broker_url: str, *, extra_env: dict[str, str] | None = None,
                  args: list[str] | None = None, direct: bool = True, timeout: float = 30.0) -> GatewayProcess:
    """A gateway with a fresh key, answering /health (``direct``: no tunnel, straight to the broker).
    ``CHATAI_GATEWAY_DATABASE_URL`` in ``extra_env``: its database (replicas share one)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    database = (extra_env or {}).get("CHATAI_GATEWAY_DATABASE_URL") or str(private.database(state_dir))
    keys = KeyStore(database)
    api_key = keys.create("tests")[1]
    keys.close()
    port = processes.free_port()
    child = processes.start_gateway(state_dir, port, broker_url, state_dir / "gateway.log",
                                    args=[*(args or []), *(["--broker-direct"] if direct else [])], env=extra_env)
    gw = GatewayProcess(child.name, child.proc, child.log_path, port=port, api_key=api_key, state_dir=state_dir,
                        database=database)
    try:
        gw.wait_until(lambda: processes.http_ok(gw.base_url + "/health"), timeout, "the gateway to answer /health")
    except BaseException:
        gw.stop()
        raise
    return gw


@contextmanager
def gateway_serving(state_dir: Path, broker_url: str, model: str, *, env: dict[str, str] | None = None,
                    direct: bool = True) -> Iterator[GatewayProcess]:
    """A gateway process of the test's own settings, handed out once it sees ``model``'s worker."""
    gw = start_gateway(state_dir, broker_url, extra_env=env, direct=direct)
    try:
        gw.wait_for(lambda h: h["models"].get(model, {}).get("ready", 0) >= 1, timeout=60,
                    what=f"a heartbeat of {model}'s worker")
        yield gw
    finally:
        gw.stop()


def new_key(gw: GatewayProcess, name: str = "test", **limits: int) -> tuple[str, str]:
    """(key id, key) with its own limits, made the way ``chatai keys create --rpm ...`` does."""
    store = KeyStore(gw.database)
    try:
        info, key = store.create(name, limits=limits)
    finally:
        store.close()
    return info.id, key
