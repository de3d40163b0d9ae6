"""`gateway usage`: spend (and what the response cache saved) from the ledger per model, key, team, policy,
provider or endpoint, as a table or CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import os
from typing import Any
from urllib.parse import urlencode

import aiohttp

from gateway.status_cli import fetch_status, table

__all__ = ["COLUMNS", "TABLE_COLUMNS", "usage_path", "render_table", "render_csv", "collect", "run_usage"]

COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "cache_hits", "saved_usd",
           "cache_write_tokens")   # (a column added later goes last: spreadsheets read columns by position)
TABLE_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "cost_usd",
                 "cache_hits", "saved_usd")   # (people read a table by its header: cache writes beside reads)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")   # what makes a spreadsheet read a cell as a formula


def usage_path(since: str | None, until: str | None, group_by: str) -> str:
    """The /v1/budget/usage path with its query (times passed on as given: ISO 8601 or epoch seconds)."""
    query = {"group_by": group_by, **({"since": since} if since else {}), **({"until": until} if until else {})}
    return "/v1/budget/usage?" + urlencode(query)


def render_table(body: dict[str, Any]) -> str:
    """One row per group, then the total, under a line naming the time range."""
    rows = [[_group(entry["group"]), *(str(entry[column]) for column in TABLE_COLUMNS)] for entry in body["data"]]
    rows.append(["TOTAL", *(str(body["total"][column]) for column in TABLE_COLUMNS)])
    header = [body["group_by"].upper(), "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "CACHE WRITE", "COST USD",
              "CACHE HITS", "SAVED USD"]
    return f"usage from {body['since']} to {body['until']}\n" + table(rows, header)


def render_csv(body: dict[str, Any]) -> str:
    """A header row, then one row per group (an empty cell for a row without that group); no cell is a formula."""
    out = io.StringIO()
    rows = [[body["group_by"], *COLUMNS]]
    rows += [[entry["group"] or "", *(entry[column] for column in COLUMNS)] for entry in body["data"]]
    csv.writer(out).writerows([_text_cell(str(cell)) for cell in row] for row in rows)
    return out.getvalue()


def _text_cell(text: str) -> str:
    """`text` as a spreadsheet shows it: a leading `'` when it would otherwise start a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _group(name: str | None) -> str:
    return "(none)" if name is None else name


async def collect(url: str, key: str | None, path: str, as_csv: bool) -> tuple[str, int]:
    """The printed report and the exit code."""
    status, body = await fetch_status(url, key, path)
    if status != 200:
        return f"error {status}: {body.get('error', {}).get('message', body)}", 1
    return (render_csv(body) if as_csv else render_table(body)), 0


def run_usage(url: str, key: str | None, since: str | None, until: str | None, group_by: str,
              as_csv: bool) -> int:
    """Print the usage report; the key defaults to $GATEWAY_KEY."""
    path = usage_path(since, until, group_by)
    try:
        report, code = asyncio.run(collect(url, key or os.environ.get("GATEWAY_KEY"), path, as_csv))
    except aiohttp.ClientError as exc:
        report, code = f"cannot reach the gateway at {url}: {exc}", 2
    print(report, end="" if as_csv and code == 0 else "\n")
    return code
