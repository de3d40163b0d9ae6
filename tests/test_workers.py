"""`gateway run --workers N`: real processes sharing one port, one budget store, one supervisor."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.model import ModelPrice, ServerConfig, Settings, StoreConfig
from gateway.domain.pricing import Usage, charge_for, nano_to_usd
from gateway.mock_upstream import MockUpstream
from gateway.workers import WorkerSpec, worker_command, worker_settings
from tests.support.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent
CLIENT_KEY = "sk-workers-client-0001"
ADMIN_KEY = "sk-workers-admin-0002"
PRICE = ModelPrice(Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), max_output_tokens=1000)
REQUESTS = 120
READY_TIMEOUT_S = 20.0
SERVED_BYTES = 16 * 1024     # a worker that served requests wrote at least this much (idle: a few hundred)

CONFIG = """\
server: {{host: 127.0.0.1, port: {port}, auth: keys, admin_key: "${{WORKERS_ADMIN_KEY}}", access_log: true}}
store: {store}
providers:
  mock: {{base_url: "{upstream}", api_key: sk-mock, timeouts: {{connect_s: 2, read_s: 10, total_s: 20}}}}
routes:
  gpt-4o-mini: [mock]
pricing:
  gpt-4o-mini: {{input: 0.15, output: 0.60, cached_input: 0.075, max_output_tokens: 1000}}
keys:
  - {{name: web-app, team: web, key_env: WORKERS_CLIENT_KEY}}
policies: [policies.yaml]
"""
POLICIES = """\
name: all
budgets:
  - {period: daily, usd: 1000, requests: 1000000}
