"""Processes the bench starts: started under taskset, measured from /proc, stopped by their PID only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    """One timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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

