"""`gateway run` as a real process at its edges: slow clients, file-descriptor limits, a port in use, SIGTERM.

Each gateway here is a subprocess (`python -m gateway run`) against the in-test mock upstream, so real
process limits (RLIMIT_NOFILE) and real signals apply. Every load is bounded in count and time, and only
processes started here are ended, by PID.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.budget.factory import create_engine
from gateway.budget.status import budget_report
from gateway.clock import SystemClock
from gateway import workers
from gateway.config.loader import load_settings
from gateway.config.model import ServerConfig, Settings, StoreConfig
from gateway.mock_upstream import Action, MockUpstream
from tests.support.canary import CANARY_KEY
from tests.support.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent
CLIENT_KEY = "sk-edges-client-0001"
ADMIN_KEY = "sk-edges-admin-0002"
READY_TIMEOUT_S = 20.0
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello edges"}], "max_tokens": 5}
CONFIG = """\
server: {{host: 127.0.0.1, port: {port}, admin_key: "${{EDGES_ADMIN_KEY}}", header_timeout_s: {header_timeout_s},
         shutdown_grace_s: {grace_s}}}
store: {store}
providers:
  mock: {{base_url: "{upstream}", api_key: "{provider_key}", max_connections: 16,
          timeouts: {{connect_s: 2, read_s: 30, total_s: 60}}}}
routes:
  gpt-4o-mini: [mock]
pricing:
  gpt-4o-mini: {{input: 0.15, output: 0.60, max_output_tokens: 100}}
keys:
  - {{name: web-app, key_env: EDGES_CLIENT_KEY}}
policies: [policies.yaml]
"""
POLICY = "name: all\nbudgets:\n  - {{period: daily, usd: 1000, requests: {requests}}}\n"
EMBEDDED = "{path: ./data/gateway.db, journal_path: ./data/journal.jsonl}"


@dataclass
class GatewayProcess:
    """A `gateway run` subprocess and where it writes."""

    process: asyncio.subprocess.Process
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return (self.directory / "gateway.log").read_text(errors="replace")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


def write_config(directory: Path, port: int, upstream: str, *, store: str = EMBEDDED, header_timeout_s: float = 10,
                 grace_s: float = 30, requests: int = 1_000_000) -> Path:
    (directory / "policies.yaml").write_text(POLICY.format(requests=requests))
    path = directory / "gateway.yaml"
    path.write_text(CONFIG.format(port=port, upstream=upstream, store=store, header_timeout_s=header_timeout_s,
                                  grace_s=grace_s, provider_key=CANARY_KEY))
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ, EDGES_CLIENT_KEY=CLIENT_KEY, EDGES_ADMIN_KEY=ADMIN_KEY)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def open_file_limit(limit: int) -> Callable[[], None]:
    """A preexec hook: the child starts with RLIMIT_NOFILE soft = hard = `limit`."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def children_of(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*/children") for c in task.read_text().split()]


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Processes a test started; any still running at the end is killed, its children first, by PID."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            for pid in children_of(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


async def run_gateway(config: Path, processes: list, *args: str, preexec: Callable[[], None] | None = None,
                      log_level: str = "INFO") -> asyncio.subprocess.Process:
    sink = open(config.parent / "gateway.log", "ab")   # noqa: SIM115 - the child writes to it
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--log-level", log_level, "run", "--config", str(config), *args,
            stdout=sink, stderr=sink, env=child_env(), cwd=config.parent, preexec_fn=preexec)
    finally:
        sink.close()
    processes.append(process)
    return process


async def start_gateway_process(directory: Path, upstream: MockUpstream, processes: list, *,
                                preexec: Callable[[], None] | None = None, log_level: str = "INFO",
                                **config: object) -> GatewayProcess:
    """A gateway process on a free port, once it logged that it listens."""
    port = free_port()
    path = write_config(directory, port, upstream.url, **config)  # type: ignore[arg-type]
    process = await run_gateway(path, processes, preexec=preexec, log_level=log_level)
    gateway = GatewayProcess(process, port, directory)
    async with asyncio.timeout(READY_TIMEOUT_S):
        while "gateway listening on" not in gateway.log:
            assert process.returncode is None, gateway.log[-2000:]
            await asyncio.sleep(0.05)   # polling a child process for readiness
    return gateway


async def chat(url: str, *, stream: bool = False) -> tuple[int, float]:
    """One chat request on a fresh connection: its status and how long it took."""
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream},
                                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                                timeout=aiohttp.ClientTimeout(total=10)) as reply:
            await reply.read()
            return reply.status, time.monotonic() - started


