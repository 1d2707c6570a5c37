"""`make demo`: the whole loop on a corpus every Python carries.

Train a byte-level BPE tokenizer and a ``tiny`` decoder-only model on the standard
library's own documentation (pydoc topics) and source, for a fixed time budget,
then print a few generated samples. No download, no data shipped with zenlm.
"""
from __future__ import annotations

import logging
import math
import sysconfig
import time
from pathlib import Path

import torch

from .config import TransformerConfig
from .model import KVCache, TransformerLM
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


@torch.no_grad()
def sample(model: TransformerLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 60,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """Top-k sampling with a KV cache (a compact stand-in; zenlm.generate has every strategy)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt)])
    cache, out = KVCache(ids.size(1) + max_new_tokens), []
    step = ids
    for _ in range(max_new_tokens):
        if cache.length + step.size(1) > model.config.max_position_embeddings:
            break
        logits = model(step, past_key_values=cache, use_cache=True).logits[0, -1] / temperature
        kth = logits.topk(top_k).values[-1]
        probs = logits.masked_fill(logits < kth, -math.inf).softmax(-1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == tokenizer.eos_id:
            break
        out.append(nxt)
        step = torch.tensor([[nxt]])
    return prompt + tokenizer.decode(out)


def run(out: str = "runs/demo", seconds: float = 60.0, seed: int = 0, batch_size: int = 16, seq_len: int = 128) -> Path:
    from tqdm import tqdm

    torch.manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = stdlib_corpus()
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB from the standard library")
    start = time.perf_counter()
    tokenizer = Tokenizer.train(texts, vocab_size=4096, kind="bpe")
    print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens in {time.perf_counter() - start:.1f}s")
    eos = tokenizer.eos_id
    ids: list[int] = []
    for enc in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
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
    for i, prompt in enumerate(["def ", "The ", "class "]):
        print(f"--- sample {i + 1} ---")
        print(sample(model, tokenizer, prompt, seed=seed + i))
    return out_dir


def _cpu_has_bf16() -> bool:
    """bf16 autocast pays off only where the CPU has native bf16 matmuls (AVX-512 BF16 / AMX)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
