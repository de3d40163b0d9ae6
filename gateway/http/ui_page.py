"""The status page's HTML: server-rendered, one inline stylesheet, no script and no external asset.

Every value is escaped. Each budget and rate window is a `.window` element whose `data-*` attributes carry
the same figures as `GET /v1/budget/status` (and `/v1/rate_limits/status`), so a test (or a scraper) can
read them back; the bar's width is the window's utilization. The layout is one column that fits a phone.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any

__all__ = ["render_page"]

_STYLE = """
*{box-sizing:border-box}body{margin:0;font:16px/1.4 system-ui,sans-serif;color:#1b1f24;background:#f6f7f9}
main{max-width:960px;margin:0 auto;padding:12px}h1{font-size:1.4em;margin:.4em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}
.card{background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:10px 12px;margin:8px 0}
.card h3{font-size:1em;margin:0 0 6px;word-break:break-all}.bar{height:14px;background:#e6e9ee;border-radius:7px;overflow:hidden}
.bar>span{display:block;height:100%;background:#2f7d32}.warning .bar>span{background:#c98a00}
.exceeded .bar>span{background:#b3261e}.figures,.meta{margin:4px 0 0;font-size:.9em}.meta{color:#555}
table{width:100%;border-collapse:collapse;background:#fff;font-size:.9em}th,td{text-align:left;padding:6px;
border-bottom:1px solid #e6e9ee;word-break:break-all}td.n{text-align:right}.empty{color:#666}
"""


def render_page(caller: str, now: datetime, budgets: list[dict[str, Any]], rates: list[dict[str, Any]],
                top: dict[str, list[tuple[str | None, dict[str, Any]]]], providers: dict[str, Any] | None) -> str:
    """The whole page for `caller`: budgets, rate limits, today's top models and end users, and (admin)
    providers' breakers and canaries."""
    parts = [f"<h1>Gateway status</h1><p class=\"meta\">Key <b>{escape(caller)}</b> &middot; "
             f"{escape(now.strftime('%Y-%m-%d %H:%M UTC'))}</p>",
             "<h2>Budgets</h2>", "".join(_budget(e) for e in budgets) or _empty("No budget applies to this key."),
             "<h2>Rate limits</h2>", "".join(_rate(e) for e in rates) or _empty("No rate limit applies to this key."),
             "<h2>Top models today</h2>", _top(top["model"], "Model"),
             "<h2>Top end users today</h2>", _top(top["user"], "End user")]
    if providers is not None:
        parts += ["<h2>Providers</h2>", _breakers(providers["data"]), *_canaries(providers.get("canaries"))]
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>Gateway status</title><style>{_STYLE}</style></head><body><main>{''.join(parts)}"
            "</main></body></html>")


def _empty(text: str) -> str:
    return f"<p class=\"empty\">{escape(text)}</p>"


def _data(entry: dict[str, Any], *names: str) -> str:
    """`data-<name>="value"` for each name the entry has."""
    return "".join(f' data-{name.replace("_", "-")}="{escape(str(entry[name]))}"' for name in names
                   if entry.get(name) is not None)


def _bar(utilization: float) -> str:
    width = max(0.0, min(1.0, utilization)) * 100
    return f"<div class=\"bar\" role=\"meter\" aria-valuenow=\"{utilization}\"><span style=\"width:{width:.1f}%\"></span></div>"


def _who(entry: dict[str, Any]) -> str:
    if "provider" in entry:
        return f"provider {entry['provider']}"
    return entry["policy"] + (f" [{entry['each']} {entry['value']}]" if entry.get("each") else "")


def _budget(entry: dict[str, Any]) -> str:
    """One budget window: its bar, spent / reserved / limit, the reset in the policy's zone, the forecast."""
    attrs = _data(entry, "policy", "period", "unit", "spent", "reserved", "limit", "utilization", "value")
    resets = datetime.fromisoformat(entry["resets_at"]).strftime("%Y-%m-%d %H:%M")
    return (f"<div class=\"card window budget {escape(entry['state'])}\"{attrs}>"
            f"<h3>{escape(_who(entry))} &middot; {escape(entry['period'])} {escape(entry['unit'])}</h3>"
            f"{_bar(entry['utilization'])}<p class=\"figures\"><span class=\"spent\">{escape(str(entry['spent']))}</span>"
            f" spent / <span class=\"reserved\">{escape(str(entry['reserved']))}</span> in flight / "
            f"<span class=\"limit\">{escape(str(entry['limit']))}</span> limit &middot; "
            f"<span class=\"utilization\">{entry['utilization'] * 100:.1f}%</span></p>"
            f"<p class=\"meta\">Resets {escape(resets)} ({escape(entry['timezone'])}){_forecast(entry)}</p></div>")


def _forecast(entry: dict[str, Any]) -> str:
    ahead = entry.get("forecast")
    if not ahead:
        return ""
    text = (f" &middot; <span class=\"forecast\">{escape(str(ahead['burn_per_hour']))}/h, "
            f"{escape(str(ahead['projected_at_reset']))} projected at the reset")
    if ahead["exhausted_at"]:
        zone = datetime.fromisoformat(entry["resets_at"]).tzinfo
        out = datetime.fromisoformat(ahead["exhausted_at"]).astimezone(zone).strftime("%Y-%m-%d %H:%M")
        text += f", runs out {escape(out)}"
    return text + "</span>"


def _rate(entry: dict[str, Any]) -> str:
    attrs = _data(entry, "policy", "provider", "per", "unit", "used", "limit", "utilization", "value")
    empty_in = f" &middot; empty in {entry['empty_in_s']:.0f} s" if entry.get("empty_in_s") else ""
    return (f"<div class=\"card window rate\"{attrs}><h3>{escape(_who(entry))} &middot; per "
            f"{escape(str(entry['per']))} {escape(entry['unit'])}</h3>{_bar(entry['utilization'])}"
            f"<p class=\"figures\"><span class=\"used\">{entry['used']}</span> used / "
            f"<span class=\"limit\">{entry['limit']}</span> limit{empty_in}</p></div>")


def _top(groups: list[tuple[str | None, dict[str, Any]]], title: str) -> str:
    if not groups:
        return _empty("Nothing spent yet today.")
    rows = "".join(f"<tr><td>{escape(name or '(none)')}</td><td class=\"n\">{totals['requests']}</td>"
                   f"<td class=\"n\">{escape(totals['cost_usd'])}</td></tr>" for name, totals in groups)
    return f"<table><tr><th>{title}</th><th>Requests</th><th>USD</th></tr>{rows}</table>"


def _breakers(entries: list[dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{escape(e['provider'])}</td><td>{escape(e['state'])}</td>"
                   f"<td class=\"n\">{e['failure_rate'] * 100:.1f}%</td><td>{escape(e['open_until'] or '-')}</td></tr>"
                   for e in entries)
    return f"<table class=\"breakers\"><tr><th>Provider</th><th>Breaker</th><th>Failures</th><th>Open until</th></tr>{rows}</table>"


def _canaries(canaries: list[dict[str, Any]] | None) -> list[str]:
    if not canaries:
        return []
    rows = "".join(f"<tr><td>{escape(c['route'])}</td><td>{escape(c['status'])}</td>"
                   f"<td class=\"n\">{c['candidate_percent']}%</td></tr>" for c in canaries)
    return ["<h2>Canaries</h2>", f"<table class=\"canaries\"><tr><th>Route</th><th>Status</th><th>Candidate</th></tr>"
            f"{rows}</table>"]
