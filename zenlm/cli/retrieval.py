"""`zenlm index build|delete`, `search`, `evaluate retrieval`, `ask`: search and retrieval-augmented
answers (the README's "Search and retrieval-augmented answers")."""
from __future__ import annotations

import sys


def add_index(sub) -> None:
    p = sub.add_parser("index", help="build or change a search index (FAISS + BM25 + SQLite documents)")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="index text files, JSONL or BEIR corpus.jsonl(.gz); an existing index "
                                      "is updated (documents with the same id are replaced)")
    b.add_argument("docs", nargs="+", help="files or folders")
    b.add_argument("--out", required=True, help="index folder")
    b.add_argument("--model", default=None, help="embedding model folder (omit for a BM25-only index)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index instead of updating it")
    b.add_argument("--dense", choices=("auto", "flat", "hnsw"), default="auto",
                   help="exact inner product (flat) or HNSW; auto = HNSW above 50,000 documents")
    b.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32")
    b.add_argument("--batch-size", type=int, default=32)
    b.set_defaults(func=run_index_build)
    d = isub.add_parser("delete", help="remove documents by id")
    d.add_argument("dir")
    d.add_argument("ids", nargs="+")
    d.set_defaults(func=run_index_delete)


def run_index_build(args) -> None:
    from ..retrieval.index import IndexConfig, index_files

    index, changes, skipped = index_files(args.docs, args.out, args.model, overwrite=args.overwrite,
                                          config=IndexConfig(dense=args.dense), precision=args.precision,
                                          batch_size=args.batch_size, show_progress=True)
    for s in skipped:
        print(f"warning: {s}", file=sys.stderr)
    dense = f"{index.dense_kind} {index.model['dim']}-d, model {index.model['name']}" if index.model else "BM25 only"
    print(f"{len(index)} documents in {args.out} ({changes.added} added, {changes.updated} updated; {dense})")
    index.close()


def run_index_delete(args) -> None:
    from ..retrieval.index import Index

    with Index.open(args.dir) as index:
        changes = index.delete(args.ids)
        print(f"deleted {changes.deleted}; {len(index)} documents left"
              + (f"; not found: {', '.join(changes.missing)}" if changes.missing else ""))


def add_search(sub) -> None:
    p = sub.add_parser("search", help="search an index: BM25, dense, or hybrid (reciprocal rank fusion)")
    p.add_argument("dir")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--mode", choices=("bm25", "dense", "hybrid"), default=None,
                   help="default: hybrid, or bm25 for an index built without a model")
    p.add_argument("--model", default=None, help="default: the model folder the index was built with")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    p.set_defaults(func=run_search)


def run_search(args) -> None:
    from ..retrieval.index import Index, format_hits

    with Index.open(args.dir, args.model) as index:
        hits = index.search(args.query, k=args.k, mode=args.mode or ("hybrid" if index.model else "bm25"))
    if hits:
        print(format_hits(hits, as_json=args.json))


def add_evaluate_retrieval(esub) -> None:
    r = esub.add_parser("retrieval", help="nDCG@10, Recall@100, MRR@10 of an index on judged queries")
    r.add_argument("dir", help="index folder")
    r.add_argument("--queries", required=True, help="BEIR queries.jsonl, ID<TAB>TEXT, or SMART (cran.qry)")
    r.add_argument("--qrels", required=True, help="BEIR qrels TSV, TREC qrels, or cranqrel")
    r.add_argument("--qrels-format", choices=("auto", "beir", "trec", "cranfield"), default="auto")
    r.add_argument("--mode", choices=("bm25", "dense", "hybrid", "all"), default="hybrid")
    r.add_argument("--model", default=None, help="default: the model folder the index was built with")
    r.set_defaults(func=run_evaluate_retrieval)


def run_evaluate_retrieval(args) -> None:
    from ..retrieval.evaluate import evaluate_retrieval_files

    modes = ("bm25", "dense", "hybrid") if args.mode == "all" else (args.mode,)
    for scores in evaluate_retrieval_files(args.dir, args.queries, args.qrels, modes, args.qrels_format, args.model):
        print(scores)


def add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer a question from an index's passages with a generator model (RAG)")
    p.add_argument("dir", help="index folder")
    p.add_argument("model", help="generator model folder (decoder-only or encoder-decoder)")
    p.add_argument("question")
    p.add_argument("-k", type=int, default=3, help="passages to put in the prompt")
    p.add_argument("--mode", choices=("bm25", "dense", "hybrid"), default=None,
                   help="default: hybrid, or bm25 for an index built without a model")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--embed-model", default=None, help="default: the model the index was built with")
    p.set_defaults(func=run_ask)


def run_ask(args) -> None:
    from ..folders import load, load_tokenizer
    from ..retrieval.index import Index
    from ..retrieval.rag import ask

    generator = load(args.model)
    with Index.open(args.dir, args.embed_model) as index:
        mode = args.mode or ("hybrid" if index.model else "bm25")
        answer = ask(index, generator, args.question, k=args.k, mode=mode, tokenizer=load_tokenizer(args.model),
                     max_new_tokens=args.max_new_tokens)
    print(answer.text)
    print(f"sources: {', '.join(answer.citations)}" + (f" (named in the answer: {', '.join(answer.cited)})"
                                                       if answer.cited else ""))
    if answer.dropped_tokens:
        print(f"note: {answer.dropped_tokens} passage tokens did not fit the generator's context", file=sys.stderr)
