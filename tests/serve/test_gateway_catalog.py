"""The gateway's catalog and failure rules: a YAML catalog of upstreams (validated, each error naming
the key and value), an upstream unreachable at start (reported, set aside, re-admitted when it
comes up, never fatal), every replica failing (502, nothing charged), a replica going silent
mid-stream (the timeout between bytes ends the stream; the client pays for what it got), and an
upstream without usage counted exactly with the model's tokenizer (the delivered text's tokens,
the prompt through the chat template), checked against transformers' tokenizer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import free_port, leave_stream, start_server, wait_for_ledger_row, wait_healthy
from .test_serve_upstream import PROMPT_TOKENS, WORDS, Fake, _client

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- the catalog file
def test_catalog_reads_every_option(tmp_path, model_dir, monkeypatch):
    from zenlm.serve.billing import to_micros
    from zenlm.serve.upstream import load_catalog

    monkeypatch.setenv("ZEN_CAT_KEY", "sk-upstream")
    ups = load_catalog(_write(tmp_path / "c.yaml", f"""
upstreams:
  - name: llama
    urls: [http://10.0.0.5:8080/v1/, "http://10.0.0.6:8080"]
    timeout: 12.5
    concurrency: 3
    price: 0.90
    tokenizer: {model_dir}
    model: meta/llama
    max_tokens: 64
    eject: 0
    health: 0.5
    api_key_env: ZEN_CAT_KEY
  - name: small
    url: http://127.0.0.1:9000
"""))
    llama, small = ups
    assert [r.url for r in llama.replicas] == ["http://10.0.0.5:8080", "http://10.0.0.6:8080"]
    assert (llama.timeout_s, llama.concurrency, llama.remote_model, llama.max_tokens) == (12.5, 3, "meta/llama", 64)
    assert (llama.eject_s, llama.health_s, llama.api_key) == (0.0, 0.5, "sk-upstream")
    assert llama.price_micros_per_hour == to_micros("0.90") == 900_000
    assert llama.count("hello world") >= 1 and llama.tokenizer_path == str(model_dir)
    assert [r.url for r in small.replicas] == ["http://127.0.0.1:9000"] and small.tokenizer is None


@pytest.mark.parametrize("body, why", [
    ("upstreams: [{name: a, urls: [http://h:1], timeout: soon}]", r"upstreams\[0\] \(a\): bad value for timeout: 'soon'"),
    ("upstreams: [{name: a, urls: [http://h:1], timeout: -1}]", r"\(a\): bad value for timeout: -1"),
    ("upstreams: [{name: a, urls: [http://h:1], concurrency: 2.5}]", r"bad value for concurrency: 2.5"),
    ("upstreams: [{name: a, urls: [http://h:1], concurrency: 0}]", r"bad value for concurrency: 0"),
    ("upstreams: [{name: a, urls: [http://h:1], concurrency: true}]", r"bad value for concurrency: True"),
    ("upstreams: [{name: a, urls: [http://h:1], price: -2}]", r"bad value for price \(per hour and replica\)"),
    ("upstreams: [{name: a, urls: [http://h:1], price: 0.0000001}]", r"at most 6 decimal places"),
    ("upstreams: [{name: a, urls: [http://h:1], colour: red}]", r"\(a\): unknown option 'colour'"),
    ("upstreams: [{name: a, urls: [ftp://h:1]}]", r"\(a\): 'ftp://h:1' is not an http"),
    ("upstreams: [{name: a, urls: []}]", r"urls must be a URL or a non-empty list"),
    ("upstreams: [{name: a}]", r"\(a\): give either url: or urls:, got neither"),
    ("upstreams: [{name: a, url: http://h:1, urls: [http://h:2]}]", r"give either url: or urls:"),
    ("upstreams: [{urls: [http://h:1]}]", r"upstreams\[0\] has no name"),
    ("upstreams: [{name: a, url: http://h:1}, {name: a, url: http://h:2}]", r"upstreams\[1\] \(a\): .* given twice"),
    ("upstreams: [{name: a, url: http://h:1, tokenizer: /no/such/folder}]", r"\(a\): tokenizer '/no/such/folder'"),
    ("upstreams: [{name: a, url: http://h:1, api_key_env: ZENLM_NO_SUCH_VAR}]", r"\$ZENLM_NO_SUCH_VAR is not set"),
    ("upstreams: [a, b]", r"upstreams\[0\] must be a mapping"),
    ("upstream: []", r"one key, 'upstreams'"),
    ("upstreams: []", r"lists no upstreams"),
    ("upstreams: [{name: a\n", r"is not valid YAML"),
])
def test_catalog_errors_name_the_key_and_value(tmp_path, body, why):
    from zenlm.serve.upstream import load_catalog

    path = _write(tmp_path / "bad.yaml", body)
    with pytest.raises(ValueError, match=why) as e:
        load_catalog(path)
    assert path in str(e.value)


def test_catalog_file_missing_is_named(tmp_path):
    from zenlm.serve.upstream import load_catalog

    with pytest.raises(FileNotFoundError, match="no catalog file at .*nope.yaml"):
        load_catalog(tmp_path / "nope.yaml")


def test_cli_bad_catalog_is_one_line_and_exit_code(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "upstreams: [{name: a, urls: [http://h:1], timeout: soon}]")
    proc = subprocess.run([sys.executable, "-m", "zenlm.cli", "serve", "--catalog", bad, "--database",
                           str(tmp_path / "db.sqlite3"), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad value for timeout: 'soon'" in lines[0] and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- unreachable at start
def _admin(url: str) -> dict:
    req = urllib.request.Request(url + "/admin/upstreams", headers={"Authorization": "Bearer admin"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return {u["name"]: u for u in json.loads(r.read())["data"]}


def test_an_upstream_unreachable_at_start_is_reported_retried_and_not_fatal(tmp_path):
    import openai

    from zenlm.serve.billing import Billing

    late_port = free_port()  # nothing listens there yet
    good = Fake()
    catalog = _write(tmp_path / "upstreams.yaml", f"""
upstreams:
  - name: late
    url: http://127.0.0.1:{late_port}
    health: 0.3
    timeout: 5
  - name: up
    urls: [{good.url}]
""")
    db = str(tmp_path / "gw.sqlite3")
    billing = Billing.open(db)
    billing.create_plan("basic", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 9, replace=True)
    key = billing.create_key("acme", "basic")[0]
    port = free_port()
    log = open(tmp_path / "stderr.txt", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "zenlm.cli", "serve", "--catalog", catalog, "--port", str(port),
                             "--database", db, "--admin-token", "admin"],
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stderr = log  # wait_healthy reads it if the server exits
    late = None
    try:
        wait_healthy(proc, port)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 10
        while _admin(url)["late"]["replicas"][0]["healthy"] and time.time() < deadline:
            time.sleep(0.05)
        assert not _admin(url)["late"]["replicas"][0]["healthy"]
        report = (tmp_path / "stderr.txt").read_text()
        assert f"upstream late: replica http://127.0.0.1:{late_port} does not answer" in report
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)
        assert client.chat.completions.create(model="up", max_tokens=2, messages=[{"role": "user", "content": "x"}]
                                              ).choices[0].message.content == "".join(WORDS[:2])
        with pytest.raises(openai.APIStatusError) as e:  # while it is down: 502, nothing charged
            client.chat.completions.create(model="late", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 502 and "did not answer" in e.value.message
        spent = PROMPT_TOKENS + 4
        assert billing.key_month(key[:11])["spent_micros"] == spent

        late = Fake(port=late_port)  # it comes up: the health check re-admits it without any request
        deadline = time.time() + 10
        while not _admin(url)["late"]["replicas"][0]["healthy"]:
            assert time.time() < deadline, "the late upstream was not re-admitted"
            time.sleep(0.1)
        assert late.calls == 0
        reply = client.chat.completions.create(model="late", max_tokens=3, messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == "".join(WORDS[:3]) and late.calls == 1
        assert billing.key_month(key[:11])["spent_micros"] == spent + PROMPT_TOKENS + 6
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        good.stop()
        if late is not None:
            late.stop()


# --------------------------------------------------------------------------- failures and exact counts
@pytest.fixture(scope="module")
def gateway(tmp_path_factory, model_dir):
    from zenlm.serve.upstream import parse_upstream

    templated = tmp_path_factory.mktemp("tok") / "templated"
    shutil.copytree(model_dir, templated)
    (templated / "chat_template.jinja").write_text(CHAT)
    broken, broken2, stalls = Fake(status=500), Fake(status=503), Fake(stall_after=2)
    bare, trickle = Fake(usage=False), Fake(usage=False, delay=0.2)
    ups = [parse_upstream(f"broken={broken.url},{broken2.url}"),
           parse_upstream(f"stalls={stalls.url};timeout=0.5"),
           parse_upstream(f"exact={bare.url};tokenizer={templated}"),
           parse_upstream(f"trickle={trickle.url};tokenizer={templated}")]
    gw = start_server(tmp_path_factory.mktemp("gw"), [], upstreams=ups, admin_token="admin")
    yield dict(url=gw.url, billing=gw.billing, templated=templated, broken=broken, broken2=broken2,
               upstreams=gw.app.app.state.upstreams)
    gw.stop()
    for f in (broken, broken2, stalls, bare, trickle):
        f.stop()


def _rows(billing, model):
    return [r for r in billing.ledger() if r["model"] == model]


def test_every_replica_failing_is_502_and_charges_nothing(gateway):
    import openai

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    for stream in (False, True):
        calls = gateway["broken"].calls + gateway["broken2"].calls
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="broken", max_tokens=2, stream=stream,
                                           messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 502 and "nothing was charged" in e.value.message
        assert gateway["broken"].calls + gateway["broken2"].calls == calls + 2  # both tried, once each
    assert _rows(billing, "broken") == []
    month = billing.key_month(key[:11])
    assert month["spent_micros"] == 0 and month["reserved_micros"] == 0
    assert gateway["upstreams"]["broken"].in_flight == 0


def test_a_replica_silent_mid_stream_times_out_and_bills_what_was_delivered(gateway):
    import openai

    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    raw = _client(gateway, key).chat.completions.with_raw_response.create(
        model="stalls", max_tokens=5, stream=True, messages=[{"role": "user", "content": "hi"}])
    got = []
    started = time.time()
    with pytest.raises(openai.APIError, match="mid-stream"):
        for c in raw.parse():
            if c.choices:
                got.append(c.choices[0].delta.content or "")
    assert time.time() - started < 10  # the 0.5 s timeout between bytes ended it, not the 30 s stall
    assert "".join(got) == "".join(WORDS[:2])
    row = [r for r in billing.ledger() if r["request_id"] == raw.headers["x-request-id"]][0]
    assert row["status"] == "upstream_error" and row["completion_tokens"] == 2
    assert billing.key_month(key[:11])["spent_micros"] == row["prompt_tokens"] + 2 * 2


def _reference(templated):
    """transformers' tokenizer over the same files: the independent count."""
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(templated / "tokenizer.json"))
    ref.chat_template = CHAT

    def prompt(messages):
        out = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    return prompt, lambda text: len(ref.encode(text, add_special_tokens=False))


