"""README's first command, exactly as written, in a fresh copy and virtualenv, serves a real answer.

The second command (the tests) is what `.ci/run` runs on a clean checkout, so CI proves that one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "data", "__pycache__", "*.egg-info", "build", "results")
STARTUP_LIMIT_S = 300


def readme_command(marker: str) -> str:
    """The command in the fenced block right after `marker` in README.md."""
    text = (ROOT / "README.md").read_text()
    block = text.split(marker, 1)[1].split("```", 2)[1]
    return block.removeprefix("bash").strip()


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def get_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_until_healthy(process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"quickstart exited early:\n{log.read_text()[-3000:]}"
        try:
            if get_json("http://127.0.0.1:8080/healthz")["status"] == "ok":
                return
        except OSError:
            pass
        time.sleep(0.5)  # polling a process we started for readiness, not hiding a race
    pytest.fail(f"quickstart not healthy within {STARTUP_LIMIT_S}s:\n{log.read_text()[-3000:]}")


def test_the_quickstart_command_serves_the_openai_sdk(tmp_path: Path) -> None:
    assert port_is_free(8080) and port_is_free(9000), "the quickstart needs ports 8080 and 9000 free"
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=SKIP)
    log = tmp_path / "quickstart.log"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", "-c", readme_command("<!-- run-command -->")], cwd=checkout,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_healthy(process, log)
        answer = get_json("http://127.0.0.1:8080/v1/chat/completions",
                          {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello"}]})
        assert answer["choices"][0]["message"]["content"]
        client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="any", max_retries=0)
        chunks = list(client.chat.completions.create(
            model="gpt-4.1", stream=True, messages=[{"role": "user", "content": "Hello"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "gateway listening on http://127.0.0.1:8080" in log.read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
