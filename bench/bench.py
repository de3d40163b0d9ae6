#!/usr/bin/env python3
"""Load test of the gateway against a bare pass-through proxy, on loopback, in one run.

Everything it runs is in this folder or installed by run.sh: a clone reproduces the README's figures.
What one run does (`bench/run.sh`, which calls `bench.py run`):
1. starts a redis-server (own free port, no persistence), the fast mock upstream (fast_upstream.py,
   raw asyncio; `--own-mock`: `gateway mock-upstream`), the bare aiohttp pass-through proxy
   (bare_proxy.py: the reference) and the gateway with a realistic config (gateway_config.py: two
   budget policies on Redis, retries, breaker, metrics as built, access log to logs/gateway.log);
   with `--baseline REF` also `gateway-base`, the gateway of git ref REF (baseline.py), and
   `gateway-<variant>` targets run a config variant of gateway_config.py; each gateway target has
   its own Redis database;
2. checks each target: one request per scenario answers 200 with usage and reaches the mock
   exactly once; measures the gateway's unit cost (budget status delta of that one request);
3. warms every target up, then for each scenario and concurrency runs every target in interleaved
   rounds with wrk (`post.lua`), every other round in reverse order: wrk and the mock (and Redis)
   pinned to --loadgen-cpus, each proxy to --sut-cpus; gateway/bare (and gateway/gateway-base)
   figures are the median of the rounds' paired figures (two targets' runs of the same round);
4. after each gateway run checks the budget: spent requests moved by exactly the number of 200s the
   gateway logged, which is between wrk's completed count and that plus the connections in flight
   when wrk stopped; spent USD and tokens moved by exactly requests x unit cost; nothing is left
   reserved; and wrk saw no non-2xx answer and no socket error;
5. prints and writes results/<stamp>/summary.md and results.json (report.py).

`--soak N` instead drives the gateway alone until N requests (bounded by --soak-max-s) and checks
that its RSS after N requests is within 10 % of its RSS after the first 50,000.
`--instructions` instead counts, under callgrind, the instructions per request of each --scenarios (16 connections) of
the bare proxy, the gateway, the gateway with its access log or its budgets off and (with --baseline)
gateway-base: a figure that the noise of a shared machine cannot move, and what each feature costs.
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
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import baseline
from gateway_config import (ADMIN_KEY, BASELINE, CLIENT_KEY, GATEWAY, TEAM_POLICY, VARIANTS, gateway_env, target_name,
                            variant_of, write_config)
from procs import CLK_TCK, Proc, cpu_ticks, free_port, log, memory_kb, wait_idle, wait_ready
from profiles import CALLGRIND_MIN_S, CALLGRIND_READY_S, callgrind_control, callgrind_summary, top_frames
from report import RunResult, summarize

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHAT_PATH = "/v1/chat/completions"
SCENARIOS = {"chat": HERE / "payloads" / "chat.json", "stream": HERE / "payloads" / "chat_stream.json"}
PRICE_NANO_PER_TOKEN = (150, 600)        # gpt-4o-mini: 0.15 / 0.60 USD per 1M tokens, in nano-USD
SOAK_BASELINE = 50_000
SOAK_TOLERANCE = 0.10
MAX_WALL_PER_TARGET_S = 140.0            # the default matrix takes ~110 s of runs per target
REDIS_DATABASES = 16                     # redis-server's default: one per gateway target at most


# --------------------------------------------------------------------------- HTTP helpers

def http(method: str, url: str, *, body: bytes | None = None, key: str | None = None,
         timeout: float = 10.0, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one request (an HTTP error status is an answer, not an exception)."""
    headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
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
    """Something wrk drives: a URL, the process whose CPU is charged to it, headers it needs.

    A gateway target also has a client key, and what can be checked after each of its runs: its budget
    (when the team policy applies) and its access log's chat 200 lines (when the log is on).
    """

    name: str
    url: str
    proc: Proc
    headers: str = ""
    key: str | None = None
    budgeted: bool = False
    access_log: AccessLogCounter | None = None
    cached: bool = False                    # answered from the response cache after its first request
    unique: bool = False                    # its client makes every body unique (see post.lua BENCH_UNIQUE)

    @property
    def is_gateway(self) -> bool:
        return self.key is not None


