#!/usr/bin/env python3
"""Load test of the gateway against a bare pass-through proxy, on loopback, in one run.

What one run does (`bench/run.sh`, which calls `bench.py run`):
1. starts a redis-server (own free port, no persistence), the fast mock upstream (fast_upstream.py
   here, raw asyncio; `--own-mock`: `gateway mock-upstream`), the bare aiohttp pass-through proxy
   (bare_proxy.py here: the reference) and the gateway with a realistic config (two budget
   policies on Redis, retries, breaker, metrics as built, access log to logs/gateway.log);
2. checks each target: one request per scenario answers 200 with usage and reaches the mock
   exactly once; measures the gateway's unit cost (budget status delta of that one request);
3. warms every target up, then for each scenario and concurrency runs every target in interleaved
   rounds with wrk (`post.lua`), every other round in reverse order: wrk and the mock (and Redis)
   pinned to --loadgen-cpus, each proxy to --sut-cpus; gateway/bare figures are the median of the
   rounds' paired figures (gateway and bare of the same round);
4. after each gateway run checks the budget: spent requests moved by exactly the number of 200s the
   gateway logged, which is between wrk's completed count and that plus the connections in flight
   when wrk stopped; spent USD and tokens moved by exactly requests x unit cost; nothing is left
   reserved; and wrk saw no non-2xx answer and no socket error;
5. prints and writes results/<stamp>/summary.md and results.json.

`--soak N` instead drives the gateway alone until N requests (bounded by --soak-max-s) and checks
that its RSS after N requests is within 10 % of its RSS after the first 50,000.
`--instructions` instead counts, under callgrind, the instructions per chat request (16 connections) of
the bare proxy, the gateway, and the gateway with its access log or its budgets off: a figure that the
noise of a shared machine cannot move, and what each of those features costs.
`--profile` adds a py-spy recording of the gateway under load (py-spy on PATH or --py-spy).
`bench.py serve --port P --upstream URL` runs the gateway alone with the same config, for other
harnesses (see the Performance section of the README).

Only 127.0.0.1 is used; every wrk run is bounded by -d and a timeout, the run by --max-wall; only the
processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT_KEY = "sk-bench-client-0001"      # bench-only keys, not secrets
ADMIN_KEY = "sk-bench-admin-0002"
PROVIDER_KEY = "sk-bench-provider-0003"
TEAM_POLICY = "bench-team"
CHAT_PATH = "/v1/chat/completions"
SCENARIOS = {"chat": HERE / "payloads" / "chat.json", "stream": HERE / "payloads" / "chat_stream.json"}
PRICE_NANO_PER_TOKEN = (150, 600)        # gpt-4o-mini below: 0.15 / 0.60 USD per 1M tokens, in nano-USD
INSTRUCTION_TARGETS: dict[str, dict[str, bool]] = {   # --instructions: name -> write_config options
    "bare": {}, "gateway": {}, "gateway-no-access-log": {"access_log": False},
    "gateway-no-budget": {"budgets": False},
}
CALLGRIND_READY_S = 300.0   # start-up under callgrind is ~50 x slower
CALLGRIND_MIN_S = 10        # seconds of wrk counted (~70 requests/s under callgrind)
SOAK_BASELINE = 50_000
SOAK_TOLERANCE = 0.10


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- config

CONFIG = """\
# Written by bench/bench.py: a realistic gateway config against the bench mock upstream.
server:
  host: 127.0.0.1
  port: {port}
  auth: keys
  admin_key: "${{BENCH_ADMIN_KEY}}"
  access_log: true
store:
  url: "{redis_url}"
  timeout_s: 0.25
  pool_size: 64
  on_outage: fail_closed
  journal_path: ./journal.jsonl
providers:
  mock:
    base_url: "{upstream}"
    api_key: "${{BENCH_PROVIDER_KEY}}"
    timeouts: {{connect_s: 2, read_s: 30, total_s: 60}}
    max_connections: 256
routes:
  gpt-4o-mini: [mock]
pricing:
  gpt-4o-mini: {{input: 0.15, output: 0.60, cached_input: 0.075, max_output_tokens: 16384}}
keys:
  - {{name: bench-client, team: bench, tags: [bench], key_env: BENCH_CLIENT_KEY}}
policies: [policies.yaml]
retry: {{max_retries: 2, statuses: [429, 500, 502, 503, 504], backoff_base_s: 0.25, deadline_s: 60}}
breaker: {{window_s: 30, min_calls: 10, failure_rate: 0.5, consecutive_failures: 5, open_s: 15}}
"""

POLICIES = f"""\
# Two matching policies: a request reserves and settles three counters in one store round trip.
policies:
  - name: bench-global
    budgets:
      - {{period: daily, usd: 100000}}
      - {{period: monthly, usd: 1000000}}
  - name: {TEAM_POLICY}
    match: {{teams: [bench]}}
    budgets:
      - {{period: daily, usd: 100000, tokens: 1000000000000, requests: 1000000000}}
"""


UNMATCHED_POLICIES = """\
# One policy that no bench caller matches: requests reserve and settle nothing.
policies:
  - name: bench-unmatched
    match: {teams: [nobody]}
    budgets:
      - {period: daily, usd: 1}
