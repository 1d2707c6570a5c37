"""The playground in headless Chromium: paste a key, chat, see the streamed reply and its usage line."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .conftest import start_server

ARTIFACTS = Path(os.environ.get("ZENLM_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.mark.slow
def test_playground_chat_streams_and_shows_usage(tmp_path, model_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: run scripts/install-chromium.sh (.ci/run does)")
    running = start_server(tmp_path, [model_dir])
    try:
        key = running.key()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--no-first-run", "--disable-extensions"])
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(running.url + "/")
            # before a key: the page says where one comes from, and lists nothing (/v1/models needs a key)
            assert "make demo" in page.text_content("#key-hint") and "zenlm keys create" in page.text_content("#key-hint")
            assert "Paste the API key" in page.text_content("#status")
            page.fill("#key", key)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            assert page.input_value("#model") == "tiny"
            # only what this server can answer: no translation model, no index -> no such tabs, and a line
            # that says which command serves a translation model
            assert page.is_hidden("#translate-tab") and page.is_hidden("#search-tab") and page.is_visible("#embed-tab")
            assert "zenlm serve runs/multi30k-en-de/best" in page.text_content("#missing")
            assert page.is_hidden("#ground-row")
            page.fill("#max-tokens", "12")
            page.fill("#chat-input", "hello world")
            page.click("#send")
            usage = page.locator("#messages .usage").first
            usage.wait_for(state="visible")
            page.wait_for_function("document.querySelector('#messages .usage').textContent.includes('cost')",
                                   timeout=30_000)
            line = usage.text_content()
            reply = page.locator("#messages .msg.assistant").first.text_content()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground-chat.png"), full_page=True)
            # a second turn carries the history
            page.fill("#chat-input", "and again")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('#messages .usage').length == 2 && "
                                   "document.querySelectorAll('#messages .usage')[1].textContent.includes('cost')",
                                   timeout=30_000)
            browser.close()
        rows = running.billing.ledger()
        assert len(rows) == 2
        first = rows[0]
        m = re.search(r"tokens: (\d+) prompt \+ (\d+) completion = (\d+) · cost (\d+\.\d+) USD", line)
        assert m, line
        assert (int(m[1]), int(m[2]), int(m[3])) == (first["prompt_tokens"], first["completion_tokens"],
                                                    first["prompt_tokens"] + first["completion_tokens"])
        assert round(float(m[4]) * 1e6) == first["revenue_micros"]
        assert rows[1]["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"] - 1  # history was sent
        stored = running.billing.stored_response(first["id"])
        assert reply == stored["choices"][0]["message"]["content"]
        assert (ARTIFACTS / "playground-chat.png").stat().st_size > 5000
    finally:
        running.stop()
