"""Fixtures for the server tests: tiny models saved to disk, and real uvicorn servers on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from zenlm import Tokenizer, TransformerConfig, TransformerLM  # noqa: E402

ADMIN = "admin-secret-token"
CORPUS = ["hello world, this is a small corpus for a tiny model. 你好世界 ",
          "the quick brown fox jumps over the lazy dog; 0123456789 ",
          "def serve(model): return model.generate(prompt) "] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny(path: Path, family: str = "decoder-only", window: int = 128, seed: int = 0) -> Path:
    tok = Tokenizer.train(CORPUS, vocab_size=320, kind="bpe", min_frequency=1)
    layers = dict(num_encoder_layers=0, num_decoder_layers=2) if family == "decoder-only" else \
        dict(num_encoder_layers=2, num_decoder_layers=2)
    preset = "tiny" if family == "decoder-only" else "tiny-seq2seq"
    cfg = TransformerConfig.from_preset(preset, vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=2, max_position_embeddings=window, **layers)
    torch.manual_seed(seed)
    TransformerLM(cfg).save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def seq2seq_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-mt", family="encoder-decoder")


@dataclass
class Running:
    url: str
    billing: object
    app: object
    server: object
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def key(self, plan: str = "basic", customer: str = "acme", **plan_options) -> str:
        """A fresh key on ``plan`` (created with ``plan_options`` when given)."""
        if plan_options:
            prices = plan_options.pop("prices", {"*": (1_000_000, 2_000_000)})
            self.billing.create_plan(plan, prices, replace=True, **plan_options)
        return self.billing.create_key(customer, plan)[0]

    def client(self, key: str, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def start_server(tmp_path: Path, models: list, embeddings: list = (), database: str | None = None,
                 port: int | None = None, upstreams: list = (), **config) -> Running:
    """A real uvicorn server for an app over the given model folders (and ``upstream.Upstream``s,
    the gateway's), in a thread of this process."""
    import uvicorn

    from zenlm.serve import ServeConfig, build_server

    config.setdefault("admin_token", ADMIN)
    config.setdefault("hardware_price_per_hour", "3.60")  # 1 micro per millisecond: easy to check
    cfg = ServeConfig(models=[str(m) for m in models], embeddings=[str(e) for e in embeddings],
                      database=database or str(tmp_path / "zenlm.sqlite3"), **config)
    app = build_server(cfg, upstreams)
    billing = app.app.state.server.billing
    billing.create_plan("basic", {"*": (1_000_000, 2_000_000)}, included_tokens=0, monthly_budget_micros=10 ** 9,
                        requests_per_minute=100_000, tokens_per_minute=10 ** 9, replace=True)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{port}", billing, app, server, thread)


def leave_stream(raw, after: int = 2) -> None:
    """A client leaving a streamed chat reply (``raw``, a with_raw_response) once ``after`` chunks carried text."""
    stream, got = raw.parse(), 0
    for c in stream:
        got += bool(c.choices and c.choices[0].delta.content)
        if got == after:
            break
    stream.close()


def wait_for_ledger_row(billing, match, what: str, timeout: float = 5) -> None:
    """Wait (up to ``timeout`` s) until a ledger row satisfies ``match``; fail with "no ledger row for ``what``"."""
    deadline = time.time() + timeout
    while not [r for r in billing.ledger() if match(r)]:
        assert time.time() < deadline, f"no ledger row for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def running(tmp_path_factory, model_dir, seq2seq_dir) -> Running:
    r = start_server(tmp_path_factory.mktemp("server"), [model_dir, seq2seq_dir], embeddings=[])
    yield r
    r.stop()


# --------------------------------------------------------------------------- PostgreSQL
def postgres_url() -> str:
    """ZENLM_TEST_POSTGRES_URL, checked to answer; skip (with why) only when it is not set up."""
    url = os.environ.get("ZENLM_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("PostgreSQL tests need ZENLM_TEST_POSTGRES_URL (scripts/install-postgres.sh sets one up; "
                    ".ci/run exports it)")
    from sqlalchemy import create_engine, text

    from zenlm.serve.store import database_url

    try:
        engine = create_engine(database_url(url))
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as e:
        pytest.fail(f"ZENLM_TEST_POSTGRES_URL is set but PostgreSQL does not answer: {e}")
    return url


def fresh_postgres(url: str) -> str:
    """Drop zenlm's tables so each test starts from an empty database."""
    from sqlalchemy import create_engine

    from zenlm.serve.store import database_url, metadata

    engine = create_engine(database_url(url))
    metadata.drop_all(engine)
    engine.dispose()
    return url


def spawn_server(model_dir: Path, database: str, port: int, *extra: str, env: dict | None = None,
                 wait: bool = True) -> subprocess.Popen:
    """`zenlm serve` as its own process; returns once it answers /health (or at once with wait=False)."""
    cmd = [sys.executable, "-m", "zenlm.cli", "serve", str(model_dir), "--port", str(port), "--database", database,
           "--admin-token", ADMIN, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return wait_healthy(proc, port) if wait else proc


def wait_healthy(proc: subprocess.Popen, port: int) -> subprocess.Popen:
    import urllib.request

    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zenlm serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("zenlm serve did not answer /health within 60 s")
