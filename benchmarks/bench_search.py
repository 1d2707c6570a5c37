"""Dense search latency through zenlm's Index: exact (FAISS flat inner product) against HNSW.

100,000 synthetic 384-d unit vectors (a mixture of 2,000 Gaussian clusters, like sentence
embeddings rather than uniform noise) go into two indexes built by ``Index.build`` (SQLite
document store, FAISS, BM25 — the real code path, vectors supplied instead of a model).
One query at a time, as a search box sends them: p50/p99 latency of each, and HNSW's
recall@10 against exact search.

    .venv/bin/python benchmarks/bench_search.py [--n 100000] [--queries 500] [--threads 1]

Target (issue 7): HNSW recall@10 >= 0.95.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zenlm import TransformerConfig, TransformerModel, Tokenizer
from zenlm.retrieval import Document, Embedder, Index, IndexConfig


class GivenVectors(Embedder):
    """An embedder whose vector for "v <i>" is row i of a fixed matrix (queries: "q <i>")."""

    def __init__(self, docs: np.ndarray, queries: np.ndarray):
        tok = Tokenizer.train(["v q 0 1 2 3 4 5 6 7 8 9"], vocab_size=64, kind="char")
        config = TransformerConfig(vocab_size=tok.vocab_size, hidden_size=docs.shape[1], intermediate_size=8,
                                   num_attention_heads=1, num_encoder_layers=1, num_decoder_layers=0,
                                   max_position_embeddings=16)
        super().__init__(TransformerModel(config), tok, name="synthetic")
        self.docs, self.queries = docs, queries

    def encode(self, texts, batch_size=None, show_progress=False):
        return np.stack([(self.docs if t[0] == "v" else self.queries)[int(t.split()[1])] for t in texts])


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    # noise of norm ~0.35 around centres of norm ~1 (per-coordinate scale 0.35/sqrt(dim)); noise of
    # per-coordinate scale 0.35 would swamp the centres and make the set uniform on the sphere, where
    # nearest neighbours are barely nearer than anything else and no graph index finds them
    noise = 0.35 / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1,
                    help="FAISS threads; one query per thread is how a server runs, and OpenMP across 2 busy "
                         "cores for a single query costs more than it gains")
    ap.add_argument("--build-threads", type=int, default=2, help="FAISS threads while building")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--ef-search", type=int, default=128)
    args = ap.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    import faiss

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    docs = clustered(args.n, args.dim, rng, centres)
    queries = clustered(args.queries, args.dim, rng, centres)
    embedder = GivenVectors(docs, queries)
    corpus = [Document(str(i), f"v {i}") for i in range(args.n)]
    texts = [f"q {i}" for i in range(args.queries)]
    root = Path(tempfile.mkdtemp(prefix="zenlm-bench-search-"))
    try:
        runs = {}
        for kind in ("flat", "hnsw"):
            start = time.perf_counter()
            config = IndexConfig(dense=kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                                 ef_search=args.ef_search, depth=10)
            faiss.omp_set_num_threads(args.build_threads)
            index = Index.build(root / kind, corpus, embedder, config)
            build = time.perf_counter() - start
            faiss.omp_set_num_threads(args.threads)
            vectors = embedder.encode(texts)
            latencies, results = [], []
            for i in range(args.queries):
                t = time.perf_counter()
                results.append(index.rank_dense([texts[i]], 10, vectors[i:i + 1])[0])
                latencies.append(time.perf_counter() - t)
            runs[kind] = results
            ms = np.array(latencies) * 1000
            print(f"{kind:5s} {index.dense_kind}: built in {build:6.1f}s (incl. SQLite + BM25), "
                  f"p50 {np.percentile(ms, 50):7.3f} ms  p99 {np.percentile(ms, 99):7.3f} ms  "
                  f"({args.queries} single queries, {args.n:,} x {args.dim}-d, search on {args.threads} thread(s), "
                  f"built on {args.build_threads})")
            index.close()
        recall = np.mean([len({r for r, _ in a} & {r for r, _ in b}) / 10 for a, b in zip(runs["hnsw"], runs["flat"])])
        print(f"HNSW recall@10 vs exact: {recall:.4f} (M={args.hnsw_m}, efConstruction={args.ef_construction}, "
              f"efSearch={args.ef_search})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