"""


def write_config(directory: Path, port: int, upstream: str, store: str) -> Path:
    (directory / "policies.yaml").write_text(POLICIES)
    path = directory / "gateway.yaml"
    path.write_text(CONFIG.format(port=port, upstream=upstream, store=store))
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ, WORKERS_CLIENT_KEY=CLIENT_KEY, WORKERS_ADMIN_KEY=ADMIN_KEY)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def children_of(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*/children") for c in task.read_text().split()]


def listening_sockets(port: int) -> int:
    """LISTEN sockets on 127.0.0.1:port (one per worker with SO_REUSEPORT)."""
    wanted = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1] == wanted and line.split()[3] == "0A")


def bytes_written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar for {pid}")


async def start_supervisor(config: Path, workers: int, log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(config), "--workers", str(workers),
            stdout=sink, stderr=sink, env=child_env(), cwd=config.parent)


async def wait_serving(process: asyncio.subprocess.Process, port: int, workers: int, log: Path) -> list[int]:
    """The worker PIDs once every worker listens and the port answers /healthz."""
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.returncode is None, f"supervisor exited: {log.read_text()[-2000:]}"
            if listening_sockets(port) == workers:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as reply:
                    if reply.status == 200:
                        return children_of(process.pid)
            assert asyncio.get_running_loop().time() < deadline, f"workers not ready: {log.read_text()[-2000:]}"
            await asyncio.sleep(0.05)  # polling child processes for readiness, not passing test time


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), timeout=30)


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Supervisors a test started; any still running at the end is killed with its workers."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            for pid in children_of(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


async def chat(session: aiohttp.ClientSession, url: str, gate: asyncio.Semaphore) -> tuple[int, dict]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count the workers please"}],
            "max_tokens": 20}
    async with gate, session.post(url + "/v1/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as reply:
        return reply.status, await reply.json()


async def budget(session: aiohttp.ClientSession, url: str) -> dict[str, dict]:
    async with session.get(url + "/v1/budget/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as reply:
        assert reply.status == 200, await reply.text()
        return {entry["unit"]: entry for entry in (await reply.json())["data"]}


async def settled_budget(session: aiohttp.ClientSession, url: str, within_s: float = 5.0) -> dict[str, dict]:
    """The counters once no request holds a reservation any more.

    A worker settles a request just after answering it, and a status read waits only for the settlements
    of the worker that answers it: the other worker's last one may still be on its way. Until it lands,
    its reservation shows in `reserved`, so this waits for that (a condition, not a guessed delay).
    """
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        counters = await budget(session, url)
        if counters["requests"]["reserved"] == 0 or asyncio.get_running_loop().time() > deadline:
            return counters
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("store", ["redis", "sqlite"])
async def test_two_workers_share_the_port_and_count_every_request_once(
        store: str, tmp_path: Path, upstream: MockUpstream, supervised: list, request: pytest.FixtureRequest) -> None:
    port = free_port()
    store_config = (f'{{url: "{request.getfixturevalue("redis_url")}"}}' if store == "redis"
                    else "{path: ./data/gateway.db, journal_path: ./data/journal.jsonl}")
    config = write_config(tmp_path, port, upstream.url, store_config)
    log = tmp_path / "gateway.log"
    supervised.append(process := await start_supervisor(config, 2, log))
    workers = await wait_serving(process, port, 2, log)
    assert len(workers) == 2
    written = {pid: bytes_written(pid) for pid in workers}
    url = f"http://127.0.0.1:{port}"

    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        replies = await asyncio.gather(*(chat(session, url, gate) for _ in range(REQUESTS)))
        counters = await settled_budget(session, url)

    assert [status for status, _ in replies] == [200] * REQUESTS
    usage = replies[0][1]["usage"]
    unit = charge_for(PRICE, Usage(usage["prompt_tokens"], usage["completion_tokens"]))
    assert all(body["usage"] == usage for _, body in replies)
    assert counters["requests"]["spent"] == REQUESTS
    assert Decimal(counters["usd"]["spent"]) == nano_to_usd(REQUESTS * unit.usd_nano)
    assert counters["requests"]["reserved"] == 0 and Decimal(counters["usd"]["reserved"]) == 0
    served = {pid: bytes_written(pid) - before for pid, before in written.items()}
    assert all(n >= SERVED_BYTES for n in served.values()), f"a worker served nothing: {served}"
    journals = sorted(p.name for p in (tmp_path / "data").glob("journal*")) if store == "sqlite" else []
    assert not journals or set(journals) <= {"journal.w0.jsonl", "journal.w1.jsonl"}

    assert await stop(process) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert listening_sockets(port) == 0


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], tuple[str, float]]:
    """One /metrics answer: (sample name, labels) -> (family type, value)."""
    async with session.get(url + "/metrics") as reply:
        assert reply.status == 200, await reply.text()
        text = await reply.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): (family.type, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples}


def went_backwards(before: dict, after: dict) -> list[str]:
    """Counter and histogram samples (not `_created`) that shrank or vanished between two scrapes."""
    return [f"{name}{dict(labels)}: {value} -> {after.get((name, labels), (None, None))[1]}"
            for (name, labels), (kind, value) in before.items()
            if kind in ("counter", "histogram") and not name.endswith("_created")
            and not ((name, labels) in after and after[(name, labels)][1] >= value)]


async def test_metrics_and_breakers_answer_for_every_worker(tmp_path: Path, upstream: MockUpstream,
                                                            supervised: list) -> None:
    port = free_port()
    config = write_config(tmp_path, port, upstream.url, "{path: ./data/gateway.db}")
    log = tmp_path / "gateway.log"
    supervised.append(process := await start_supervisor(config, 2, log))
    await wait_serving(process, port, 2, log)
    url, gate = f"http://127.0.0.1:{port}", asyncio.Semaphore(16)

    scrapes = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(50):                  # 100 requests, two beside each of 50 scrapes
            *replies, seen = await asyncio.gather(chat(session, url, gate), chat(session, url, gate),
                                                  scrape(session, url))
            assert [status for status, _ in replies] == [200, 200]
            scrapes.append(seen)
        await settled_budget(session, url)
        scrapes.append(await scrape(session, url))
        async with session.get(url + "/v1/providers/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as reply:
            [provider] = (await reply.json())["data"]

    for before, after in zip(scrapes, scrapes[1:]):
        assert went_backwards(before, after) == []
    final = scrapes[-1]
    assert sum(value for (name, _), (_, value) in final.items() if name == "gateway_requests_total") == 100
    assert final[("gateway_budget_spent", (("period", "daily"), ("policy", "all"), ("unit", "requests")))][1] == 100
    assert final[("gateway_control_requests_total", (("path", "/metrics"), ("status_class", "2xx")))][1] == 50
    assert [worker["worker"] for worker in provider["workers"]] == [0, 1]
    assert provider["state"] == "closed" and sum(w["calls_in_window"] for w in provider["workers"]) == 100


async def test_a_dead_worker_stops_the_others_and_the_supervisor(
        tmp_path: Path, upstream: MockUpstream, supervised: list) -> None:
    port = free_port()
    config = write_config(tmp_path, port, upstream.url, "{path: ./data/gateway.db}")
    log = tmp_path / "gateway.log"
    supervised.append(process := await start_supervisor(config, 2, log))
    first, second = await wait_serving(process, port, 2, log)

    os.kill(first, signal.SIGKILL)

    assert await asyncio.wait_for(process.wait(), timeout=30) == 128 + signal.SIGKILL
    assert not Path(f"/proc/{second}").exists()
    assert "worker 0" in log.read_text() or "worker 1" in log.read_text()


async def test_an_invalid_config_fails_once_before_any_worker_starts(tmp_path: Path, supervised: list) -> None:
    config = write_config(tmp_path, free_port(), "http://127.0.0.1:9/v1", "{}")
    env = child_env()
    del env["WORKERS_CLIENT_KEY"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(config), "--workers", "3",
        stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path)
    supervised.append(process)
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)

    assert process.returncode == 2
    assert err.decode().count("WORKERS_CLIENT_KEY") == 1


SUPERVISE_STUBBORN = textwrap.dedent("""
    import signal, sys
    from gateway.workers import Supervisor
    stubborn = [sys.executable, "-c", "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "os.write(1, b'up' + bytes([10])); time.sleep(60)"]
    sys.exit(Supervisor([stubborn, stubborn], grace_s=0.5).run())
""")


async def test_workers_that_ignore_the_stop_signal_are_killed_after_the_grace_period(supervised: list) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUPERVISE_STUBBORN, stdout=asyncio.subprocess.PIPE, env=child_env())
    supervised.append(process)
    assert process.stdout is not None
    for _ in range(2):
        assert await asyncio.wait_for(process.stdout.readline(), timeout=20) == b"up\n"
    workers = children_of(process.pid)

    process.send_signal(signal.SIGTERM)

    assert await asyncio.wait_for(process.wait(), timeout=20) == 128 + signal.SIGKILL
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_each_worker_journals_to_its_own_file_and_only_worker_0_serves_the_mock() -> None:
    settings = Settings(server=ServerConfig(), store=StoreConfig(journal_path="/var/lib/gw/journal.jsonl"),
                        providers={}, routes=(), pricing={})
    spec = WorkerSpec("gw.yaml", "127.0.0.1", 8080, 2, with_mock="127.0.0.1:9000")

    assert worker_settings(settings, 1).store.journal_path == "/var/lib/gw/journal.w1.jsonl"
    assert "--with-mock" in worker_command(spec, 0) and "--with-mock" not in worker_command(spec, 1)
    assert worker_command(spec, 1)[-5:] == ["--reuse-port", "--workers", "1", "--worker-index", "1"]
    with_peers = worker_command(dataclasses.replace(spec, peer_dir="/run/gw"), 1)
    assert with_peers[with_peers.index("--peer-dir"):][:4] == ["--peer-dir", "/run/gw", "--worker-count", "2"]