async def daily_request_limit(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/budget/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as reply:
            assert reply.status == 200, await reply.text()
            return next(e["limit"] for e in (await reply.json())["data"] if e["unit"] == "requests")


async def assert_a_policy_edit_applies_live(gateway: GatewayProcess, within_s: float = 5.0) -> None:
    """The reload watcher still works: a new limit is served by the status endpoint within `within_s`."""
    (gateway.directory / "policies.yaml").write_text(POLICY.format(requests=777))
    async with asyncio.timeout(within_s):
        while await daily_request_limit(gateway.url) != 777:
            await asyncio.sleep(0.1)


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within_s) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def slowloris(port: int, started: asyncio.Event, *, within_s: float = 15.0) -> float | None:
    """A connection that sends its request head one line a second, never ending it: seconds until the server
    closed it (None: it did not, within `within_s`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
    started.set()

    async def trickle() -> None:
        for line in range(int(within_s)):
            await asyncio.sleep(1)
            writer.write(b"X-Slow-%d: 1\r\n" % line)

    feeding = asyncio.create_task(trickle())
    try:
        closed = await closed_by_server(reader, within_s)
        return time.monotonic() - opened if closed else None
    finally:
        feeding.cancel()
        writer.close()


async def normal_client(url: str, stop: asyncio.Event, latencies: list[tuple[int, float]]) -> None:
    """A well-behaved client: one request every 0.1 s on a fresh connection, until told to stop (at most 300)."""
    for _ in range(300):
        if stop.is_set():
            return
        latencies.append(await chat(url))
        await asyncio.sleep(0.1)


async def watch_open_files(gateway: GatewayProcess, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak.append(gateway.open_files())
        await asyncio.sleep(0.05)


async def under_slowloris(gateway: GatewayProcess, connections: int) -> tuple[list, list, list]:
    """`connections` trickling connections with a normal client and a descriptor count alongside:
    (seconds until each trickler was closed, the normal client's (status, latency)s, descriptor counts)."""
    stop, latencies, open_files = asyncio.Event(), [], []
    normal = asyncio.create_task(normal_client(gateway.url, stop, latencies))
    watch = asyncio.create_task(watch_open_files(gateway, stop, open_files))
    events = [asyncio.Event() for _ in range(connections)]
    async with asyncio.timeout(60):
        closed = await asyncio.gather(*(slowloris(gateway.port, e) for e in events))
        stop.set()
        await asyncio.gather(normal, watch)
    return closed, latencies, open_files


# -- acceptance 2: slow and abusive clients -----------------------------------------------------------------

async def test_1000_slowloris_connections_leave_a_normal_client_served_within_1s(tmp_path, upstream, processes):
    gateway = await start_gateway_process(tmp_path, upstream, processes, header_timeout_s=2,
                                          preexec=open_file_limit(1400))

    closed, latencies, open_files = await under_slowloris(gateway, 1000)

    assert all(t is not None and 1.5 <= t < 2.0 + 0.5 + 1.5 for t in closed), sorted(t or 99 for t in closed)[::100]
    assert latencies and all(status == 200 and took < 1.0 for status, took in latencies), max(latencies)
    assert max(open_files) < 1400 and "Too many open files" not in gateway.log
    await assert_a_policy_edit_applies_live(gateway)
    assert CLIENT_KEY not in gateway.log and CANARY_KEY not in gateway.log


async def test_under_a_low_file_limit_the_cap_keeps_descriptors_free_and_the_normal_client_served(
        tmp_path, upstream, processes):
    limit = 400                                        # room for 400 - 16 - 64 - 64 = 256 client connections
    gateway = await start_gateway_process(tmp_path, upstream, processes, header_timeout_s=2,
                                          preexec=open_file_limit(limit))

    closed, latencies, open_files = await under_slowloris(gateway, 600)

    assert all(t is not None for t in closed)
    # At the cap a new connection waits behind the flood in the backlog until heads turn 0.25 s old: a
    # second or so on a busy machine (the 1 s bound is the test above, where the cap is not reached).
    assert latencies and all(status == 200 and took < 2.0 for status, took in latencies), max(latencies)
    assert max(open_files) < limit and "Too many open files" not in gateway.log
    assert "lowered to 256" in gateway.log
    await assert_a_policy_edit_applies_live(gateway)


async def test_after_running_out_of_descriptors_the_gateway_serves_again_once_they_are_back(
        tmp_path, upstream, processes):
    gateway = await start_gateway_process(tmp_path, upstream, processes)
    assert (await chat(gateway.url))[0] == 200
    soft, hard = resource.prlimit(gateway.process.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(gateway.process.pid, resource.RLIMIT_NOFILE, (gateway.open_files() + 1, hard))
    held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(10)]
    async with asyncio.timeout(10):                  # pressure: accepting fails
        while "Too many open files" not in gateway.log:
            await asyncio.sleep(0.05)

    resource.prlimit(gateway.process.pid, resource.RLIMIT_NOFILE, (soft, hard))
    for _, writer in held:
        writer.close()

    status, took = await chat(gateway.url)
    assert status == 200 and took < 3.0
    await assert_a_policy_edit_applies_live(gateway)
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as reply:
            metrics = await reply.text()
    failures = [line for line in metrics.splitlines()
                if line.startswith('gateway_background_failures_total{task="accept_connections"}')]
    assert failures and float(failures[0].split()[-1]) >= 1


# -- acceptance 4: keys never reach a log, in the process's own stderr at DEBUG --------------------------

async def test_malformed_heads_leave_no_key_in_the_process_log_at_debug(tmp_path, upstream, processes):
    from tests.test_log_secrets import MALFORMED

    gateway = await start_gateway_process(tmp_path, upstream, processes, log_level="DEBUG")
    for raw in MALFORMED.values():
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(raw.replace(b"sk-client-web-0001", CLIENT_KEY.encode()))
        assert b" 400 " in (await asyncio.wait_for(reader.read(), 5)).split(b"\r\n")[0]
        writer.close()
    gateway.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(gateway.process.wait(), 10)

    assert gateway.log.count("refused a malformed request") == len(MALFORMED)
    assert CLIENT_KEY not in gateway.log and CLIENT_KEY[3:] not in gateway.log and CANARY_KEY not in gateway.log


# -- acceptance 9: start-up fails fast ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["embedded store", "redis store", "--workers 2"])
async def test_a_port_in_use_exits_non_zero_within_2s_with_one_line(tmp_path, upstream, processes, variant, request):
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    store = f'{{url: "{request.getfixturevalue("redis_url")}"}}' if variant == "redis store" else EMBEDDED
    config = write_config(tmp_path, port, upstream.url, store=store)
    args = ("--workers", "2") if variant == "--workers 2" else ()
    try:
        started = time.monotonic()
        process = await run_gateway(config, processes, *args)
        code = await asyncio.wait_for(process.wait(), 10)
        took = time.monotonic() - started
    finally:
        holder.close()

    lines = (tmp_path / "gateway.log").read_text().splitlines()
    assert code != 0 and took < 2.0, (code, took)
    assert lines == [f"gateway: cannot listen on 127.0.0.1:{port}: Address already in use"], lines


# -- acceptance 10: shutdown is defined ---------------------------------------------------------------------

async def open_stream(url: str, session: aiohttp.ClientSession) -> tuple[aiohttp.ClientResponse, bytes]:
    """A chat stream, once its first event has arrived."""
    reply = await session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True},
                               headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert reply.status == 200
    first = await reply.content.readuntil(b"\n\n")
    return reply, first


