"""The bench's own parts: the fast mock upstream and bare proxy forward real answers, every config variant is
one the gateway accepts, --baseline runs the named commit's code, and the before/after table gives a verdict."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import baseline  # noqa: E402  (bench/ is a folder of scripts, not a package)
from gateway_config import BASELINE, GATEWAY, VARIANTS, gateway_env, write_config  # noqa: E402
from report import RunResult, baseline_table  # noqa: E402

CHAT = json.loads((BENCH / "payloads" / "chat.json").read_text())
STREAM = json.loads((BENCH / "payloads" / "chat_stream.json").read_text())


def start(*args: str) -> subprocess.Popen[bytes]:
    """A bench script started with this interpreter."""
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    """Until something answers HTTP on `port`; fails if the process dies first."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else "exited"
        try:
            request("GET", port, "/__stats")
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def request(method: str, port: int, path: str, body: dict | None = None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, str, bytes]:
    """Status, content type and body of one request (on `connection` when given)."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
    reply = conn.getresponse()
    answer = reply.status, reply.getheader("Content-Type", ""), reply.read()
    if connection is None:
        conn.close()
    return answer


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[int, int]]:
    """(mock port, bare proxy port): bench/fast_upstream.py behind bench/bare_proxy.py."""
    mock_port, bare_port = free_port(), free_port()
    mock = start(str(BENCH / "fast_upstream.py"), "--port", str(mock_port))
    bare = start(str(BENCH / "bare_proxy.py"), "--port", str(bare_port), "--upstream", f"http://127.0.0.1:{mock_port}")
    try:
        wait_listening(mock, mock_port)
        wait_listening(bare, bare_port)
        yield mock_port, bare_port
    finally:
        for process in (bare, mock):
            process.terminate()
            process.wait(timeout=10)


def stats(mock_port: int) -> dict[str, int]:
    return json.loads(request("GET", mock_port, "/__stats")[2])


def test_bare_proxy_forwards_a_chat_request_and_returns_the_mocks_answer(proxied: tuple[int, int]) -> None:
    mock_port, bare_port = proxied
    before = stats(mock_port)
    status, content_type, raw = request("POST", bare_port, "/v1/chat/completions", CHAT)
    answer = json.loads(raw)
    assert (status, content_type) == (200, "application/json")
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"] > 0
    assert stats(mock_port)["chat"] == before["chat"] + 1


def test_bare_proxy_streams_sse_ending_with_a_usage_chunk_and_done(proxied: tuple[int, int]) -> None:
    mock_port, bare_port = proxied
    before = stats(mock_port)
    status, content_type, raw = request("POST", bare_port, "/v1/chat/completions", STREAM)
    events = [line[len(b"data: "):] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    chunks = [json.loads(event) for event in events[:-1]]
    assert (status, content_type) == (200, "text/event-stream")
    assert events[-1] == b"[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) != ""
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1
    assert stats(mock_port)["chat_stream"] == before["chat_stream"] + 1


def test_fast_upstream_keeps_the_connection_and_gives_each_answer_its_own_id(proxied: tuple[int, int]) -> None:
    mock_port, _ = proxied
    connection = http.client.HTTPConnection("127.0.0.1", mock_port, timeout=10)
    first = json.loads(request("POST", mock_port, "/v1/chat/completions", CHAT, connection)[2])
    socket_used = connection.sock
    second = json.loads(request("POST", mock_port, "/v1/chat/completions", CHAT, connection)[2])
    assert connection.sock is socket_used is not None
    assert first["id"] != second["id"] and first["usage"] == second["usage"]
    connection.close()


def test_fast_upstream_refuses_what_is_no_chat_request_in_openais_error_shape(proxied: tuple[int, int]) -> None:
    mock_port, _ = proxied
    status, _, raw = request("POST", mock_port, "/v1/chat/completions", {"model": "gpt-4o-mini"})
    assert status == 400 and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    assert request("GET", mock_port, "/v1/nothing")[0] == 404


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_config_variant_is_accepted_by_gateway_check(variant: str, tmp_path: Path) -> None:
    written = write_config(tmp_path, 8080, "redis://127.0.0.1:6390/1", "http://127.0.0.1:18000/v1", variant)
    done = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(written.path)],
                          env=gateway_env(ROOT), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert written.access_log == (variant != "no-access-log")
    assert written.cached == (variant == "cache-hit")
    assert dict(written.headers) == ({"Cache-Control": "no-cache"} if variant == "cache-refresh" else {})
    assert written.unique == (variant == "cache-store-miss")   # its bodies never repeat: every request a miss
    assert written.budgeted == (variant not in ("no-budget", "cache-hit"))   # a hit moves no budget


def test_baseline_checkout_holds_the_refs_gateway_and_is_what_a_target_imports(tmp_path: Path) -> None:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    checkout = baseline.check_out(ROOT, "HEAD", tmp_path / "base")
    committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:gateway/__init__.py"],
                               capture_output=True, check=True).stdout
    assert (checkout.path / "gateway" / "__init__.py").read_bytes() == committed
    assert baseline.imported_from(sys.executable, gateway_env(checkout.path), tmp_path) == checkout.path.resolve()
    baseline.remove(checkout)
    assert not checkout.path.exists()
    with pytest.raises(ValueError, match="no-such-ref-17"):
        baseline.resolve(ROOT, "no-such-ref-17")


def runs(target: str, rps: list[float]) -> list[RunResult]:
    """One chat c=16 run per round for `target` at the given RPS (CPU and p50 follow from it)."""
    return [RunResult(target=target, scenario="chat", conc=16, round=index + 1, rps=value, p50_ms=16_000 / value,
                      p99_ms=32_000 / value, requests=int(value * 5), errors=0, cpu_ms_per_req=1_000 / value,
                      core_busy=1.0, loadgen_busy=0.3, upstream_hits_per_req=1.0)
            for index, value in enumerate(rps)]


def test_baseline_table_fails_a_change_that_costs_more_than_five_percent_of_rps() -> None:
    table = baseline_table(runs("bare", [1000, 1000, 1000, 1000]) + runs(BASELINE, [600, 620, 580, 600])
                           + runs(GATEWAY, [552, 577, 545, 560]))
    rps_row = next(row for row in table if row.startswith("| chat c=16 | RPS"))
    assert "| 556 | 600 | 0.932 | 0.56 | 0.60 | DROP: -6.8% (rounds -8.0% / -6.9% / -6.0% / -6.7%)" in rps_row
    assert table[-1].endswith("in 0 of 1 cells: the change FAILS (a drop of a few per cent can be noise: rerun "
                              "with more --rounds before believing it).")


def test_baseline_table_passes_a_change_within_five_percent() -> None:
    table = baseline_table(runs("bare", [1000, 1000]) + runs(BASELINE, [600, 620]) + runs(GATEWAY, [585, 600]))
    assert any(row.startswith("| chat c=16 | RPS") and "| ok: -2.9%" in row for row in table)
    assert any(row.startswith("| chat c=16 | CPU ms/req") and "| 1.029 |" in row for row in table)
    assert table[-1].endswith("in 1 of 1 cells: the change passes.")
