"""`gateway run --workers N`: N gateway processes on one port (SO_REUSEPORT), under one supervisor.

The supervisor validates the config, then starts each worker as `python -m gateway run ... --workers 1
--reuse-port --worker-index I`. Every worker binds the same host:port with SO_REUSEPORT and the kernel
spreads new connections across them. Workers run in their own process group, so a terminal's Ctrl-C
reaches the supervisor alone and is forwarded once; on Linux each worker also gets SIGTERM if the
supervisor itself dies (PR_SET_PDEATHSIG), so no orphan keeps serving the port.

Signals: the first SIGTERM or SIGINT is forwarded to every worker (each stops within its
`server.shutdown_grace_s` + 2 s, see gateway.serving.server); a second one, or that grace + STOP_MARGIN_S
without an exit, SIGKILLs the rest. Before starting any worker the supervisor checks that the port is
free, so a port in use fails at once, with one line. A worker that exits on its own stops the others:
the supervisor never restarts workers (whatever runs the gateway restarts the whole tree), and it exits
with the first unexpected exit status (128 + signal for a killed worker), else 0.

What workers share and what they do not:
- the budget store. Redis is shared by design. The embedded SQLite file is shared too: every store
  operation is one `BEGIN IMMEDIATE` transaction and SQLite serializes those across processes on one
  host (WAL needs a local file system, not NFS). Workers then queue on the file lock: prefer Redis.
- not the spend journal: worker I journals to `<journal stem>.w<I><suffix>`, because replaying one file
  from two processes could lose entries (`SpendJournal.replay` moves and unlinks it).
- not the fail-open allowance, the breakers or the retry budget: each worker is one replica for them.
- not the metrics: each worker counts its own, and the one answering `/metrics` or provider status asks
  the others over private unix sockets in a directory the supervisor makes (0700) and removes at exit
  (see gateway.peers), so counters read the same whichever worker answers.
- `--with-mock` is served by worker 0 only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from gateway.config.model import ServerConfig, Settings
from gateway.serving.listener import bind_or_explain

__all__ = ["WorkerSpec", "Supervisor", "supervise", "worker_command", "worker_settings", "STOP_MARGIN_S"]

log = logging.getLogger("gateway")

STOP_MARGIN_S = 5.0          # a worker is killed this long after its shutdown grace (it exits by grace + 2 s)
FORWARDED = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker is started with."""

    config: str
    host: str
    port: int
    workers: int
    log_level: str = "INFO"
    with_mock: str | None = None
    peer_dir: str | None = None              # where the workers answer each other (gateway.peers)


def worker_command(spec: WorkerSpec, index: int) -> list[str]:
    """The command line of worker `index`: the same `gateway run`, one process, sharing the port."""
    command = [sys.executable, "-m", "gateway", "--log-level", spec.log_level, "run", "--config", spec.config,
               "--host", spec.host, "--port", str(spec.port)]
    if spec.peer_dir:
        command += ["--peer-dir", spec.peer_dir, "--worker-count", str(spec.workers)]
    command += ["--reuse-port", "--workers", "1", "--worker-index", str(index)]
    if spec.with_mock and index == 0:
        command += ["--with-mock", spec.with_mock]
    return command


def worker_settings(settings: Settings, index: int) -> Settings:
    """Settings of worker `index`: its own spend journal beside the configured one."""
    journal = Path(settings.store.journal_path)
    own = journal.with_name(f"{journal.stem}.w{index}{journal.suffix}")
    return dataclasses.replace(settings, store=dataclasses.replace(settings.store, journal_path=str(own)))


