"""Real redis-server processes on loopback ports for integration tests: single, cluster, sentinel.

Each process runs in its own temporary directory with persistence off and is ended by its PID only;
a Redis already listening on 6379 is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

__all__ = [
    "RedisServer", "RedisClusterProcesses", "RedisSentinelProcesses",
    "redis_server", "redis_url", "fresh_redis_server", "redis_cluster", "redis_cluster_url",
    "redis_sentinel", "redis_sentinel_url",
]

NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
READY_TIMEOUT_S = 10.0
SENTINEL_SERVICE = "gwmaster"


class RedisServer:
    """One redis-server process bound to 127.0.0.1 on a free port, in `directory`."""

    def __init__(self, directory: Path, *, args: Sequence[str] = NO_PERSISTENCE,
                 config_file: Path | None = None, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self._args = list(args)
        self._config_file = config_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "server not started"
        return self._process.pid

    def start(self) -> None:
        """Start the process and wait until it answers PING."""
        command = ["redis-server", *([str(self._config_file)] if self._config_file else []),
                   "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory), *self._args]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        log.close()
        self._wait_until_ready()

    def kill(self) -> None:
        """SIGKILL the process (a crash: nothing is flushed or closed cleanly)."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def restart(self) -> None:
        """Start again on the same port (after `kill`), with an empty dataset."""
        self.kill()
        self.start()

    def ensure_running(self) -> None:
        """Restart the process if it died."""
        if self._process is None or self._process.poll() is not None:
            self.start()

    def pause(self) -> None:
        """SIGSTOP the process: it keeps its port but answers nothing (a frozen Redis)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused process."""
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Terminate the process (resuming it first if paused); kill it if it lingers."""
        if self._process is None or self._process.poll() is not None:
            return
        self.resume()
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def client(self) -> redis.Redis:
        """A short-lived synchronous client for test setup."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self._log_tail()}")
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} not ready: {self._log_tail()}")
            time.sleep(0.02)  # polling a child process for readiness, not passing test time

    def _log_tail(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")[-2000:]


class RedisClusterProcesses:
    """A cluster of three masters (no replicas), each a RedisServer with cluster mode on."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.nodes = []
        for index in range(size):
            directory = root / f"node{index}"
            directory.mkdir()
            args = [*NO_PERSISTENCE, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "5000"]
            self.nodes.append(RedisServer(directory, args=args, port=free_port(cluster_bus=True)))

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        """Start every node, join them with `redis-cli --cluster create`, wait for cluster_state:ok."""
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        command = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(self._state_ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)  # polling the cluster for readiness, not passing test time

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @staticmethod
    def _state_ok(node: RedisServer) -> bool:
        with node.client() as client:
            return client.cluster("INFO")["cluster_state"] == "ok"


class RedisSentinelProcesses:
    """A master and one sentinel watching it under the service name SENTINEL_SERVICE."""

    def __init__(self, root: Path) -> None:
        (root / "master").mkdir()
        (root / "sentinel").mkdir()
        self.master = RedisServer(root / "master")
        config = root / "sentinel" / "sentinel.conf"
        config.write_text(f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.master.port} 1\n")
        self.sentinel = RedisServer(root / "sentinel", args=["--sentinel"], config_file=config)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SENTINEL_SERVICE}"

    def start(self) -> None:
        self.master.start()
        self.sentinel.start()

    def stop(self) -> None:
        self.sentinel.stop()
        self.master.stop()


def free_port(*, cluster_bus: bool = False) -> int:
    """A free loopback port (and, for a cluster node, a free bus port at port + 10000)."""
    while True:
        port = _bind_ephemeral()
        if not cluster_bus or (port + 10000 < 65536 and _is_free(port + 10000)):
            return port


def _bind_ephemeral() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the session (prefer `fresh_redis_server` to kill or pause one)."""
    _require("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL (restarted if a test killed it), flushed for this test."""
    redis_server.ensure_running()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone with an fsync'd append-only file, so a kill and restart keeps its data."""
    _require("redis-server")
    server = RedisServer(tmp_path, args=("--save", "", "--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, free to be killed or paused."""
    _require("redis-server")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A three-master Redis Cluster shared by the session."""
    _require("redis-server")
    _require("redis-cli")
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    """The cluster's redis+cluster:// URL, every node flushed for this test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelProcesses]:
    """A master watched by one sentinel, shared by the session."""
    _require("redis-server")
    processes = RedisSentinelProcesses(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        processes.start()
        yield processes
    finally:
        processes.stop()


@pytest.fixture
def redis_sentinel_url(redis_sentinel: RedisSentinelProcesses) -> str:
    """The sentinel's redis+sentinel:// URL, the master flushed for this test."""
    redis_sentinel.master.flushall()
    return redis_sentinel.url
