"""llama.cpp as a real upstream: its own OpenAI-compatible server (llama-cpp-python's
``python -m llama_cpp.server``, in its own process: beside torch it crashes) on 127.0.0.1 with a tiny
GGUF that zenlm exports here (f32), behind the gateway, driven by the official openai client.
Replies pass through as llama.cpp gives them (checked against asking it directly, greedy), a JSON
answer is billed from llama.cpp's usage, a stream (llama.cpp reports none) is counted with the GGUF's
tokenizer: exactly the tokens of the text delivered (checked with transformers' tokenizer). Then
``zenlm serve --engine llama.cpp`` starts the child itself, from a .gguf file and from a folder, and
the child dies with the gateway, whether it is stopped or killed."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port, save_tiny, start_server, wait_healthy

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama_cpp is not importable: pip install 'zenlm[llamacpp]' (llama-cpp-python[server]; pip builds "
                "llama.cpp from source, ~20 minutes on 2 cores)", allow_module_level=True)

pytestmark = pytest.mark.slow
PLAN = {"*": (1_000_000, 2_000_000)}  # 1 and 2 micros per prompt and completion token


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random llama exported to GGUF f32 by zenlm, beside the folder it came from."""
    import zenlm
    from zenlm.gguf import export_gguf

    folder = save_tiny(tmp_path_factory.mktemp("llama") / "tiny")
    model = zenlm.load(str(folder))
    path = folder.parent / "tiny.gguf"
    export_gguf(model, model.tokenizer, path, type="f32")
    return folder, path


def _tokens(folder: Path):
    """transformers' tokenizer over the folder's tokenizer.json: the independent count."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return lambda text: len(ref.encode(text, add_special_tokens=False))


def _post(url: str, route: str, body: dict) -> dict:
    req = urllib.request.Request(url + route, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _wait_answering(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, f"llama_cpp.server exited: {proc.stdout.read().decode()[-2000:]}"
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("llama_cpp.server did not answer within 120 s")


def test_llama_cpp_server_behind_the_gateway(tiny_gguf, tmp_path):
    from zenlm.serve.upstream import parse_upstream

    folder, gguf = tiny_gguf
    tokens = _tokens(folder)
    port = free_port()
    llama = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                              "--port", str(port), "--n_ctx", "128", "--n_threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    gw = None
    try:
        _wait_answering(llama, url)
        up = parse_upstream(f"llama={url};tokenizer={gguf};timeout=60")
        gw = start_server(tmp_path, [], upstreams=[up])
        billing = gw.billing
        key = billing.create_key("acme", "basic")[0]
        client = gw.client(key)
        messages = [{"role": "user", "content": "hello world"}]

        def row(raw):
            rows = [r for r in billing.ledger() if r["request_id"] == raw.headers["x-request-id"]]
            assert len(rows) == 1, rows
            return rows[0]

        # chat, plain: the same reply llama.cpp gives directly, billed from its usage
        direct = _post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0})
        raw = client.chat.completions.with_raw_response.create(model="llama", messages=messages, max_tokens=6,
                                                              temperature=0)
        reply = raw.parse()
        assert reply.choices[0].message.content == direct["choices"][0]["message"]["content"]
        assert reply.usage.completion_tokens == direct["usage"]["completion_tokens"] >= 1
        r = row(raw)
        assert (r["prompt_tokens"], r["completion_tokens"], r["counted"]) == (
            direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"], None)
        assert r["revenue_micros"] == r["prompt_tokens"] + 2 * r["completion_tokens"]

        # chat, streamed: the same text, counted with the GGUF's tokenizer (llama.cpp sends no usage)
        raw = client.chat.completions.with_raw_response.create(
            model="llama", messages=messages, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content
        r = row(raw)
        assert r["counted"] == "local-tokenizer" and r["completion_tokens"] == tokens(text)
        assert r["prompt_tokens"] == tokens("hello world")  # the message text: never more than llama.cpp saw
        assert chunks[-1].usage.completion_tokens == tokens(text)

        # completions, plain and streamed
        direct = _post(url, "/v1/completions", {"prompt": "the quick brown", "max_tokens": 5, "temperature": 0})
        raw = client.completions.with_raw_response.create(model="llama", prompt="the quick brown", max_tokens=5,
                                                          temperature=0)
        done = raw.parse()
        assert done.choices[0].text == direct["choices"][0]["text"]
        assert row(raw)["completion_tokens"] == direct["usage"]["completion_tokens"]
        raw = client.completions.with_raw_response.create(model="llama", prompt="the quick brown", max_tokens=5,
                                                          temperature=0, stream=True)
        text = "".join(c.choices[0].text for c in raw.parse() if c.choices)
        assert text == done.choices[0].text
        r = row(raw)
        assert r["counted"] == "local-tokenizer" and r["completion_tokens"] == tokens(text)
        # the ledger is the whole bill: every row's revenue, summed, is what the key spent
        spent = billing.key_month(key[:11])["spent_micros"]
        assert spent == sum(x["revenue_micros"] for x in billing.ledger()) > 0
    finally:
        if gw is not None:
            gw.stop()
        llama.terminate()
        llama.wait(timeout=20)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _gone(pid: int, within: float = 20.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("source, stop", [("gguf", "terminate"), ("folder", "kill")])
def test_engine_llama_cpp_runs_a_managed_child_that_dies_with_the_gateway(tiny_gguf, tmp_path, source, stop):
    import openai

    from zenlm.serve import engines
    from zenlm.serve.billing import Billing

    folder, gguf = tiny_gguf
    db = str(tmp_path / "gw.sqlite3")
    billing = Billing.open(db)
    billing.create_plan("basic", PLAN, monthly_budget_micros=10 ** 9, replace=True)
    key = billing.create_key("acme", "basic")[0]
    port = free_port()
    model = str(gguf) if source == "gguf" else f"tiny={folder}"
    proc = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "serve", "--engine", "llama.cpp", model,
                             "--engine-threads", "1", "--port", str(port), "--database", db],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    children = []
    try:
        wait_healthy(proc, port)
        children = _children(proc.pid)
        assert len(children) == 1
        # llama-server where scripts/build-llamacpp.sh built it, else llama-cpp-python's server
        expected = str(engines.llama_server_bin()) if engines.llama_server_bin().is_file() else "llama_cpp.server"
        assert expected in Path(f"/proc/{children[0]}/cmdline").read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        raw = client.chat.completions.with_raw_response.create(model="tiny", max_tokens=4, temperature=0,
                                                              messages=[{"role": "user", "content": "hello"}])
        reply = raw.parse()
        stream = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "hello"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            reply.choices[0].message.content
        rows = billing.ledger()
        assert len(rows) == 2 and rows[0]["completion_tokens"] == reply.usage.completion_tokens
        assert billing.key_month(key[:11])["spent_micros"] == sum(r["revenue_micros"] for r in rows) > 0
    finally:
        if stop == "terminate":
            proc.terminate()
        else:
            os.kill(proc.pid, signal.SIGKILL)  # no cleanup code runs: the kernel ends the child
        proc.wait(timeout=30)
    assert children and all(_gone(c) for c in children), "the llama.cpp child outlived the gateway"
