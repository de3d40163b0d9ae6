"""GET /ui rendered by Debian's headless Chromium: the bars show what the status endpoint says, a key sees only
its own policies and end users, the admin also providers, and without a key it is a 401."""

from __future__ import annotations

import asyncio
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gateway.http.appkeys import BUDGET
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, make_policy, make_settings

PHONE = "412,915"      # CSS pixels of a common Android phone
POLICIES = (make_policy("everyone", usd="100"), make_policy("team-web", usd="10", teams=("web",)),
            make_policy("team-data-secret", usd="10", teams=("data",)))
MESSAGES = [{"role": "user", "content": "show me on a phone"}]


def chromium() -> str:
    """Debian's chromium; a missing one fails under CI=true (.ci/run installs it) and skips the test otherwise."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing (CI installs the Debian 'chromium' package)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


async def headless(url: str, *args: str, tmp_path: Path) -> bytes:
    """Run headless Chromium on `url` with `args`; its stdout (the DOM for --dump-dom)."""
    process = await asyncio.create_subprocess_exec(
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={PHONE}", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode == 0
    return out


class Windows(HTMLParser):
    """Collects each `.window` element's data-* attributes, and all visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[dict[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "window" in (found.get("class") or "").split():
            self.windows.append({k[5:]: v or "" for k, v in found.items() if k.startswith("data-")}
                                | {"kind": "budget" if "budget" in (found.get("class") or "") else "rate"})

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(dom: bytes) -> Windows:
    page = Windows()
    page.feed(dom.decode())
    return page


def as_page(entry: dict[str, Any]) -> dict[str, str]:
    """A status entry's figures as the page's data attributes spell them."""
    return {name: str(entry[name]) for name in ("policy", "period", "unit", "spent", "reserved", "limit", "utilization")}


async def test_the_page_in_headless_chromium_shows_the_status_endpoints_numbers_and_only_the_keys_own(
        upstream, start_gateway, http, tmp_path):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=POLICIES))
    for key, user in [(CLIENT_KEY, "alice"), (CLIENT_KEY, "alice"), (CLIENT_KEY, "bob"), (OTHER_KEY, "carol")]:
        reply = await http(gateway, "POST", "/v1/chat/completions", key=key,
                           json={"model": "gpt-4.1", "messages": MESSAGES, "user": user})
        assert reply.status == 200
    await gateway.app[BUDGET].settled()
    host = gateway.url.removeprefix("http://")
    screenshot = tmp_path / "ui-phone.png"      # kept in pytest's tmp directory (the last 3 runs)

    dom = await headless(f"http://web:{CLIENT_KEY}@{host}/ui", "--dump-dom", tmp_path=tmp_path)
    await headless(f"http://web:{CLIENT_KEY}@{host}/ui", f"--screenshot={screenshot}", tmp_path=tmp_path)

    page = parse(dom)
    status = (await http(gateway, "GET", "/v1/budget/status", key=CLIENT_KEY)).json()["data"]
    bars = [{k: v for k, v in w.items() if k in as_page(status[0])} for w in page.windows if w["kind"] == "budget"]
    assert bars == [as_page(entry) for entry in status] and len(bars) == 2       # everyone and team-web, in USD
    text = " ".join(page.text)
    assert "team-data-secret" not in dom.decode() and "carol" not in text        # another tenant's never shows
    assert "alice" in text and "bob" in text and "Providers" not in text
    assert b'name="viewport" content="width=device-width' in dom
    assert screenshot.stat().st_size > 5_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    admin = parse(await headless(f"http://admin:{ADMIN_KEY}@{host}/ui", "--dump-dom", tmp_path=tmp_path))
    assert {w["policy"] for w in admin.windows} == {p.name for p in POLICIES}
    assert "Providers" in admin.text and "primary" in admin.text and "carol" in " ".join(admin.text)


async def test_without_a_key_or_with_a_wrong_one_the_page_is_a_401_with_a_basic_challenge(
        upstream, start_gateway, http):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=POLICIES))
    for headers in ({}, {"Authorization": "Basic d2ViOndyb25n"}, {"Authorization": "Basic !!!"}):
        reply = await http(gateway, "GET", "/ui", key=None, headers=headers)
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert reply.json()["error"]["code"] == "invalid_api_key"
