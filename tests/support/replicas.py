"""Gateway replicas as real `gateway run` processes on loopback ports, sharing one store (and one upstream)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.http.auth import key_digest
from tests.support.canary import CANARY_KEY
from tests.support.redis_server import free_port
from tests.support.settings import ADMIN_KEY, CLIENT_KEY

__all__ = ["CONFIG", "start_replica", "wait_healthy", "two_replicas"]

ROOT = Path(__file__).resolve().parent.parent.parent

CONFIG = """
server: {{host: 127.0.0.1, port: {port}, admin_key_sha256: {admin}}}
store: {{url: "{store}", journal_path: {tmp}/journal-{port}.jsonl}}
providers:
  primary: {{base_url: "{upstream}", api_key: "{key}"}}
routes: {{gpt-4.1: [primary]}}
pricing: {{gpt-4.1: {{input: 2.00, output: 8.00, max_output_tokens: 100}}}}
keys: [{{name: web-app, team: web, sha256: {client}}}]
policies: policies
"""


async def start_replica(tmp_path: Path, store_url: str, upstream_url: str, config_text: str = CONFIG
                        ) -> tuple[asyncio.subprocess.Process, str]:
    """A `gateway run` process on a free port with `config_text` (policies from tmp_path/policies); its URL."""
    port = free_port()
    config = tmp_path / f"config-{port}.yaml"
    config.write_text(config_text.format(port=port, admin=key_digest(ADMIN_KEY), store=store_url, tmp=tmp_path,
                                    upstream=upstream_url, key=CANARY_KEY, client=key_digest(CLIENT_KEY)))
    log = open(tmp_path / f"gateway-{port}.log", "wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--log-level", "WARNING", "run", "--config", str(config),
        stdout=log, stderr=log, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    return process, f"http://127.0.0.1:{port}"


async def wait_healthy(session: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process) -> None:
    """Wait until the replica answers /healthz."""
    for _ in range(300):
        assert process.returncode is None, "a gateway replica exited"
        try:
            async with session.get(url + "/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)  # readiness polling of a process we started
    pytest.fail(f"replica {url} did not become healthy")


@contextlib.asynccontextmanager
async def two_replicas(tmp_path: Path, store_url: str, upstream_url: str, policy: tuple[str, str]
                       ) -> AsyncIterator[tuple[aiohttp.ClientSession, list[str]]]:
    """Two healthy replicas on `store_url` with one policy file (name, YAML); a session and their URLs.
    They are stopped with SIGTERM at the end."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / f"{policy[0]}.yaml").write_text(policy[1])
    started = [await start_replica(tmp_path, store_url, upstream_url) for _ in range(2)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            for process, url in started:
                await wait_healthy(session, url, process)
            yield session, [url for _, url in started]
        finally:
            for process, _ in started:
                process.send_signal(signal.SIGTERM)
            for process, _ in started:
                await asyncio.wait_for(process.wait(), timeout=20)