def test_no_usage_is_counted_exactly_with_the_models_tokenizer(gateway):
    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    client = _client(gateway, key)
    prompt_tokens, tokens = _reference(gateway["templated"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world, 你好"}]
    expect_prompt = prompt_tokens(messages)
    assert expect_prompt > tokens("be brief" + "hello world, 你好")  # the template's own tokens are counted
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(model="exact", max_tokens=4, stream=stream,
                                                              messages=messages)
        reply = raw.parse()
        text = ("".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream
                else reply.choices[0].message.content)
        assert text == "".join(WORDS[:4])
        row = [r for r in billing.ledger() if r["request_id"] == raw.headers["x-request-id"]][0]
        assert row["counted"] == "local-tokenizer"
        assert (row["prompt_tokens"], row["completion_tokens"]) == (expect_prompt, tokens(text))
        assert row["revenue_micros"] == expect_prompt + 2 * tokens(text)
    raw = client.completions.with_raw_response.create(model="exact", prompt="the quick brown fox", max_tokens=3)
    row = [r for r in billing.ledger() if r["request_id"] == raw.headers["x-request-id"]][0]
    assert row["prompt_tokens"] == tokens("the quick brown fox")


def test_a_client_leaving_is_charged_the_tokens_of_the_text_it_was_sent(gateway):
    billing = gateway["billing"]
    key = billing.create_key("acme", "basic")[0]
    _, tokens = _reference(gateway["templated"])
    raw = _client(gateway, key).chat.completions.with_raw_response.create(
        model="trickle", max_tokens=6, stream=True, messages=[{"role": "user", "content": "hi"}])
    leave_stream(raw)
    wait_for_ledger_row(billing, lambda r: r["request_id"] == raw.headers["x-request-id"],
                        "the stream the client left")
    row = [r for r in billing.ledger() if r["request_id"] == raw.headers["x-request-id"]][0]
    assert row["status"] == "disconnected" and row["counted"] == "local-tokenizer"
    # the text written to its connection: the 2 words it read, or a third already on the wire
    assert row["completion_tokens"] in {tokens("".join(WORDS[:2])), tokens("".join(WORDS[:3]))}
    assert billing.key_month(key[:11])["reserved_micros"] == 0
