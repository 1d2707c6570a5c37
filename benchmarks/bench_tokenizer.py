"""Tokenizer training speed: a 16k byte-level BPE on ~10 MB of real text.

    .venv/bin/python benchmarks/bench_tokenizer.py

Text: tinyshakespeare (../shared/data) plus the Python standard library's docs and source,
repeated to 10 MB. Prints seconds to train and encode throughput.
"""
import sys
import time
from pathlib import Path

from zenlm import Tokenizer
from zenlm.demo import stdlib_corpus

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main(target_mb: float = 10.0) -> None:
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    texts = stdlib_corpus(max_bytes=8_000_000)
    if SHAKESPEARE.exists():
        texts.append(SHAKESPEARE.read_text(encoding="utf-8"))
    size = sum(len(t.encode()) for t in texts)
    reps = max(1, int(target_mb * 1e6 // size) + 1)
    corpus = (texts * reps)
    corpus_bytes = sum(len(t.encode()) for t in corpus)
    start = time.perf_counter()
    tok = Tokenizer.train(corpus, vocab_size=16000, kind="bpe")
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    n_tokens = sum(len(e.ids) for e in tok.backend.encode_batch(texts))
    enc_s = time.perf_counter() - start
    in_bytes = sum(len(t.encode()) for t in texts)
    print(f"train 16k BPE on {corpus_bytes / 1e6:.1f} MB: {train_s:.1f} s")
    print(f"encode {in_bytes / 1e6:.1f} MB -> {n_tokens:,} tokens in {enc_s:.2f} s ({in_bytes / 1e6 / enc_s:.1f} MB/s)")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