async def test_sigterm_ends_long_streams_with_the_error_event_settles_them_and_exits_within_grace_plus_2s(
        tmp_path, upstream, processes):
    upstream.stream_gate = asyncio.Event()             # every stream stops after its first chunk
    gateway = await start_gateway_process(tmp_path, upstream, processes, grace_s=2)
    async with aiohttp.ClientSession() as session:
        streams = await asyncio.gather(*(open_stream(gateway.url, session) for _ in range(5)))
        stopped = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        tails = await asyncio.wait_for(asyncio.gather(*(reply.content.read() for reply, _ in streams)), 10)
        code = await asyncio.wait_for(gateway.process.wait(), 10)
        took = time.monotonic() - stopped

    assert all(b'"code":"stream_truncated"' in tail and tail.rstrip().endswith(b"}") for tail in tails), tails
    assert code == 0 and 2.0 <= took < 4.0, (code, took)
    settings = load_settings(tmp_path / "gateway.yaml", env=child_env())
    engine = create_engine(settings.store, SystemClock())
    try:
        report = await budget_report(engine, list(settings.policies), time.time())
    finally:
        await engine.close()
    requests = next(entry for entry in report if entry["unit"] == "requests")
    usd = next(entry for entry in report if entry["unit"] == "usd")
    assert requests["reserved"] == 0 and usd["reserved"] == "0" and requests["spent"] == 5, report
    assert not any(p.stat().st_size for p in (tmp_path / "data").glob("journal*")), "spend left in the journal"


async def test_sigterm_lets_a_request_in_flight_finish_within_the_grace(tmp_path, upstream, processes):
    gateway = await start_gateway_process(tmp_path, upstream, processes, grace_s=5)
    upstream.script(Action(delay_s=1.0))
    in_flight = asyncio.create_task(chat(gateway.url))
    async with asyncio.timeout(5):
        while upstream.hits == 0:
            await asyncio.sleep(0.01)

    gateway.process.send_signal(signal.SIGTERM)
    status, _ = await in_flight
    code = await asyncio.wait_for(gateway.process.wait(), 10)

    assert status == 200 and code == 0


def test_the_supervisor_kills_a_worker_at_the_shutdown_grace_plus_a_margin(monkeypatch):
    deadlines = []

    class Supervisor:
        def __init__(self, commands, *, grace_s):
            deadlines.append(grace_s)

        def run(self):
            return 0

    monkeypatch.setattr(workers, "Supervisor", Supervisor)
    settings = Settings(server=ServerConfig(shutdown_grace_s=7), store=StoreConfig(), providers={}, routes=(),
                        pricing={})

    assert workers.supervise(workers.WorkerSpec("gw.yaml", "127.0.0.1", free_port(), 2), settings) == 0
    assert deadlines == [7 + workers.STOP_MARGIN_S]