"""


def write_config(directory: Path, port: int, redis_url: str, upstream: str, *, access_log: bool = True,
                 budgets: bool = True) -> Path:
    """The gateway config (and its policy file) in `directory`; the options switch a feature off."""
    (directory / "policies.yaml").write_text(POLICIES if budgets else UNMATCHED_POLICIES)
    path = directory / "gateway.yaml"
    text = CONFIG.format(port=port, redis_url=redis_url, upstream=upstream)
    path.write_text(text if access_log else text.replace("access_log: true", "access_log: false"))
    return path


def gateway_env() -> dict[str, str]:
    env = dict(os.environ, BENCH_ADMIN_KEY=ADMIN_KEY, BENCH_CLIENT_KEY=CLIENT_KEY,
               BENCH_PROVIDER_KEY=PROVIDER_KEY)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its descendants (e.g. gateway workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:
                pass
    return pids


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` and its descendants, in clock ticks."""
    total = 0
    for each in tree_pids(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def memory_kb(pid: int, field_name: str) -> int:
    """Sum of a /proc/<pid>/status field (VmHWM, VmRSS) over `pid` and its descendants, in kB."""
    total = 0
    for each in tree_pids(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class Proc:
    """A process started by the bench (optionally under taskset), stopped by its PID only."""

    def __init__(self, name: str, command: list[str], *, cpus: str | None, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        prefix = ["taskset", "-c", cpus] if cpus else []
        with open(log_path, "ab") as sink:
            self.popen = subprocess.Popen([*prefix, *command], stdout=sink, stderr=sink, env=env, cwd=cwd,
                                          stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid            # taskset execs the command: same PID

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 8 s (the whole tree we started, by PID)."""
        if not self.alive():
            return
        family = tree_pids(self.pid)
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=8)
        except subprocess.TimeoutExpired:
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait(timeout=5)


def wait_ready(url: str, proc: Proc, timeout_s: float = 20.0) -> float:
    """Seconds until GET `url` answers 200; raises if the process dies or the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.log_path.read_text(errors='replace')[-1500:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout_s} s")


def wait_idle(procs: list[Proc], max_s: float = 6.0) -> None:
    """Until every process used at most one clock tick over 250 ms (so no backlog leaks into a run)."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        before = [cpu_ticks(p.pid) for p in procs]
        time.sleep(0.25)
        if all(cpu_ticks(p.pid) - b <= 1 for p, b in zip(procs, before)):
            return


# --------------------------------------------------------------------------- HTTP helpers

def http(method: str, url: str, *, body: bytes | None = None, key: str | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def mock_hits(mock_url: str) -> int:
    """Chat requests the mock has answered (its /__stats counters, or our mock's)."""
    _, _, raw = http("GET", mock_url + "/__stats")
    stats = json.loads(raw)
    if "chat" in stats:
        return int(stats["chat"]) + int(stats.get("chat_stream", 0))
    return int(stats.get("requests", stats.get("received", 0)))


@dataclass(frozen=True)
class Budget:
    """The team policy's daily counters: spent and reserved, USD in nano-USD."""

    window: str
    spent: tuple[int, int, int]              # usd_nano, tokens, requests
    reserved: tuple[int, int, int]

    def minus(self, before: Budget) -> tuple[int, int, int]:
        return tuple(a - b for a, b in zip(self.spent, before.spent))  # type: ignore[return-value]


def read_budget(gateway_url: str, patience_s: float = 5.0) -> Budget:
    """The team policy's daily counters; a 503 (store marked down for a moment) is retried for `patience_s`."""
    deadline = time.monotonic() + patience_s
    while True:
        status, _, raw = http("GET", f"{gateway_url}/v1/budget/status?policy={TEAM_POLICY}", key=ADMIN_KEY)
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if status != 200:
        raise RuntimeError(f"budget status answered {status}: {raw[:300]!r}")
    entries = {e["unit"]: e for e in json.loads(raw)["data"] if e["period"] == "daily"}

    def units(key: str) -> tuple[int, int, int]:
        usd = int(Decimal(str(entries["usd"][key])) * 1_000_000_000)
        return usd, int(entries["tokens"][key]), int(entries["requests"][key])

    return Budget(entries["usd"]["window_start"], units("spent"), units("reserved"))


def settled_budget(gateway_url: str, max_s: float = 10.0) -> Budget:
    """The budget once nothing is reserved any more (requests still settling after wrk stopped)."""
    deadline = time.monotonic() + max_s
    while True:
        budget = read_budget(gateway_url)
        if budget.reserved == (0, 0, 0) or time.monotonic() > deadline:
            return budget
        time.sleep(0.1)


class AccessLogCounter:
    """Counts the gateway's access-log lines for chat requests answered 200, from a byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def served_since_mark(self) -> int | None:
        """200 chat lines written since `mark()`; None when the lines cannot be read as JSON."""
        served, parsed = 0, 0
        with open(self.path, "rb") as log_file:
            log_file.seek(self.offset)
            for line in log_file:
                if not line.startswith(b"{"):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                parsed += 1
                served += record.get("path") == CHAT_PATH and record.get("status") == 200
        return served if parsed or served == 0 else None


# --------------------------------------------------------------------------- wrk

@dataclass
class Target:
    """Something wrk drives: a URL, the process whose CPU is charged to it, headers it needs."""

    name: str
    url: str
    proc: Proc
    headers: str = ""


@dataclass
class RunResult:
    """One wrk run against one target."""

    target: str
    scenario: str
    conc: int
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int                              # non-2xx + socket errors + timeouts
    cpu_ms_per_req: float
    core_busy: float
    loadgen_busy: float
    upstream_hits_per_req: float
    store_cpu_ms_per_req: float | None = None
    budget: dict[str, Any] = field(default_factory=dict)


def run_wrk(target: Target, body: Path, conc: int, duration: int, cpus: str | None, drain: int,
            timeout_s: int = 10) -> tuple[dict[str, Any], float]:
    """One bounded wrk run: `duration` s sending, then `drain` s in which the requests in flight finish.

    Returns wrk's BENCH_RESULT and the CPU seconds wrk itself used. With a drain, wrk's completed count
    is every request sent, so the gateway's budget must have moved by exactly that many requests.
    """
    env = dict(os.environ, BENCH_BODY=str(body), BENCH_HEADERS=target.headers)
    if drain:
        env["BENCH_ACTIVE_S"] = str(duration)
    prefix = ["taskset", "-c", cpus] if cpus else []
    command = [*prefix, "wrk", "-t1", f"-c{conc}", f"-d{duration + drain}s", f"--timeout={timeout_s}s",
               "-s", str(HERE / "post.lua"), target.url + CHAT_PATH]
    before = os.times()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + timeout_s + 15)
    after = os.times()
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            wrk_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
            return json.loads(line[len("BENCH_RESULT "):]), wrk_cpu
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")


def wrk_errors(wrk: dict[str, Any]) -> int:
    """Non-2xx answers, socket errors and timeouts of one wrk run."""
    return wrk["non2xx"] + wrk["connect_errors"] + wrk["read_errors"] + wrk["write_errors"] + wrk["timeouts"]


# --------------------------------------------------------------------------- the bench

class Bench:
    """Processes, targets and results of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out) if args.out else HERE / "results" / time.strftime("%Y%m%d-%H%M%S")
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.procs: list[Proc] = []
        self.targets: dict[str, Target] = {}
        self.results: list[RunResult] = []
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.unit: dict[str, tuple[int, int, int]] = {}
        self.startup_s: dict[str, float] = {}
        self.redis: Proc | None = None
        self.redis_url = ""
        self.mock_url = ""
        self.access_log: AccessLogCounter | None = None

    # --- start-up ---

    def start(self) -> None:
        args, cpu0, cpu1 = self.args, self.loadgen_cpus, self.sut_cpus
        py = sys.executable
        self.redis = self._spawn("redis", ["redis-server", "--port", str(port := free_port()), "--bind",
                                           "127.0.0.1", "--save", "", "--appendonly", "no",
                                           "--dir", str(self.out)], cpu0)
        self.redis_url = redis_url = f"redis://127.0.0.1:{port}"
        self._wait_redis(port)
        mock_port = free_port()
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        if args.own_mock:
            mock_cmd = [py, "-m", "gateway", "mock-upstream", "--port", str(mock_port)]
            self.notes.append("mock upstream: gateway mock-upstream (aiohttp), not bench/fast_upstream.py")
        else:
            mock_cmd = [py, str(HERE / "fast_upstream.py"), "--port", str(mock_port)]
        mock = self._spawn("mock", mock_cmd, cpu0, env=gateway_env())
        self.startup_s["mock"] = wait_ready(self.mock_url + "/__stats", mock)
        self.targets["direct"] = Target("direct", self.mock_url, mock)
        if "bare" in args.targets:
            self._start_bare(py, cpu1)
        if "gateway" in args.targets:
            self._start_gateway(py, cpu1, redis_url)

    def _start_bare(self, py: str, cpus: str | None, *, name: str = "bare", wrap: list[str] | None = None,
                    ready_s: float = 20.0) -> None:
        port = free_port()
        bare = self._spawn(name, [*(wrap or []), py, str(HERE / "bare_proxy.py"), "--port", str(port),
                                  "--upstream", self.mock_url], cpus)
        url = f"http://127.0.0.1:{port}"
        self.startup_s[name] = self._wait_post_ready(url, bare, ready_s)
        self.targets[name] = Target(name, url, bare)

    def _start_gateway(self, py: str, cpus: str | None, redis_url: str, *, name: str = "gateway",
                       wrap: list[str] | None = None, ready_s: float = 20.0, **config_options: bool) -> None:
        port = free_port()
        directory = self.out / name if config_options else self.out
        directory.mkdir(exist_ok=True)
        config = write_config(directory, port, redis_url, self.mock_url + "/v1", **config_options)
        command = [*(wrap or []), py, "-m", "gateway", "--log-level", "INFO", "run", "--config", str(config),
                   "--port", str(port)]
        if self.args.gateway_workers > 1:
            command += ["--workers", str(self.args.gateway_workers)]
        gateway = self._spawn(name, command, cpus, env=gateway_env(), cwd=directory)
        url = f"http://127.0.0.1:{port}"
        self.startup_s[name] = wait_ready(url + "/healthz", gateway, ready_s)
        self.targets[name] = Target(name, url, gateway, f"Authorization: Bearer {CLIENT_KEY}")
        self.access_log = AccessLogCounter(gateway.log_path)

    def _spawn(self, name: str, command: list[str], cpus: str | None, **kwargs: Any) -> Proc:
        proc = Proc(name, command, cpus=cpus, log_path=self.out / "logs" / f"{name}.log", **kwargs)
        self.procs.append(proc)
        return proc

    def _wait_redis(self, port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def _wait_post_ready(self, url: str, proc: Proc, ready_s: float = 20.0) -> float:
        """Readiness of a proxy without a health route: any HTTP answer to GET /__stats through it."""
        started = time.monotonic()
        while time.monotonic() - started < ready_s:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.log_path.read_text(errors='replace')[-1500:]}")
            try:
                http("GET", url + "/__stats", timeout=1)
                return time.monotonic() - started
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{proc.name} not ready")

    @property
    def loadgen_cpus(self) -> str | None:
        return None if self.args.no_pin else self.args.loadgen_cpus

    @property
    def sut_cpus(self) -> str | None:
        return None if self.args.no_pin else self.args.sut_cpus

    # --- checks ---

    def check_targets(self) -> None:
        """One request per target and scenario: 200, usage in the answer, exactly one upstream hit."""
        for scenario, body_path in self.scenarios.items():
            for target in list(self.targets.values()):
                problem = self._check_one(target, scenario, body_path)
                if problem:
                    self.failures.append(f"functional check {target.name}/{scenario}: {problem}")
                    log(f"FAIL {target.name}/{scenario}: {problem}")

    def _check_one(self, target: Target, scenario: str, body_path: Path) -> str | None:
        key = CLIENT_KEY if target.name == "gateway" else None
        hits = mock_hits(self.mock_url)
        before = read_budget(target.url) if target.name == "gateway" else None
        status, headers, raw = http("POST", target.url + CHAT_PATH, body=body_path.read_bytes(), key=key)
        if status != 200:
            return f"HTTP {status}: {raw[:200]!r}"
        usage = _usage_of(raw, scenario == "stream", headers)
        if usage is None:
            return "no usage in the answer (or no [DONE] in the stream)"
        if mock_hits(self.mock_url) - hits != 1 and target.name != "direct":
            return "the mock's hit counter did not move by exactly one"
        if before is not None:
            return self._check_unit(target, scenario, before, usage)
        return None

    def _check_unit(self, target: Target, scenario: str, before: Budget, usage: tuple[int, int]) -> str | None:
        """The gateway's unit cost from the status delta; it must equal the price of the mock's usage."""
        delta = settled_budget(target.url).minus(before)
        expected = (usage[0] * PRICE_NANO_PER_TOKEN[0] + usage[1] * PRICE_NANO_PER_TOKEN[1], sum(usage), 1)
        self.unit[scenario] = delta
        if delta != expected:
            return f"one request moved the budget by {delta}, expected {expected} from usage {usage}"
        return None

    def probe_metrics(self) -> None:
        gateway = self.targets.get("gateway")
        if gateway is None:
            return
        status, _, raw = http("GET", gateway.url + "/metrics", key=ADMIN_KEY)
        series = sum(1 for line in raw.splitlines() if line and not line.startswith(b"#"))
        self.notes.append(f"gateway /metrics: HTTP {status}, {series} samples" if status == 200
                          else f"gateway /metrics: HTTP {status} (metrics not served by this tree)")

    # --- measurement ---

    @property
    def scenarios(self) -> dict[str, Path]:
        return {name: SCENARIOS[name] for name in self.args.scenarios}

    def matrix(self) -> list[tuple[str, int]]:
        cells = [("chat", c) for c in self.args.concurrency if "chat" in self.args.scenarios]
        return cells + [("stream", c) for c in self.args.stream_concurrency if "stream" in self.args.scenarios]

    def warm_up(self) -> None:
        for scenario, body in self.scenarios.items():
            for target in self.targets.values():
                run_wrk(target, body, 16, self.args.warmup, self.loadgen_cpus, self.args.drain)
        self.idle()

    def idle(self) -> None:
        wait_idle([t.proc for t in self.targets.values()] + ([self.redis] if self.redis else []))

    def measure_all(self) -> None:
        order = [name for name in self.args.targets if name in self.targets]
        for scenario, conc in self.matrix():
            for round_no in range(1, self.args.rounds + 1):
                # every other round in reverse (A B, B A, ...): a drift of the machine's speed within a
                # cell falls on both targets alike
                for name in order if round_no % 2 else order[::-1]:
                    if self.out_of_time():
                        self.notes.append("stopped early: --max-wall reached")
                        return
                    self.results.append(self.measure(self.targets[name], scenario, conc, round_no))

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.args.max_wall

    def measure(self, target: Target, scenario: str, conc: int, round_no: int) -> RunResult:
        """One wrk run with CPU, upstream-hit and (for the gateway) budget accounting around it."""
        self.idle()
        is_gateway = target.name == "gateway"
        before_budget = read_budget(target.url) if is_gateway else None
        if is_gateway and self.access_log:
            self.access_log.mark()
        mock = self.targets["direct"].proc
        hits, ticks, mock_ticks = mock_hits(self.mock_url), cpu_ticks(target.proc.pid), cpu_ticks(mock.pid)
        store_ticks = cpu_ticks(self.redis.pid) if self.redis else 0
        wall = time.monotonic()
        wrk, wrk_cpu = run_wrk(target, self.scenarios[scenario], conc, self.args.duration, self.loadgen_cpus,
                               self.args.drain)
        wall = self.args.duration if self.args.drain else time.monotonic() - wall   # the sending window
        done = max(1, wrk["requests"])
        cpu_s = (cpu_ticks(target.proc.pid) - ticks) / CLK_TCK
        loadgen_s = wrk_cpu + (cpu_ticks(mock.pid) - mock_ticks) / CLK_TCK if target.name != "direct" else wrk_cpu + cpu_s
        result = RunResult(
            target=target.name, scenario=scenario, conc=conc, round=round_no,
            rps=wrk["requests"] / wall, p50_ms=wrk["p50_us"] / 1000, p99_ms=wrk["p99_us"] / 1000,
            requests=wrk["requests"], errors=wrk_errors(wrk),
            cpu_ms_per_req=cpu_s * 1000 / done, core_busy=cpu_s / wall, loadgen_busy=loadgen_s / wall,
            upstream_hits_per_req=(mock_hits(self.mock_url) - hits) / done)
        if is_gateway and before_budget is not None:
            result.store_cpu_ms_per_req = (cpu_ticks(self.redis.pid) - store_ticks) * 1000 / CLK_TCK / done \
                if self.redis else None
            result.budget = self.check_budget(before_budget, target, scenario, conc, wrk["requests"])
        if result.errors:
            self.failures.append(f"{target.name}/{scenario}/c={conc}/round {round_no}: {result.errors} "
                                 f"non-2xx or socket errors ({wrk})")
        log(f"{target.name:8} {scenario:6} c={conc:<3} r{round_no}: {result.rps:8,.0f} rps  "
            f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  {result.cpu_ms_per_req:.3f} CPU ms/req"
            + (f"  budget {result.budget['verdict']}" if result.budget else ""))
        return result

    def check_budget(self, before: Budget, target: Target, scenario: str, conc: int, completed: int) -> dict[str, Any]:
        """Spent moved by exactly the requests wrk completed, each at the unit cost; nothing left reserved.

        Exact only with a drain (no request cut off when wrk stops); without one, a request in flight may be
        charged (up to its worst case) without wrk counting it, so only bounds are checked.
        """
        after = settled_budget(target.url)
        delta = after.minus(before)
        left = tuple(a - b for a, b in zip(after.reserved, before.reserved))
        served = self.access_log.served_since_mark() if self.access_log else None
        unit = self.unit.get(scenario)
        charged = delta[2]
        if after.window != before.window:
            return {"verdict": "skipped (the daily window rolled over)", "delta": delta}
        problems = [] if left == (0, 0, 0) else [f"reservations left behind (usd_nano, tokens, requests): {left}"]
        if unit is None:
            problems.append("no unit cost measured")
        elif self.args.drain:
            expected = (completed * unit[0], completed * unit[1], completed)
            if delta != expected:
                problems.append(f"spent moved by {delta}, expected {expected} = {completed} completed x unit {unit}"
                                + (" (requests cut off by wrk? try a longer --drain)" if charged > completed else ""))
            if served is not None and served != completed:
                problems.append(f"{served} chat 200s in the access log, wrk completed {completed}")
        elif not (completed <= charged <= completed + conc and delta[0] >= completed * unit[0]):
            problems.append(f"{charged} requests charged ({delta}), wrk completed {completed}, {conc} connections")
        verdict = "exact" if not problems else "MISMATCH: " + "; ".join(problems)
        if problems:
            self.failures.append(f"budget {scenario}/c={conc}: {verdict}")
        return {"verdict": verdict, "delta": delta, "left_reserved": left, "served_logged": served,
                "completed_wrk": completed, "charged_not_read_by_wrk": charged - completed}

    # --- soak ---

    def soak(self, total: int) -> dict[str, Any]:
        """Drive the gateway (chat, --soak-conc) until `total` requests; RSS after 50k vs after `total`."""
        target = self.targets["gateway"]
        body, conc, done = self.scenarios.get("chat", SCENARIOS["chat"]), self.args.soak_conc, 0
        before = read_budget(target.url)
        samples: list[tuple[int, int]] = []
        baseline: tuple[int, int] | None = None
        deadline = time.monotonic() + self.args.soak_max_s
        served = 0
        while done < total and time.monotonic() < deadline:
            assert self.access_log is not None
            self.access_log.mark()
            seconds = 5 if baseline is None else 20
            wrk, _ = run_wrk(target, body, conc, seconds, self.loadgen_cpus, self.args.drain)
            done += wrk["requests"]
            errors = wrk_errors(wrk)
            if errors:
                self.failures.append(f"soak: {errors} non-2xx or socket errors after {done} requests")
            settled_budget(target.url)
            served += self.access_log.served_since_mark() or 0
            _truncate(self.access_log.path)       # keep the log file small over a million lines
            rss = memory_kb(target.proc.pid, "VmRSS")
            samples.append((done, rss))
            if baseline is None and done >= SOAK_BASELINE:
                baseline = (done, rss)
            log(f"soak: {done:,} requests, RSS {rss / 1024:.1f} MiB")
        return self._soak_verdict(total, done, samples, baseline, before, served, len(samples) * conc)

    def _soak_verdict(self, total: int, done: int, samples: list[tuple[int, int]], baseline: tuple[int, int] | None,
                      before: Budget, served: int, in_flight_max: int) -> dict[str, Any]:
        final = samples[-1] if samples else (0, 0)
        after = settled_budget(self.targets["gateway"].url)
        delta = after.minus(before)
        unit = self.unit["chat"]
        budget_ok = after.reserved == before.reserved and (
            delta == (done * unit[0], done * unit[1], done) if self.args.drain
            else done <= delta[2] <= done + in_flight_max)
        growth = (final[1] - baseline[1]) / baseline[1] if baseline else None
        verdict = {
            "requests": done, "target": total, "completed": done >= total,
            "rss_after_baseline_kb": baseline, "rss_final_kb": final, "growth": growth,
            "rss_ok": growth is not None and abs(growth) <= SOAK_TOLERANCE,
            "budget_exact": budget_ok, "budget_delta": delta, "served_logged": served,
            "samples": samples, "vmhwm_kb": memory_kb(self.targets["gateway"].proc.pid, "VmHWM"),
        }
        if not verdict["completed"]:
            self.failures.append(f"soak: only {done:,} of {total:,} requests within --soak-max-s")
        if not verdict["rss_ok"]:
            self.failures.append(f"soak: RSS growth {growth} beyond {SOAK_TOLERANCE:.0%}")
        if not budget_ok:
            self.failures.append(f"soak: budget moved by {delta} for {done} completed requests, unit {unit}, "
                                 f"reserved {before.reserved} -> {after.reserved}")
        return verdict

    # --- instructions ---

    def instructions(self) -> list[dict[str, Any]]:
        """Instructions per chat request at 16 connections, counted by callgrind: a figure machine noise cannot
        move. The bare proxy, the gateway, and the gateway with one feature off each (what that feature costs)."""
        rows = []
        for name in self.args.instruction_targets:   # each bounded: start-up, then two bounded wrk runs
            rows.append(self._count_instructions(name, INSTRUCTION_TARGETS[name]))
        return rows

    def _count_instructions(self, name: str, options: dict[str, bool]) -> dict[str, Any]:
        """Start `name` under callgrind, warm it up, count the instructions of one wrk run, stop it."""
        dump = self.out / "callgrind" / f"{name}.out"
        dump.parent.mkdir(exist_ok=True)
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}"]
        if name == "bare":
            self._start_bare(sys.executable, self.sut_cpus, wrap=wrap, ready_s=CALLGRIND_READY_S)
        else:
            self._start_gateway(sys.executable, self.sut_cpus, self.redis_url, name=name, wrap=wrap,
                                ready_s=CALLGRIND_READY_S, **options)
        target = self.targets[name]
        body, seconds = SCENARIOS["chat"], max(self.args.duration, CALLGRIND_MIN_S)
        run_wrk(target, body, 16, self.args.warmup, self.loadgen_cpus, self.args.drain, timeout_s=30)
        wait_idle([target.proc], max_s=20)
        _callgrind_control("-z", target.proc.pid)      # count from here: no start-up, no warm-up
        wrk, _ = run_wrk(target, body, 16, seconds, self.loadgen_cpus, self.args.drain, timeout_s=30)
        wait_idle([target.proc], max_s=20)
        _callgrind_control("-d", target.proc.pid)
        instructions = _callgrind_summary(dump)
        target.proc.stop()
        del self.targets[name]
        errors = wrk_errors(wrk)
        if errors:
            self.failures.append(f"instructions {name}: {errors} non-2xx or socket errors ({wrk})")
        per_request = instructions / max(1, wrk["requests"])
        log(f"{name:24} {wrk['requests']:6,} requests  {per_request:12,.0f} instructions/request")
        return {"target": name, "requests": wrk["requests"], "instructions": instructions,
                "per_request": per_request}

    # --- profile ---

    def profile(self) -> dict[str, Any]:
        """py-spy (non-blocking, no idle frames) on the gateway during a chat c=16 and a stream c=16 run."""
        py_spy = self.args.py_spy or shutil.which("py-spy")
        if not py_spy:
            self.notes.append("profile skipped: py-spy not found (pip install py-spy, or --py-spy PATH)")
            return {}
        report = {}
        for scenario in self.scenarios:
            raw = self.out / f"profile-{scenario}.txt"
            seconds = self.args.duration + 2
            spy = subprocess.Popen([py_spy, "record", "--pid", str(self.targets["gateway"].proc.pid),
                                    "--duration", str(seconds), "--rate", "250", "--nonblocking",
                                    "--format", "raw", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=open(self.out / "logs" / "py-spy.log", "ab"))
            time.sleep(0.5)
            self.results.append(self.measure(self.targets["gateway"], scenario, 16, 0))
            spy.wait(timeout=seconds + 30)
            if raw.exists():
                report[scenario] = top_frames(raw)
        return report

    # --- output ---

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def _callgrind_control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=120)


def _callgrind_summary(dump: Path) -> int:
    """Instructions counted in the latest dump written for `dump` (callgrind numbers them <dump>.1, .2, ...)."""
    numbered = [path for path in dump.parent.glob(dump.name + ".*") if path.suffix[1:].isdigit()]
    latest = max(numbered, key=lambda path: int(path.suffix[1:]))
    for line in latest.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {latest}")


def _truncate(path: Path) -> None:
    with open(path, "r+b") as log_file:
        log_file.truncate(0)


def _usage_of(raw: bytes, stream: bool, headers: dict[str, str]) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an answer; None when it has no usage."""
    try:
        if not stream:
            usage = json.loads(raw)["usage"]
            return usage["prompt_tokens"], usage["completion_tokens"]
        if "text/event-stream" not in headers.get("Content-Type", "") or not raw.rstrip().endswith(b"data: [DONE]"):
            return None
        for line in raw.splitlines():
            if line.startswith(b"data: {") and b'"usage":{' in line.replace(b" ", b""):
                usage = json.loads(line[6:])["usage"]
                return usage["prompt_tokens"], usage["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
    return None


PROFILE_GROUPS = (   # a sample belongs to the group of the innermost frame that matches a marker
    ("budget store: reserve + settle (gateway/budget, redis-py)", ("redis/", "gateway/budget/")),
    ("upstream call: dispatch, retries, breaker, aiohttp client",
     ("gateway/proxy/dispatch", "gateway/resilience/", "gateway/proxy/providers", "tenacity/", "aiohttp/client",
      "aiohttp/connector")),
    ("relay of the answer (JSON or SSE)", ("gateway/proxy/relay",)),
    ("metrics (gateway/metrics, prometheus_client)", ("gateway/metrics/", "prometheus_client/")),
    ("access log (record, JSON line, logging)", ("gateway/access_log", "logging/")),
    ("rest of the handler: auth, parse, plan, middleware", ("gateway/",)),
    ("aiohttp server: parse, route, write responses", ("aiohttp/web", "aiohttp/http_parser", "aiohttp/_http",
                                                        "aiohttp/helpers", "aiohttp/streams", "aiohttp/base_protocol")),
)


def top_frames(raw: Path, limit: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Shares of the sampled CPU time: per component (PROFILE_GROUPS) and per function (self time)."""
    own: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, frames = int(count_text), stack.split(";")
        total += count
        own[_frame_name(frames[-1])] += count
        groups[_group_of(frames)] += count
    share = lambda counter: [(name, round(100 * n / total, 1)) for name, n in counter.most_common(limit)]  # noqa: E731
    return {"samples": [("total", total)], "groups": share(groups), "self": share(own)}


def _group_of(frames: list[str]) -> str:
    if frames[-1].startswith("run_app "):
        return "event loop: uvloop C code and socket syscalls (no Python frame)"
    for frame in reversed(frames):
        for label, markers in PROFILE_GROUPS:
            if any(marker in frame for marker in markers):
                return label
    return "other (asyncio, stdlib)"


def _frame_name(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)': one row per function, not per line."""
    name, _, where = frame.partition(" (")
    file_name = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file_name:
            file_name = file_name.split(marker, 1)[1]
    return f"{name} ({file_name})" if where else name


# --------------------------------------------------------------------------- summary

def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarize(bench: Bench, extra: dict[str, Any]) -> str:
    results = [r for r in bench.results if r.round > 0]
    runs = (f"each target under callgrind, one wrk run of {max(bench.args.duration, CALLGRIND_MIN_S)} s after "
            f"{bench.args.warmup} s of warm-up" if bench.args.instructions else
            f"wrk {bench.args.duration} s (+{bench.args.drain} s drain) x {bench.args.rounds} interleaved rounds "
            "per cell")
    lines = [f"# gateway bench {bench.out.name}", "",
             f"Command: `{' '.join(['bench/run.sh', *sys.argv[2:]])}`; {runs}; load side on CPU "
             f"{bench.loadgen_cpus}, SUT on CPU {bench.sut_cpus}; {time.monotonic() - bench.started:.0f} s in all.", ""]
    if results:
        lines += _results_table(results) + [""] + _ratio_table(results) + [""] + _targets_table(results) + [""]
    lines += _memory_table(bench) + [""]
    if bench.unit:
        lines.append("Unit cost per request (from one request's budget delta, = mock usage x price): "
                     + "; ".join(f"{s}: {u[0]} nano-USD, {u[1]} tokens" for s, u in bench.unit.items()))
    budget = [r for r in results if r.budget]
    if budget:
        exact = sum(r.budget["verdict"] == "exact" for r in budget)
        slack = [r.budget.get("charged_not_read_by_wrk", 0) for r in budget]
        rule = ("spent requests = wrk's completed requests = chat 200s in the access log; USD and tokens = "
                "that x unit cost; no reservation left behind" if bench.args.drain else
                "completed <= charged <= completed + connections (no --drain: wrk cuts requests off)")
        lines.append(f"Budget checks: {exact}/{len(budget)} gateway runs exact ({rule}); charged minus completed: "
                     f"{min(slack)} to {max(slack)} per run.")
    if "soak" in extra:
        lines += ["", _soak_text(extra["soak"])]
    if extra.get("instructions"):
        lines += [""] + _instructions_table(extra["instructions"])
    if extra.get("profile"):
        lines += [""] + _profile_text(extra["profile"])
    lines += [""] + [f"- note: {n}" for n in bench.notes]
    lines += [f"- FAILURE: {f}" for f in bench.failures] or ["- every check passed"]
    return "\n".join(lines) + "\n"


def _cells(results: list[RunResult]) -> dict[tuple[str, int, str], list[RunResult]]:
    cells: dict[tuple[str, int, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.scenario, r.conc, r.target), []).append(r)
    return cells


def _results_table(results: list[RunResult]) -> list[str]:
    rows = ["| scenario | conc | target | RPS (min-max) | p50 ms | p99 ms | SUT CPU ms/req | SUT core busy "
            "| loadgen CPU busy | upstream hits/req | Redis CPU ms/req | non-2xx+sock errs |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (scenario, conc, target), runs in _cells(results).items():
        rps = [r.rps for r in runs]
        store = [r.store_cpu_ms_per_req for r in runs if r.store_cpu_ms_per_req is not None]
        rows.append(
            f"| {scenario} | {conc} | {target} | {mean(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
            f"| {mean([r.p50_ms for r in runs]):.2f} | {mean([r.p99_ms for r in runs]):.2f} "
            f"| {mean([r.cpu_ms_per_req for r in runs]):.3f} | {mean([r.core_busy for r in runs]):.0%} "
            f"| {mean([r.loadgen_busy for r in runs]):.0%} | {mean([r.upstream_hits_per_req for r in runs]):.3f} "
            f"| {f'{mean(store):.3f}' if store else '-'} | {sum(r.errors for r in runs)} |")
    return rows


def _same_round_pairs(cells: dict[tuple[str, int, str], list[RunResult]], scenario: str,
                      conc: int) -> list[tuple[RunResult, RunResult]]:
    """(gateway, bare) runs of one cell that belong to the same interleaved round."""
    bare = {r.round: r for r in cells.get((scenario, conc, "bare"), [])}
    return [(g, bare[g.round]) for g in cells.get((scenario, conc, "gateway"), []) if g.round in bare]


def _pair_ratios(pairs: list[tuple[RunResult, RunResult]], attr: str) -> list[float]:
    return [getattr(g, attr) / getattr(b, attr) for g, b in pairs]


def _pair_additions(pairs: list[tuple[RunResult, RunResult]], attr: str) -> list[float]:
    return [getattr(g, attr) - getattr(b, attr) for g, b in pairs]


# A round's gateway and bare runs are seconds apart, so their ratio is what machine noise moves least; a
# round that a noisy neighbour hit is an outlier of its cell, which the median of the rounds discounts.
def _pair_ratio(pairs: list[tuple[RunResult, RunResult]], attr: str) -> float:
    return statistics.median(_pair_ratios(pairs, attr))


def _pair_added(pairs: list[tuple[RunResult, RunResult]], attr: str) -> float:
    return statistics.median(_pair_additions(pairs, attr))


def _spread(values: list[float], fmt: str) -> str:
    """'mean M, rounds a / b / c' of per-round figures."""
    return f"mean {mean(values):{fmt}}, rounds " + " / ".join(f"{value:{fmt}}" for value in values)


def _ratio_table(results: list[RunResult]) -> list[str]:
    cells = _cells(results)
    rows = ["Gateway against bare: each figure is the median of the rounds' paired figures.", "",
            "| scenario | conc | gateway/bare RPS | gateway/bare p50 | gateway/bare p99 | gateway/bare CPU ms/req "
            "| added p50 ms | added p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scenario, conc, target in cells:
        if target != "gateway":
            continue
        matched = _same_round_pairs(cells, scenario, conc)
        if not matched:
            continue
        ratio = lambda attr: _pair_ratio(matched, attr)  # noqa: E731
        added = lambda attr: _pair_added(matched, attr)  # noqa: E731
        rows.append(f"| {scenario} | {conc} | {ratio('rps'):.2f} | {ratio('p50_ms'):.2f} | {ratio('p99_ms'):.2f} "
                    f"| {ratio('cpu_ms_per_req'):.2f} | {added('p50_ms'):+.2f} | {added('p99_ms'):+.2f} |")
    return rows


# The performance targets (issue 6), judged from the same run's interleaved pairs.
TARGETS = (("chat", 16, "RPS >= 0.5 x bare", "rps", lambda ratio, added: ratio >= 0.5),
           ("stream", 16, "RPS >= 0.5 x bare", "rps", lambda ratio, added: ratio >= 0.5),
           ("chat", 1, "p50 <= bare p50 + 0.3 ms", "p50_ms", lambda ratio, added: added <= 0.3))


def _targets_table(results: list[RunResult]) -> list[str]:
    """Each target's figure in this run and whether it is met (a report, not a check that fails the run)."""
    cells = _cells(results)
    rows = ["| target | figure (median of the rounds) | met | per round |", "|---|---:|---|---|"]
    for scenario, conc, name, attr, met in TARGETS:
        matched = _same_round_pairs(cells, scenario, conc)
        if not matched:
            continue
        ratios, additions = _pair_ratios(matched, attr), _pair_additions(matched, attr)
        ratio, added = statistics.median(ratios), statistics.median(additions)
        if attr == "rps":
            figure, spread = f"{ratio:.2f} x", _spread(ratios, ".2f")
        else:
            figure, spread = f"{added:+.2f} ms", _spread(additions, "+.2f")
        by_median, by_mean = met(ratio, added), met(mean(ratios), mean(additions))
        verdict = ("yes" if by_median else "NO") + ("" if by_mean == by_median else
                                                    f" (by the mean: {'yes' if by_mean else 'NO'})")
        rows.append(f"| {scenario} c={conc}: {name} | {figure} | {verdict} | {spread} |")
    return rows


def _memory_table(bench: Bench) -> list[str]:
    rows = ["| target | process | startup s | peak RSS (VmHWM) MiB | RSS at end MiB |", "|---|---|---:|---:|---:|"]
    for name, target in bench.targets.items():
        process = "mock upstream" if name == "direct" else name
        rows.append(f"| {name} | {process} | {bench.startup_s.get(name if name != 'direct' else 'mock', 0):.1f} "
                    f"| {memory_kb(target.proc.pid, 'VmHWM') / 1024:.1f} | {memory_kb(target.proc.pid, 'VmRSS') / 1024:.1f} |")
    if bench.redis:
        rows.append(f"| (store) | redis-server | - | {memory_kb(bench.redis.pid, 'VmHWM') / 1024:.1f} "
                    f"| {memory_kb(bench.redis.pid, 'VmRSS') / 1024:.1f} |")
    return rows


def _instructions_table(rows: list[dict[str, Any]]) -> list[str]:
    bare = next((row["per_request"] for row in rows if row["target"] == "bare"), None)
    lines = ["Instructions per chat request at 16 connections (callgrind; user space, every thread; the kernel's "
             "share is not counted):", "", "| target | requests counted | instructions / request | x bare |",
             "|---|---:|---:|---:|"]
    for row in rows:
        ratio = f"{row['per_request'] / bare:.2f}" if bare else "-"
        lines.append(f"| {row['target']} | {row['requests']:,} | {row['per_request']:,.0f} | {ratio} |")
    return lines


def _soak_text(soak: dict[str, Any]) -> str:
    base, final = soak["rss_after_baseline_kb"], soak["rss_final_kb"]
    if base is None:
        return f"Soak: only {soak['requests']:,} requests, no 50,000 baseline."
    return (f"Soak: {soak['requests']:,} requests (target {soak['target']:,}); RSS {base[1] / 1024:.1f} MiB after "
            f"{base[0]:,}, {final[1] / 1024:.1f} MiB after {final[0]:,} ({soak['growth']:+.1%}, limit "
            f"{SOAK_TOLERANCE:.0%}: {'ok' if soak['rss_ok'] else 'FAIL'}); peak {soak['vmhwm_kb'] / 1024:.1f} MiB; "
            f"budget {'exact' if soak['budget_exact'] else 'MISMATCH'} ({soak['served_logged']:,} served).")


def _profile_text(profile: dict[str, Any]) -> list[str]:
    lines = []
    for scenario, frames in profile.items():
        lines += [f"Profile {scenario} c=16 (py-spy --nonblocking, {frames['samples'][0][1]} samples; % of the "
                  "gateway's CPU samples):", "", "| component | % | | top function (self) | % |", "|---|---:|---|---|---:|"]
        for index in range(max(len(frames["groups"]), 12)):
            group = frames["groups"][index] if index < len(frames["groups"]) else ("", "")
            own = frames["self"][index] if index < len(frames["self"]) else ("", "")
            lines.append(f"| {group[0]} | {group[1]} | | `{own[0]}` | {own[1]} |")
        lines.append("")
    return lines


# --------------------------------------------------------------------------- entry points

def cmd_run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # run the cleanup below on `timeout`
    bench = Bench(args)
    extra: dict[str, Any] = {}
    try:
        log(f"results in {bench.out}")
        if args.instructions:
            unknown = set(args.instruction_targets) - set(INSTRUCTION_TARGETS)
            if unknown:
                raise SystemExit(f"bench: unknown --instruction-targets {', '.join(sorted(unknown))}")
            # Only the store and the mock start here; each target starts under callgrind, one process.
            args.targets, args.gateway_workers = [], 1
            bench.start()
            extra["instructions"] = bench.instructions()
        else:
            bench.start()
            bench.check_targets()
            bench.probe_metrics()
            bench.warm_up()
            if args.soak:
                extra["soak"] = bench.soak(args.soak)
            else:
                bench.measure_all()
                if args.profile:
                    extra["profile"] = bench.profile()
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        bench.failures.append(f"run aborted: {type(exc).__name__}: {exc}")
    finally:
        peak = {name: memory_kb(t.proc.pid, "VmHWM") for name, t in bench.targets.items()}
        summary = summarize(bench, extra)
        bench.stop()
    (bench.out / "summary.md").write_text(summary)
    (bench.out / "results.json").write_text(json.dumps(
        {"args": vars(args), "results": [asdict(r) for r in bench.results], "unit": bench.unit, "peak_rss_kb": peak,
         "notes": bench.notes, "failures": bench.failures, **extra}, indent=1, default=str))
    print(summary)
    return 1 if bench.failures else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Exec the gateway with the bench config on --port, for another harness to drive."""
    directory = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    upstream = args.upstream.rstrip("/")
    upstream = upstream if upstream.endswith("/v1") else upstream + "/v1"
    config = write_config(directory, args.port, args.redis_url, upstream)
    command = [sys.executable, "-m", "gateway", "run", "--config", str(config), "--port", str(args.port)]
    if args.workers > 1:
        command += ["--workers", str(args.workers)]
    os.chdir(directory)
    os.execve(sys.executable, command, gateway_env())
    return 0  # not reached


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def csv_names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the benchmark (default matrix, or --soak N)")
    run.add_argument("--targets", type=csv_names, default=["direct", "bare", "gateway"],
                     help="interleaving order (default direct,bare,gateway)")
    run.add_argument("--scenarios", type=csv_names, default=["chat", "stream"])
    run.add_argument("--concurrency", type=csv_ints, default=[1, 16, 64], help="chat connections")
    run.add_argument("--stream-concurrency", type=csv_ints, default=[16], help="stream connections")
    run.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    run.add_argument("--rounds", type=int, default=4,
                     help="interleaved rounds per cell; every other one in reverse order, so keep it even")
    run.add_argument("--warmup", type=int, default=2, help="seconds of wrk per target and scenario before")
    run.add_argument("--drain", type=int, default=1,
                     help="seconds after each run's --duration in which wrk sends nothing new and the requests "
                          "in flight finish (0: wrk cuts them off, so budget checks can only be bounds)")
    run.add_argument("--max-wall", type=float, default=420, help="start no new run after this many seconds")
    run.add_argument("--loadgen-cpus", default="0", help="wrk, mock upstream and redis-server")
    run.add_argument("--sut-cpus", default="1", help="the bare proxy and the gateway")
    run.add_argument("--no-pin", action="store_true", help="no taskset")
    run.add_argument("--gateway-workers", type=int, default=1, help="gateway run --workers N")
    run.add_argument("--own-mock", action="store_true", help="use `gateway mock-upstream`, not bench/fast_upstream.py")
    run.add_argument("--soak", type=int, metavar="N", help="soak instead of the matrix: N gateway requests")
    run.add_argument("--soak-conc", type=int, default=16)
    run.add_argument("--soak-max-s", type=float, default=1800, help="stop the soak after this many seconds")
    run.add_argument("--instructions", action="store_true",
                     help="instead of the matrix: instructions per request under callgrind (valgrind), for the bare "
                          "proxy, the gateway and the gateway without its access log or budgets (~6 min)")
    run.add_argument("--instruction-targets", type=csv_names, default=list(INSTRUCTION_TARGETS),
                     help=f"what --instructions counts (default {','.join(INSTRUCTION_TARGETS)})")
    run.add_argument("--profile", action="store_true", help="py-spy the gateway under load after the matrix")
    run.add_argument("--py-spy", help="path of the py-spy binary (default: on PATH)")
    run.add_argument("--out", help="results folder (default bench/results/<stamp>)")
    run.set_defaults(func=cmd_run)
    serve = sub.add_parser("serve", help="run the gateway alone with the bench config")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--upstream", required=True, help="mock upstream base URL")
    serve.add_argument("--redis-url", required=True)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=cmd_serve)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