def supervise(spec: WorkerSpec, settings: Settings | None = None) -> int:
    """Run `spec.workers` workers until they exit; the exit status of `gateway run --workers N`."""
    if spec.port == 0:
        print("--workers needs a fixed --port: with port 0 every worker would get a different one",
              file=sys.stderr)
        return 2
    if not _port_free(spec.host, spec.port):
        return 1
    log.info("gateway supervisor %d: starting %d workers on http://%s:%d",
             os.getpid(), spec.workers, spec.host, spec.port)
    if settings is not None and not settings.store.url and settings.policies:
        log.warning("the %d workers share the embedded SQLite store %s: budget counts stay exact, but every "
                    "budget operation waits for its one file lock; set store.url to a Redis for throughput",
                    spec.workers, settings.store.path)
    grace_s = (settings.server if settings is not None else ServerConfig()).shutdown_grace_s + STOP_MARGIN_S
    peer_dir = tempfile.mkdtemp(prefix="gateway-workers-")   # mode 0700
    try:
        spec = dataclasses.replace(spec, peer_dir=peer_dir)
        return Supervisor([worker_command(spec, index) for index in range(spec.workers)], grace_s=grace_s).run()
    finally:
        shutil.rmtree(peer_dir, ignore_errors=True)


def _port_free(host: str, port: int) -> bool:
    """True when host:port can be bound without SO_REUSEPORT (else one line says why): workers share the
    port with each other only, never with whatever holds it now."""
    sockets = bind_or_explain(host, port)
    for sock in sockets or ():
        sock.close()
    return sockets is not None


class Supervisor:
    """Starts worker processes, forwards stop signals to them, reaps them, and exits when they have."""

    def __init__(self, commands: Sequence[Sequence[str]], *, grace_s: float) -> None:
        self._commands = commands
        self._grace_s = grace_s
        self._children: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}   # pid -> (worker index, process)
        self._stopping = False
        self.exit_code = 0

    @property
    def pids(self) -> list[int]:
        """PIDs of the workers still running."""
        return list(self._children)

    def run(self) -> int:
        """Start every worker and wait for all of them; the supervisor's exit status."""
        handlers = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED}
        handlers[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_deadline)
        try:
            self._start_all()
            self._reap_all()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return self.exit_code

    def _start_all(self) -> None:
        for index, command in enumerate(self._commands):
            if self._stopping:
                return
            try:
                child = subprocess.Popen(command, process_group=0, preexec_fn=_die_with_parent(os.getpid()))
            except OSError as exc:
                log.error("worker %d could not start: %s", index, exc)
                self._fail(1)
                return
            self._children[child.pid] = (index, child)   # kept: a dropped Popen may be reaped behind our back
            if self._stopping:                       # a stop signal came while this one was starting
                os.kill(child.pid, signal.SIGTERM)

    def _reap_all(self) -> None:
        while self._children:
            try:
                pid, status = os.wait()              # retried after our signal handlers (PEP 475)
            except ChildProcessError:
                return
            found = self._children.pop(pid, None)
            if found is not None:
                index, child = found
                child.returncode = os.waitstatus_to_exitcode(status)
                self._exited(index, pid, _exit_status(child.returncode))

    def _exited(self, index: int, pid: int, status: int) -> None:
        if self._stopping:
            if status and not self.exit_code:
                self.exit_code = status
            return
        log.error("worker %d (pid %d) exited with status %d; stopping the other workers", index, pid, status)
        self._fail(status)

    def _fail(self, status: int) -> None:
        self.exit_code = status or 1
        self._stop(signal.SIGTERM)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping:
            self._kill_all()
        else:
            self._stop(signum)

    def _stop(self, signum: int) -> None:
        """Forward `signum` to every worker once and arm the SIGKILL deadline."""
        self._stopping = True
        self._signal_all(signum)
        signal.setitimer(signal.ITIMER_REAL, self._grace_s)

    def _on_deadline(self, _signum: int, _frame: FrameType | None) -> None:
        log.error("workers still running %.0f s after the stop signal: killing them", self._grace_s)
        self._kill_all()

    def _kill_all(self) -> None:
        self._signal_all(signal.SIGKILL)

    def _signal_all(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _exit_status(code: int) -> int:
    """A shell-style exit status: 128 + N for a process ended by signal N."""
    return 128 - code if code < 0 else code


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGTERM the worker when the supervisor dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:                   # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm
