"""What the gateway's CPU goes to: callgrind instruction counts and py-spy samples, read back."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CALLGRIND_READY_S = 300.0   # start-up under callgrind is ~50 x slower
CALLGRIND_MIN_S = 10        # seconds of wrk counted (~70 requests/s under callgrind)


def callgrind_control(option: str, pid: int) -> None:
    """callgrind_control -z (zero the counters) or -d (dump them) for the process `pid`."""
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=120)


def callgrind_summary(dump: Path) -> int:
    """Instructions counted in the latest dump written for `dump` (callgrind numbers them <dump>.1, .2, ...)."""
    numbered = [path for path in dump.parent.glob(dump.name + ".*") if path.suffix[1:].isdigit()]
    latest = max(numbered, key=lambda path: int(path.suffix[1:]))
    for line in latest.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {latest}")


PROFILE_GROUPS = (   # a sample belongs to the group of the innermost frame that matches a marker
    ("budget store: reserve + settle (gateway/budget, redis-py)", ("redis/", "gateway/budget/")),
    ("upstream call: dispatch, retries, breaker, aiohttp client",
     ("gateway/upstream/dispatch", "gateway/resilience/", "gateway/upstream/providers", "tenacity/", "aiohttp/client",
      "aiohttp/connector")),
    ("relay of the answer (JSON or SSE)", ("gateway/upstream/relay",)),
    ("metrics (gateway/observability, prometheus_client)", ("gateway/observability/", "prometheus_client/")),
    ("access log (record, JSON line, logging)", ("gateway/observability/access_log", "logging/")),
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
    for marker in ("site-packages/", f"{REPO}/", "lib/python3"):
        if marker in file_name:
            file_name = file_name.split(marker, 1)[1]
    return f"{name} ({file_name})" if where else name