def run_wrk(target: Target, body: Path, conc: int, duration: int, cpus: str | None, drain: int,
            timeout_s: int = 10) -> tuple[dict[str, Any], float]:
    """One bounded wrk run: `duration` s sending, then `drain` s in which the requests in flight finish.

    Returns wrk's BENCH_RESULT and the CPU seconds wrk itself used. With a drain, wrk's completed count
    is every request sent, so the gateway's budget must have moved by exactly that many requests.
    """
    env = dict(os.environ, BENCH_BODY=str(body), BENCH_HEADERS=target.headers)
    if target.unique:
        env["BENCH_UNIQUE"] = os.urandom(8).hex()      # this run's bodies were never sent before
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


def _truncate(path: Path) -> None:
    """Empty the file at `path` (the soak keeps the gateway's log small)."""
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
        self.redis_port = 0
        self.mock_url = ""
        self.checkout: baseline.Checkout | None = None
        self.databases: dict[str, int] = {}      # gateway target -> its Redis database number
        self.builds: dict[str, str] = {}         # gateway target -> which code it runs, for the summary

    # --- start-up ---

    def start(self) -> None:
        """Redis, the mock upstream and every target of --targets (none with --instructions)."""
        args, py = self.args, sys.executable
        if args.baseline:
            self.checkout = baseline.check_out(REPO, args.baseline, self.out / "baseline")
        self.redis = self._spawn("redis", ["redis-server", "--port", str(port := free_port()), "--bind",
                                           "127.0.0.1", "--save", "", "--appendonly", "no",
                                           "--dir", str(self.out)], self.loadgen_cpus)
        self.redis_url = f"redis://127.0.0.1:{port}"
        self.redis_port = port
        self._wait_redis(port)
        mock_port = free_port()
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        if args.own_mock:
            mock_cmd = [py, "-m", "gateway", "mock-upstream", "--port", str(mock_port)]
            self.notes.append("mock upstream: gateway mock-upstream (aiohttp), not bench/fast_upstream.py")
        else:
            mock_cmd = [py, str(HERE / "fast_upstream.py"), "--port", str(mock_port)]
        mock = self._spawn("mock", mock_cmd, self.loadgen_cpus, env=gateway_env(REPO))
        self.startup_s["mock"] = wait_ready(self.mock_url + "/__stats", mock)
        self.targets["direct"] = Target("direct", self.mock_url, mock)
        for name in args.targets:
            if name == "bare":
                self._start_bare(py, self.sut_cpus)
            elif variant_of(name):
                self._start_gateway(name, self.sut_cpus)

    def _start_bare(self, py: str, cpus: str | None, *, name: str = "bare", wrap: list[str] | None = None,
                    ready_s: float = 20.0) -> None:
        port = free_port()
        bare = self._spawn(name, [*(wrap or []), py, str(HERE / "bare_proxy.py"), "--port", str(port),
                                  "--upstream", self.mock_url], cpus)
        url = f"http://127.0.0.1:{port}"
        self.startup_s[name] = self._wait_post_ready(url, bare, ready_s)
        self.targets[name] = Target(name, url, bare)

    def _start_gateway(self, name: str, cpus: str | None, *, wrap: list[str] | None = None,
                       ready_s: float = 20.0) -> None:
        """Gateway target `name`: its variant's config in out/<name>/, its own Redis database, its build."""
        directory, port = self.out / name, free_port()
        directory.mkdir(exist_ok=True)
        database = self.databases.setdefault(name, len(self.databases))
        if database >= REDIS_DATABASES:
            raise RuntimeError(f"more than {REDIS_DATABASES} gateway targets: no Redis database left for {name}")
        written = write_config(directory, port, f"{self.redis_url}/{database}", self.mock_url + "/v1",
                               variant_of(name) or "default")
        env = gateway_env(self._source(name))
        self.builds[name] = f"{self._build_of(name, env, directory)}, Redis database {database}"
        command = [*(wrap or []), sys.executable, "-m", "gateway", "--log-level", "INFO", "run",
                   "--config", str(written.path), "--port", str(port)]
        if self.args.gateway_workers > 1:
            command += ["--workers", str(self.args.gateway_workers)]
        gateway = self._spawn(name, command, cpus, env=env, cwd=directory)
        url = f"http://127.0.0.1:{port}"
        self.startup_s[name] = wait_ready(url + "/healthz", gateway, ready_s)
        headers = "\n".join([f"Authorization: Bearer {CLIENT_KEY}", *(f"{k}: {v}" for k, v in written.headers)])
        self.targets[name] = Target(name, url, gateway, headers, key=CLIENT_KEY,
                                    budgeted=written.budgeted,
                                    access_log=AccessLogCounter(gateway.log_path) if written.access_log else None,
                                    cached=written.cached, unique=written.unique)

    def _build_of(self, name: str, env: dict[str, str], directory: Path) -> str:
        """Which code target `name` runs, once checked that its gateway package is imported from its source."""
        source = self._source(name).resolve()
        imported = baseline.imported_from(sys.executable, env, directory)
        if imported != source:
            raise RuntimeError(f"{name} would import the gateway from {imported}, not {source}")
        variant = variant_of(name)
        build = (f"{self.checkout.label} exported by git archive" if name == BASELINE and self.checkout
                 else f"{baseline.describe(REPO)} (this tree)")
        return build + ("" if variant == "default" else f", config variant {variant}")

    def _source(self, name: str) -> Path:
        """The folder holding the gateway package that target `name` runs."""
        if name != BASELINE:
            return REPO
        if self.checkout is None:
            raise RuntimeError(f"target {BASELINE} needs --baseline REF")
        return self.checkout.path

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

    def note_databases(self) -> None:
        """Note the keys of each gateway's Redis database: one database each, so no shared counters."""
        if not self.databases or self.redis is None or not self.redis.alive():
            return
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=5) as sock:
            sock.sendall(b"INFO keyspace\r\n")
            reply = b""
            while not reply.endswith(b"\r\n\r\n") and len(reply) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        keys = dict(re.findall(r"^db(\d+):keys=(\d+)", reply.decode(errors="replace"), re.MULTILINE))
        self.notes.append("Redis keys at the end: " + ", ".join(
            f"{name} (database {db}) {keys.get(str(db), 0)}" for name, db in self.databases.items()))

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
        hits = mock_hits(self.mock_url)
        before = read_budget(target.url) if target.budgeted else None
        extra = dict(line.split(": ", 1) for line in target.headers.splitlines()[1:])
        body = body_path.read_bytes()
        if target.unique:       # as its wrk runs send: else the stream check is a hit on the chat check's answer
            body = unique_body(body)
        status, headers, raw = http("POST", target.url + CHAT_PATH, body=body, key=target.key, headers=extra)
        if status != 200:
            return f"HTTP {status}: {raw[:200]!r}"
        usage = _usage_of(raw, scenario == "stream", headers)
        if usage is None:
            return "no usage in the answer (or no [DONE] in the stream)"
        if mock_hits(self.mock_url) - hits != 1 and target.name != "direct" and not target.cached:
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
        """Note how many samples each gateway's /metrics serves."""
        for gateway in [target for target in self.targets.values() if target.is_gateway]:
            status, _, raw = http("GET", gateway.url + "/metrics", key=ADMIN_KEY)
            series = sum(1 for line in raw.splitlines() if line and not line.startswith(b"#"))
            self.notes.append(f"{gateway.name} /metrics: HTTP {status}, {series} samples" if status == 200
                              else f"{gateway.name} /metrics: HTTP {status} (metrics not served by this build)")

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
        """One wrk run with CPU, upstream-hit and (for a gateway) budget and access-log accounting around it."""
        self.idle()
        before_budget = read_budget(target.url) if target.budgeted else None
        if target.access_log:
            target.access_log.mark()
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
        if target.is_gateway:
            result.store_cpu_ms_per_req = (cpu_ticks(self.redis.pid) - store_ticks) * 1000 / CLK_TCK / done \
                if self.redis else None
            result.budget = self.check_gateway_run(before_budget, target, scenario, conc, wrk["requests"])
        if result.errors:
            self.failures.append(f"{target.name}/{scenario}/c={conc}/round {round_no}: {result.errors} "
                                 f"non-2xx or socket errors ({wrk})")
        log(f"{target.name:12} {scenario:6} c={conc:<3} r{round_no}: {result.rps:8,.0f} rps  "
            f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  {result.cpu_ms_per_req:.3f} CPU ms/req"
            + (f"  budget {result.budget['verdict']}" if result.budget else ""))
        return result

    def check_gateway_run(self, before: Budget | None, target: Target, scenario: str, conc: int,
                          completed: int) -> dict[str, Any]:
        """After a gateway run: its budget (when budgeted) and its access log (when on) agree with wrk."""
        served = target.access_log.served_since_mark() if target.access_log else None
        report: dict[str, Any] = {"served_logged": served, "completed_wrk": completed}
        problems = []
        if before is not None:
            report.update(self._budget_moves(before, target, scenario, conc, completed))
            if "skipped" in report:
                return {"verdict": report["skipped"], **report}
            problems += report.pop("problems")
        if self.args.drain and served is not None and served != completed:
            problems.append(f"{served} chat 200s in the access log, wrk completed {completed}")
        verdict = "exact" if not problems else "MISMATCH: " + "; ".join(problems)
        if problems:
            self.failures.append(f"{target.name} {scenario}/c={conc}: {verdict}")
        return {"verdict": verdict, **report}

    def _budget_moves(self, before: Budget, target: Target, scenario: str, conc: int,
                      completed: int) -> dict[str, Any]:
        """Spent moved by exactly the requests wrk completed, each at the unit cost; nothing left reserved.

        Exact only with a drain (no request cut off when wrk stops); without one, a request in flight may be
        charged (up to its worst case) without wrk counting it, so only bounds are checked.
        """
        after = settled_budget(target.url)
        delta = after.minus(before)
        left = tuple(a - b for a, b in zip(after.reserved, before.reserved))
        unit, charged = self.unit.get(scenario), delta[2]
        if after.window != before.window:
            return {"skipped": "skipped (the daily window rolled over)", "delta": delta}
        problems = [] if left == (0, 0, 0) else [f"reservations left behind (usd_nano, tokens, requests): {left}"]
        if unit is None:
            problems.append("no unit cost measured")
        elif self.args.drain:
            expected = (completed * unit[0], completed * unit[1], completed)
            if delta != expected:
                problems.append(f"spent moved by {delta}, expected {expected} = {completed} completed x unit {unit}"
                                + (" (requests cut off by wrk? try a longer --drain)" if charged > completed else ""))
        elif not (completed <= charged <= completed + conc and delta[0] >= completed * unit[0]):
            problems.append(f"{charged} requests charged ({delta}), wrk completed {completed}, {conc} connections")
        return {"problems": problems, "delta": delta, "left_reserved": left,
                "charged_not_read_by_wrk": charged - completed}

    # --- soak ---

    def soak(self, total: int) -> dict[str, Any]:
        """Drive the gateway (chat, --soak-conc) until `total` requests; RSS after 50k vs after `total`."""
        target = self.targets[GATEWAY]
        body, conc, done = self.scenarios.get("chat", SCENARIOS["chat"]), self.args.soak_conc, 0
        before = read_budget(target.url)
        samples: list[tuple[int, int]] = []
        reference: tuple[int, int] | None = None
        deadline = time.monotonic() + self.args.soak_max_s
        served = 0
        access_log = target.access_log
        assert access_log is not None
        while done < total and time.monotonic() < deadline:
            access_log.mark()
            seconds = 5 if reference is None else 20
            wrk, _ = run_wrk(target, body, conc, seconds, self.loadgen_cpus, self.args.drain)
            done += wrk["requests"]
            errors = wrk_errors(wrk)
            if errors:
                self.failures.append(f"soak: {errors} non-2xx or socket errors after {done} requests")
            settled_budget(target.url)
            served += access_log.served_since_mark() or 0
            _truncate(access_log.path)       # keep the log file small over a million lines
            rss = memory_kb(target.proc.pid, "VmRSS")
            samples.append((done, rss))
            if reference is None and done >= SOAK_BASELINE:
                reference = (done, rss)
            log(f"soak: {done:,} requests, RSS {rss / 1024:.1f} MiB")
        return self._soak_verdict(total, done, samples, reference, before, served, len(samples) * conc)

    def _soak_verdict(self, total: int, done: int, samples: list[tuple[int, int]], reference: tuple[int, int] | None,
                      before: Budget, served: int, in_flight_max: int) -> dict[str, Any]:
        final = samples[-1] if samples else (0, 0)
        after = settled_budget(self.targets[GATEWAY].url)
        delta = after.minus(before)
        unit = self.unit["chat"]
        budget_ok = after.reserved == before.reserved and (
            delta == (done * unit[0], done * unit[1], done) if self.args.drain
            else done <= delta[2] <= done + in_flight_max)
        growth = (final[1] - reference[1]) / reference[1] if reference else None
        verdict = {
            "requests": done, "target": total, "completed": done >= total,
            "rss_after_baseline_kb": reference, "rss_final_kb": final, "growth": growth,
            "limit": SOAK_TOLERANCE, "rss_ok": growth is not None and abs(growth) <= SOAK_TOLERANCE,
            "budget_exact": budget_ok, "budget_delta": delta, "served_logged": served,
            "samples": samples, "vmhwm_kb": memory_kb(self.targets[GATEWAY].proc.pid, "VmHWM"),
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
        move. The bare proxy, the gateway, the gateway with one feature off each (what that feature costs) and
        the --baseline build (what a change costs)."""
        # each bounded: start-up, then two bounded wrk runs
        return [self._count_instructions(name, scenario) for scenario in self.args.scenarios
                for name in self.args.instruction_targets]

    def _count_instructions(self, name: str, scenario: str) -> dict[str, Any]:
        """Start `name` under callgrind, warm it up, count the instructions of one `scenario` run, stop it."""
        dump = self.out / "callgrind" / f"{name}-{scenario}.out"
        dump.parent.mkdir(exist_ok=True)
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}"]
        if name == "bare":
            self._start_bare(sys.executable, self.sut_cpus, wrap=wrap, ready_s=CALLGRIND_READY_S)
        else:
            self._start_gateway(name, self.sut_cpus, wrap=wrap, ready_s=CALLGRIND_READY_S)
        target = self.targets[name]
        body, seconds = SCENARIOS[scenario], max(self.args.duration, CALLGRIND_MIN_S)
        run_wrk(target, body, 16, self.args.warmup, self.loadgen_cpus, self.args.drain, timeout_s=30)
        wait_idle([target.proc], max_s=20)
        callgrind_control("-z", target.proc.pid)      # count from here: no start-up, no warm-up
        wrk, _ = run_wrk(target, body, 16, seconds, self.loadgen_cpus, self.args.drain, timeout_s=30)
        wait_idle([target.proc], max_s=20)
        callgrind_control("-d", target.proc.pid)
        instructions = callgrind_summary(dump)
        target.proc.stop()
        del self.targets[name]
        errors = wrk_errors(wrk)
        if errors:
            self.failures.append(f"instructions {name}: {errors} non-2xx or socket errors ({wrk})")
        per_request = instructions / max(1, wrk["requests"])
        log(f"{name:24} {scenario:6} {wrk['requests']:6,} requests  {per_request:12,.0f} instructions/request")
        return {"target": name, "scenario": scenario, "requests": wrk["requests"], "instructions": instructions,
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
            spy = subprocess.Popen([py_spy, "record", "--pid", str(self.targets[GATEWAY].proc.pid),
                                    "--duration", str(seconds), "--rate", "250", "--nonblocking",
                                    "--format", "raw", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=open(self.out / "logs" / "py-spy.log", "ab"))
            time.sleep(0.5)
            self.results.append(self.measure(self.targets[GATEWAY], scenario, 16, 0))
            spy.wait(timeout=seconds + 30)
            if raw.exists():
                report[scenario] = top_frames(raw)
        return report

    # --- output ---

    def stop(self) -> None:
        """Stop what this run started and remove the baseline's files."""
        for proc in reversed(self.procs):
            proc.stop()
        if self.checkout is not None:
            baseline.remove(self.checkout)


# --------------------------------------------------------------------------- entry points

def cmd_run(args: argparse.Namespace) -> int:
    """The whole run: start, check, measure, summarize, stop."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # run the cleanup below on `timeout`
    check_target_names(args)
    bench = Bench(args)
    extra: dict[str, Any] = {}
    try:
        log(f"results in {bench.out}")
        if args.instructions:
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
        with contextlib.suppress(OSError):
            bench.note_databases()
        summary = summarize(bench, extra)
        bench.stop()
    (bench.out / "summary.md").write_text(summary)
    (bench.out / "results.json").write_text(json.dumps(
        {"args": vars(args), "results": [asdict(r) for r in bench.results], "unit": bench.unit, "peak_rss_kb": peak,
         "builds": bench.builds, "notes": bench.notes, "failures": bench.failures, **extra}, indent=1, default=str))
    print(summary)
    return 1 if bench.failures else 0


def unique_body(body: bytes) -> bytes:
    """`body` with the first characters of its user message replaced by a marker never sent before, as
    post.lua's BENCH_UNIQUE does (same length, so the same cost)."""
    head = b'"role": "user", "content": "'
    at = body.index(head) + len(head)
    marker = os.urandom(13).hex().encode()
    return body[:at] + marker + body[at + len(marker):]


def cmd_serve(args: argparse.Namespace) -> int:
    """Exec the gateway with the bench config on --port, for another harness to drive."""
    directory = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    upstream = args.upstream.rstrip("/")
    upstream = upstream if upstream.endswith("/v1") else upstream + "/v1"
    config = write_config(directory, args.port, args.redis_url, upstream, args.variant)
    command = [sys.executable, "-m", "gateway", "run", "--config", str(config.path), "--port", str(args.port)]
    if args.workers > 1:
        command += ["--workers", str(args.workers)]
    os.chdir(directory)
    os.execve(sys.executable, command, gateway_env(REPO))
    return 0  # not reached


def check_target_names(args: argparse.Namespace) -> None:
    """Every name of --targets and --instruction-targets is one the bench can start; fill the defaults in."""
    gateways = [target_name(variant) for variant in VARIANTS] + ([BASELINE] if args.baseline else [])
    if args.instruction_targets is None:
        args.instruction_targets = ["bare", *gateways]
    if args.baseline and BASELINE not in args.targets and not args.soak:
        args.targets = [*args.targets, BASELINE]
    if args.max_wall is None:
        args.max_wall = MAX_WALL_PER_TARGET_S * len(args.targets)
    for option, names, known in (("--targets", args.targets, ["direct", "bare", *gateways]),
                                 ("--instruction-targets", args.instruction_targets, ["bare", *gateways])):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise SystemExit(f"bench: unknown {option} {', '.join(unknown)} (known: {', '.join(known)}; "
                             f"{BASELINE} needs --baseline REF)")


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def csv_names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the benchmark (default matrix, or --soak N)")
    run.add_argument("--targets", type=csv_names, default=["direct", "bare", GATEWAY],
                     help="interleaving order (default direct,bare,gateway; gateway-<variant> runs a config variant "
                          f"of bench/gateway_config.py: {', '.join(v for v in VARIANTS if v != 'default')})")
    run.add_argument("--baseline", metavar="REF",
                     help=f"also bench {BASELINE}: the gateway of git ref REF (e.g. main, a commit) from a checkout "
                          "in the results folder, same interpreter and config, its own Redis database, interleaved "
                          "in the same rounds; the summary compares gateway with it (the 5 %% rule)")
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
    run.add_argument("--max-wall", type=float,
                     help=f"start no new run after this many seconds (default {MAX_WALL_PER_TARGET_S:.0f} per target "
                          "of --targets: 420 for the default three)")
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
    run.add_argument("--instruction-targets", type=csv_names,
                     help="what --instructions counts (default bare, gateway and every gateway-<variant>, and "
                          f"{BASELINE} with --baseline)")
    run.add_argument("--profile", action="store_true", help="py-spy the gateway under load after the matrix")
    run.add_argument("--py-spy", help="path of the py-spy binary (default: on PATH)")
    run.add_argument("--out", help="results folder (default bench/results/<stamp>)")
    run.set_defaults(func=cmd_run)
    serve = sub.add_parser("serve", help="run the gateway alone with the bench config")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--upstream", required=True, help="mock upstream base URL")
    serve.add_argument("--redis-url", required=True)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--variant", default="default", choices=list(VARIANTS), help="config variant")
    serve.set_defaults(func=cmd_serve)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
