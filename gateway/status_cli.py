"""`gateway status`: budgets (and, for the admin key, provider breakers) as a table with bars."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from typing import Any

import aiohttp

__all__ = ["fetch_status", "render_budgets", "render_rates", "render_providers", "render_canaries", "run_status"]

BAR_WIDTH = 20


def bar(utilization: float) -> str:
    """A utilization bar: '#' for used, '.' for left."""
    filled = min(BAR_WIDTH, round(max(0.0, utilization) * BAR_WIDTH))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def render_budgets(entries: list[dict[str, Any]]) -> str:
    """Budget windows, one row each."""
    if not entries:
        return "no budget policies apply to this key"
    rows = [[_who(e), e["period"], e["unit"], str(e["spent"]), str(e["reserved"]), str(e["limit"]),
             str(e["remaining"]), f"{bar(e['utilization'])} {e['utilization'] * 100:5.1f}%", e["state"],
             e["resets_at"], _forecast(e)] for e in entries]
    return table(rows, ["POLICY", "PERIOD", "UNIT", "SPENT", "IN FLIGHT", "LIMIT", "REMAINING", "USED",
                        "STATE", "RESETS AT", "FORECAST"])


def _forecast(entry: dict[str, Any]) -> str:
    """'<rate>/h, <projected> by reset[, out HH:MM]' (the time in the window's own zone offset), or '-'."""
    ahead = entry.get("forecast")
    if not ahead:
        return "-"
    text = f"{ahead['burn_per_hour']}/h, {ahead['projected_at_reset']} by reset"
    if ahead["exhausted_at"]:
        text += f", out {_local(ahead['exhausted_at'], entry['resets_at'])}"
    return text


def _local(instant: str, like: str) -> str:
    """`instant` (ISO 8601) as HH:MM in the UTC offset of `like` (the window's reset), with the date if not today."""
    moment = datetime.fromisoformat(instant).astimezone(datetime.fromisoformat(like).tzinfo)
    return moment.strftime("%H:%M")


def render_rates(entries: list[dict[str, Any]]) -> str:
    """Rate windows and requests in flight, one row each."""
    rows = [[_who(e), e["per"], e["unit"], str(e["used"]), str(e["limit"]), str(e["remaining"]),
             f"{bar(e['utilization'])} {e['utilization'] * 100:5.1f}%",
             f"{e['empty_in_s']:.0f}s" if e.get("empty_in_s") else "-"] for e in entries]
    return table(rows, ["RATE LIMIT", "PER", "UNIT", "USED", "LIMIT", "REMAINING", "USED %", "EMPTY IN"])


def _who(entry: dict[str, Any]) -> str:
    """A policy (with the `each` value it counts), or a provider's own limit."""
    if "provider" in entry:
        return f"provider {entry['provider']}"
    return entry["policy"] + (f" [{entry['each']}={entry['value']}]" if entry.get("each") else "")


def render_providers(entries: list[dict[str, Any]]) -> str:
    """Provider breakers, one row each (under --workers, the worst worker's, with how many share its state)."""
    rows = [[e["provider"], _breaker_state(e), f"{e['failure_rate'] * 100:.1f}%",
             str(e.get("calls_in_window", "")), e.get("open_until") or "-"] for e in entries]
    return table(rows, ["PROVIDER", "BREAKER", "FAILURES", "CALLS", "OPEN UNTIL"])


def render_canaries(entries: list[dict[str, Any]]) -> str:
    """Canaries, one row per arm: the route's step and status, and each arm's figures in the step."""
    rows = []
    for e in entries:
        step = f"{e['step']}/{len(e['steps'])} ({e['candidate_percent']}%)"
        for arm, provider in (("control", e["control"]), ("candidate", e["candidate"])):
            figures = e["arms"][arm]
            p95 = figures["p95_latency_s"]
            rows.append([e["route"], step, e["status"], f"{arm} {provider}", str(figures["requests"]),
                         f"{figures['error_rate'] * 100:.1f}%", "-" if p95 is None else f"{p95 * 1000:.0f} ms",
                         figures["cost_per_request_usd"] or "-"])
    return table(rows, ["CANARY", "STEP", "STATUS", "ARM", "REQUESTS", "ERRORS", "P95", "USD/REQUEST"])


def _breaker_state(entry: dict[str, Any]) -> str:
    """The state, and "(k of n workers)" when the workers' breakers disagree."""
    workers = entry.get("workers") or []
    alike = sum(1 for worker in workers if worker["state"] == entry["state"])
    return f"{entry['state']} ({alike} of {len(workers)} workers)" if alike < len(workers) else entry["state"]


async def fetch_status(url: str, key: str | None, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url.rstrip("/") + path, headers=headers) as response:
            return response.status, await response.json(content_type=None)


async def collect(url: str, key: str | None, policy: str | None) -> tuple[str, int]:
    """The printed report and the exit code."""
    path = "/v1/budget/status" + (f"?policy={policy}" if policy else "")
    status, body = await fetch_status(url, key, path)
    if status != 200:
        return f"error {status}: {body.get('error', {}).get('message', body)}", 1
    report = render_budgets(body["data"])
    status, rates = await fetch_status(url, key, "/v1/rate_limits/status" + (f"?policy={policy}" if policy else ""))
    if status == 200 and rates["data"]:
        report += "\n\n" + render_rates(rates["data"])
    status, providers = await fetch_status(url, key, "/v1/providers/status")
    if status == 200:
        report += "\n\n" + render_providers(providers["data"])
        if providers.get("canaries"):
            report += "\n\n" + render_canaries(providers["canaries"])
    return report, 0


def run_status(url: str, key: str | None, policy: str | None) -> int:
    """Print the status report; the key defaults to $GATEWAY_KEY."""
    try:
        report, code = asyncio.run(collect(url, key or os.environ.get("GATEWAY_KEY"), policy))
    except aiohttp.ClientError as exc:
        report, code = f"cannot reach the gateway at {url}: {exc}", 2
    print(report)
    return code
