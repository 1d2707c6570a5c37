"""`zenlm …`: argument parsing only. Every command calls a library function.

Each command is one ``add_<name>(subparsers)`` function that registers its
parser and sets ``func``; errors a user can cause (ValueError, FileNotFoundError)
become one red line and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def _bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {suffix}"
        n /= 1024
    return f"{n:.1f} PiB"


# --------------------------------------------------------------------------- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and memory of a preset or checkpoint folder; --system: this CPU")
    p.add_argument("model", nargs="?", default=None,
                   help="a preset name (see `zenlm info --list`), a checkpoint folder or a Hugging Face folder")
    p.add_argument("--system", action="store_true",
                   help="what this CPU has (ISA, VNNI, bf16, AMX, cores, caches) and the kernels zenlm picks for it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--bytes-per-param", type=int, default=4, choices=(2, 4))
    p.set_defaults(func=run_info)


def run_info(args) -> None:
    import os

    from ..config import PRESETS, TransformerConfig, estimate_costs

    if args.system:
        _print_system()
        if args.model is None:
            return
    if args.model is None:
        raise ValueError("give a preset or model folder, or --system")
    if args.model in PRESETS:
        config = TransformerConfig.from_preset(args.model)
    elif os.path.isdir(args.model):
        from ..hf import is_hf_folder, read_hf_config  # a Hugging Face folder reads as it imports

        config = read_hf_config(args.model) if is_hf_folder(args.model) else TransformerConfig.load(args.model)
    else:
        raise ValueError(f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.seq_len is not None and not 0 < args.seq_len <= config.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [1, {config.max_position_embeddings}], got {args.seq_len}")
    c = estimate_costs(config, args.batch_size, args.seq_len, args.bytes_per_param)
    print(f"{args.model}: {config.family}, {config.num_encoder_layers}+{config.num_decoder_layers} layers, "
          f"d={config.hidden_size}, heads={config.num_attention_heads} (kv {config.num_key_value_heads}), "
          f"ffn={config.intermediate_size}, vocab={config.vocab_size}, {config.norm}/{config.activation}/{config.position}")
    print(f"parameters            {c['parameters']:,} ({_human(c['parameters'])})")
    print(f"forward FLOPs/token   {_human(c['forward_flops_per_token'])}")
    print(f"training FLOPs/token  {_human(c['training_flops_per_token'])}")
    print(f"memory at batch {c['batch_size']} x {c['seq_len']} tokens ({args.bytes_per_param * 8}-bit weights):")
    for key in ("weights", "grads", "optimizer", "activations"):
        print(f"  {key:<12} {_bytes(c[key + '_bytes'])}")
    total = sum(c[k + "_bytes"] for k in ("weights", "grads", "optimizer", "activations"))
    print(f"  {'total':<12} {_bytes(total)}")


def _print_system() -> None:
    import torch

    from ..cpu import cpu_info, resolve_precision
    from ..kernels import fp32_linear_backend

    info = cpu_info()
    print(info.describe())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"int8 (dynamic): {info.int8_activation_bits}-bit activations "
          + ("(VNNI: 8-bit products cannot saturate)" if info.int8_activation_bits == 8 else
             "(no VNNI: 8-bit pair sums would saturate, so 7-bit, as torch's reduce_range)"))
    print(f"precision auto -> {resolve_precision('auto')} "
          + ("(native bf16)" if info.bf16 else "(no AVX512_BF16/AMX: emulated bf16 is ~100x slower, so fp32)"))
    print(f"fp32 linear layers under fast_cpu(): {fp32_linear_backend()}")


# --------------------------------------------------------------------------- tokenizer
def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on text files")
    t.add_argument("files", nargs="+")
    t.add_argument("--vocab-size", type=int, default=16000)
    t.add_argument("--kind", choices=("bpe", "unigram", "char"), default="bpe")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    t.set_defaults(func=run_tokenizer_train)


def run_tokenizer_train(args) -> None:
    import os
    import time

    from ..tokenizer import Tokenizer

    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}")
    start = time.perf_counter()
    tok = Tokenizer.train(args.files, vocab_size=args.vocab_size, kind=args.kind, min_frequency=args.min_frequency,
                          show_progress=sys.stderr.isatty())
    path = tok.save(args.out)
    size = sum(os.path.getsize(f) for f in args.files)
    print(f"trained {args.kind} tokenizer: {tok.vocab_size} tokens from {_bytes(size)} "
          f"in {time.perf_counter() - start:.1f}s -> {path}")


# --------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: train a tiny model, index the Python docs, serve it with billing",
                       description="Train (or reuse) a tiny model on the standard library's docs and source, index "
                                   "the docs with all-MiniLM-L6-v2, create a demo key and serve the playground.")
    p.add_argument("--seconds", type=float, default=120.0, help="training time budget (a second run reuses the model)")
    p.add_argument("--out", default="runs/demo", help="cache folder: model, index, database")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, batches and samples (default 0)")
    p.add_argument("--retrain", action="store_true", help="train again even if a model is cached in --out")
    p.add_argument("--no-serve", dest="serve", action="store_false", help="stop after training and samples")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None,
                   help="port to serve on (default 8000, or the next free one when 8000 is taken); "
                        "checked before training starts")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    from ..demo import run

    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.seconds <= 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    run(out=args.out, seconds=args.seconds, seed=args.seed, serve=args.serve, host=args.host, port=args.port,
        retrain=args.retrain)


# --------------------------------------------------------------------------- train
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model from a YAML config (see recipes/)",
                       description="zenlm train CONFIG.yaml [--key.sub VALUE ...]; runs DDP under torchrun")
    p.add_argument("config", help="a training config YAML file")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key.sub VALUE overrides, e.g. --optim.lr 1e-3")
    p.set_defaults(func=run_train)


def run_train(args) -> None:
    import json
    import logging
    import os

    from ..train import TrainConfig, parse_overrides, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = TrainConfig.from_yaml(args.config, parse_overrides(args.overrides))
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


# --------------------------------------------------------------------------- generate
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model folder, streamed to the terminal",
                       description="zenlm generate MODEL --prompt TEXT [options]; greedy unless --temperature > 0 "
                                   "(sampling) or --num-beams > 1")
    p.add_argument("model", help="a model folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 64")
    p.add_argument("--min-new-tokens", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 0")
    p.add_argument("--temperature", type=float, default=None, help="> 0 samples; 0 or unset decodes greedily")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 0")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 1.0")
    p.add_argument("--min-p", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 0.0")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 1.0")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 0")
    p.add_argument("--num-beams", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 1")
    p.add_argument("--length-penalty", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 1.0")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); not printed")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--truncate", action="store_true", help="cut a prompt longer than the context window")
    p.set_defaults(func=run_generate)


def run_generate(args) -> None:
    import os

    from .. import load, load_tokenizer
    from ..generate import Generator

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no model folder at {args.model}")
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    # options not given on the command line fall back to the model's defaults (an imported Hugging
    # Face folder's generation_config.json: beams, lengths, banned words), then to zenlm's
    given = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, top_k=args.top_k,
                 top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                 no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
                 length_penalty=args.length_penalty)
    options = {k: v for k, v in given.items() if v is not None}
    options.update(stop_strings=args.stop, seed=args.seed, truncate=args.truncate)
    if args.temperature is not None:
        options.update(do_sample=args.temperature != 0, temperature=args.temperature if args.temperature else 1.0)
    generator = Generator(model, tokenizer)
    if options.get("num_beams", generator.defaults.num_beams) > 1:
        print(generator.generate(args.prompt, **options)[0].text)
        return
    stream = generator.stream(args.prompt, **options)
    for delta in stream:
        print(delta, end="", flush=True)
    print()


# --------------------------------------------------------------------------- convert
def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face folders in and out (BERT, GPT-2, BART, Marian, Llama)")
    csub = p.add_subparsers(dest="convert_command", required=True)
    f = csub.add_parser("from-hf", help="a local Hugging Face model folder -> a zenlm checkpoint folder")
    f.add_argument("src")
    f.add_argument("out")
    f.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: float32")
    f.set_defaults(func=run_convert_from_hf)
    t = csub.add_parser("to-hf", help="a zenlm checkpoint folder -> a folder transformers' from_pretrained loads")
    t.add_argument("src")
    t.add_argument("out")
    t.set_defaults(func=run_convert_to_hf)


def run_convert_from_hf(args) -> None:
    import torch

    from ..hf import convert_from_hf

    out = convert_from_hf(args.src, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"converted {args.src} -> {out} (zenlm checkpoint)")


def run_convert_to_hf(args) -> None:
    from ..hf import convert_to_hf

    out = convert_to_hf(args.src, args.out)
    print(f"converted {args.src} -> {out} (Hugging Face folder)")


# --------------------------------------------------------------------------- serving and money
def _database_arg(p) -> None:
    p.add_argument("--database", default=None,
                   help="SQLite path or postgresql://user:pass@host/db (default: $ZENLM_DATABASE_URL or ./zenlm.sqlite3)")


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with keys, plans, budgets and a usage ledger")
    p.add_argument("models", nargs="*", metavar="MODEL_DIR", help="model folders to serve (NAME=DIR to rename)")
    p.add_argument("--embeddings", action="append", default=[], metavar="DIR", help="an embedding model folder")
    p.add_argument("--index", action="append", default=[], metavar="DIR",
                   help="a search index folder (zenlm index build) for /v1/search and the playground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _database_arg(p)
    p.add_argument("--admin-token", default=None, help="enables /admin/* (default: $ZENLM_ADMIN_TOKEN)")
    p.add_argument("--hardware-price", default="0", metavar="PER_HOUR",
                   help="what this machine costs per hour, in currency units (for compute cost and margin)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--lease", type=float, default=60.0, help="seconds before a dead server's reservations are freed")
    p.set_defaults(func=run_serve)


def run_serve(args) -> None:
    import os

    from ..serve import ServeConfig, serve

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    config = ServeConfig(models=args.models, embeddings=args.embeddings, indexes=args.index, database=args.database,
                         admin_token=args.admin_token or os.environ.get("ZENLM_ADMIN_TOKEN"),
                         hardware_price_per_hour=args.hardware_price, max_batch_size=args.max_batch_size,
                         max_queue=args.max_queue, lease_s=args.lease)
    serve(config, host=args.host, port=args.port)


def add_keys(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="make a key (shown once)")
    c.add_argument("--customer", required=True)
    c.add_argument("--plan", required=True)
    c.add_argument("--expires-days", type=float, default=None)
    _database_arg(c)
    c.set_defaults(func=run_keys)
    ls = ksub.add_parser("list", help="keys by prefix, customer and plan")
    ls.add_argument("--customer", default=None)
    _database_arg(ls)
    ls.set_defaults(func=run_keys)
    r = ksub.add_parser("revoke", help="revoke a key by its prefix")
    r.add_argument("prefix")
    _database_arg(r)
    r.set_defaults(func=run_keys)


def run_keys(args) -> None:
    import time

    from ..serve.billing import Billing

    billing = Billing.open(args.database)
    stamp = lambda t: "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))
    if args.keys_command == "create":
        key, record = billing.create_key(args.customer, args.plan, args.expires_days)
        print(key)
        print(f"created key {record['prefix']}… for {record['customer']} on plan {record['plan']} "
              f"(expires {stamp(record['expires_at'])}); the key is shown only now", file=sys.stderr)
    elif args.keys_command == "list":
        print(f"{'prefix':<13} {'customer':<20} {'plan':<14} {'created':<17} {'expires':<17} revoked")
        for k in billing.list_keys(args.customer):
            print(f"{k['prefix']:<13} {k['customer']:<20} {k['plan']:<14} {stamp(k['created_at']):<17} "
                  f"{stamp(k['expires_at']):<17} {stamp(k['revoked_at'])}")
    else:
        k = billing.revoke_key(args.prefix)
        print(f"revoked {k['prefix']}… ({k['customer']}, plan {k['plan']})")


def add_plans(sub) -> None:
    p = sub.add_parser("plans", help="create and list plans (prices, included tokens, budget, rate limits)")
    psub = p.add_subparsers(dest="plans_command", required=True)
    c = psub.add_parser("create", help="create (or --replace) a plan")
    c.add_argument("name")
    c.add_argument("--price", action="append", required=True, metavar="MODEL=PROMPT:COMPLETION",
                   help="prices per million prompt and completion tokens in currency units; MODEL '*' = any model")
    c.add_argument("--included-tokens", type=int, default=0, help="free tokens per month")
    c.add_argument("--budget", default="0", help="hard monthly budget in currency units")
    c.add_argument("--rpm", type=int, default=60, help="requests per minute")
    c.add_argument("--tpm", type=int, default=100_000, help="tokens per minute")
    c.add_argument("--replace", action="store_true")
    _database_arg(c)
    c.set_defaults(func=run_plans)
    ls = psub.add_parser("list")
    _database_arg(ls)
    ls.set_defaults(func=run_plans)


def run_plans(args) -> None:
    from ..serve.billing import Billing, format_micros, to_micros

    billing = Billing.open(args.database)
    if args.plans_command == "create":
        prices = {}
        for spec in args.price:
            model, sep, pair = spec.partition("=")
            prompt, sep2, completion = pair.partition(":")
            if not sep or not sep2 or not model:
                raise ValueError(f"--price must look like MODEL=PROMPT:COMPLETION (e.g. '*=0.50:1.50'), got {spec!r}")
            prices[model] = (to_micros(prompt), to_micros(completion))
        billing.create_plan(args.name, prices, args.included_tokens, to_micros(args.budget), args.rpm, args.tpm,
                            replace=args.replace)
    for plan in billing.list_plans():
        if args.plans_command == "create" and plan.name != args.name:
            continue
        prices = ", ".join(f"{m}={format_micros(p)}:{format_micros(c)}" for m, (p, c) in plan.prices.items())
        print(f"{plan.name}: {prices} per 1M tokens; {plan.included_tokens:,} included tokens/month; budget "
              f"{format_micros(plan.monthly_budget_micros)}/month; {plan.requests_per_minute} req/min, "
              f"{plan.tokens_per_minute:,} tokens/min")


def add_billing(sub) -> None:
    p = sub.add_parser("billing", help="revenue, compute cost and gross margin")
    bsub = p.add_subparsers(dest="billing_command", required=True)
    r = bsub.add_parser("report", help="a month's report per customer, model and day")
    r.add_argument("--month", default=None, help="YYYY-MM (default: the current month, UTC, as the ledger counts)")
    r.add_argument("--by", choices=("customer", "model", "day"), default=None, help="one grouping (default: all three)")
    r.add_argument("--csv", default=None, metavar="FILE")
    r.add_argument("--plot", default=None, metavar="FILE.png", help="bars per day (or per --by)")
    _database_arg(r)
    r.set_defaults(func=run_billing)


def run_billing(args) -> None:
    from ..serve.billing import Billing, format_micros, month_of, plot_report, write_report_csv

    import time

    billing = Billing.open(args.database)
    if args.month is None:
        args.month = month_of(time.time())
    groupings = [args.by] if args.by else ["customer", "model", "day"]
    reports = [billing.report(args.month, by) for by in groupings]
    for report in reports:
        print(f"\n{args.month} by {report['by']}")
        print(f"{report['by']:<20} {'requests':>9} {'prompt':>10} {'completion':>11} {'revenue':>14} "
              f"{'compute':>14} {'margin':>14} {'margin%':>8}")
        for row in report["rows"] + [report["total"]]:
            pct = f"{100 * row['margin_micros'] / row['revenue_micros']:.1f}" if row["revenue_micros"] else "-"
            print(f"{row['group']:<20} {row['requests']:>9,} {row['prompt_tokens']:>10,} {row['completion_tokens']:>11,} "
                  f"{format_micros(row['revenue_micros']):>14} {format_micros(row['compute_cost_micros']):>14} "
                  f"{format_micros(row['margin_micros']):>14} {pct:>8}")
    if args.csv:
        write_report_csv(reports, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        plot_report(billing.report(args.month, args.by or "day"), args.plot)
        print(f"wrote {args.plot}")


# --------------------------------------------------------------------------- retrieval
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
    import json

    from ..retrieval.index import Index

    with Index.open(args.dir, args.model) as index:
        hits = index.search(args.query, k=args.k, mode=args.mode or ("hybrid" if index.model else "bm25"))
    for rank, h in enumerate(hits, 1):
        if args.json:
            print(json.dumps({"rank": rank, "id": h.id, "score": h.score, "title": h.title, "text": h.text},
                             ensure_ascii=False))
        else:
            snippet = " ".join((f"{h.title}: {h.text}" if h.title else h.text).split())[:160]
            print(f"{rank:>3}  {h.score:.4f}  {h.id}  {snippet}")


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
    from .. import load, load_tokenizer
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


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a system on a benchmark")
    esub = p.add_subparsers(dest="evaluate_command", required=True)
    r = esub.add_parser("retrieval", help="nDCG@10, Recall@100, MRR@10 of an index on judged queries")
    r.add_argument("dir", help="index folder")
    r.add_argument("--queries", required=True, help="BEIR queries.jsonl, ID<TAB>TEXT, or SMART (cran.qry)")
    r.add_argument("--qrels", required=True, help="BEIR qrels TSV, TREC qrels, or cranqrel")
    r.add_argument("--qrels-format", choices=("auto", "beir", "trec", "cranfield"), default="auto")
    r.add_argument("--mode", choices=("bm25", "dense", "hybrid", "all"), default="hybrid")
    r.add_argument("--model", default=None, help="default: the model folder the index was built with")
    r.set_defaults(func=run_evaluate_retrieval)
    _add_evaluate_translation(esub)
    _add_evaluate_chat(esub)


def run_evaluate_retrieval(args) -> None:
    from ..retrieval.evaluate import evaluate_files

    modes = ("bm25", "dense", "hybrid") if args.mode == "all" else (args.mode,)
    for scores in evaluate_files(args.dir, args.queries, args.qrels, modes, args.qrels_format, args.model):
        print(scores)


# --------------------------------------------------------------------------- applications (translate, chat, finetune)
def _load_app_model(path: str, adapter: Optional[str] = None):
    import os

    from .. import load_tokenizer
    from ..lora import load_with_adapter

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model folder at {path}")
    return load_with_adapter(path, adapter), load_tokenizer(path)


def _translation_options(p) -> None:
    p.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy); default 4")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 2 x source length + 10")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--source-lang", default=None, help="checked against the pair the model records")
    p.add_argument("--target-lang", default=None, help="checked against the pair the model records")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to load onto the model")
    p.add_argument("--threads", type=int, default=None)


def _translation_kwargs(args) -> dict:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return dict(beam=args.beam, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                length_penalty=args.length_penalty, source_lang=args.source_lang, target_lang=args.target_lang)


def add_translate(sub) -> None:
    p = sub.add_parser("translate", help="translate text or a file with a translation model (beam search)",
                       description='zenlm translate MODEL "text" ... | --input FILE --output FILE')
    p.add_argument("model", help="a model folder (encoder-decoder, or decoder-only trained on pairs)")
    p.add_argument("text", nargs="*", help="sentences to translate (one output line each)")
    p.add_argument("--input", default=None, help="a file, one sentence per line")
    p.add_argument("--output", default=None, help="where --input's translations go (written when all are done)")
    _translation_options(p)
    p.set_defaults(func=run_translate)


def run_translate(args) -> None:
    from ..tasks.translate import translate, translate_file

    if bool(args.text) == bool(args.input):
        raise ValueError("give either sentences to translate or --input FILE (with --output FILE)")
    if args.input and not args.output:
        raise ValueError("--input needs --output FILE")
    if args.output and not args.input:
        raise ValueError("--output needs --input FILE")
    model, tokenizer = _load_app_model(args.model, args.adapter)
    options = _translation_kwargs(args)
    if args.input:
        n = translate_file(model, tokenizer, args.input, args.output, progress=True, **options)
        print(f"translated {n} lines -> {args.output}", file=sys.stderr)
        return
    for line in translate(model, tokenizer, args.text, **options):
        print(line)


def _add_evaluate_translation(esub) -> None:
    t = esub.add_parser("translation", help="sacrebleu BLEU and chrF of a model on a test set",
                        description="zenlm evaluate translation MODEL --src FILE --ref FILE")
    t.add_argument("model", help="a model folder")
    t.add_argument("--src", required=True, help="source sentences, one per line (.gz read too)")
    t.add_argument("--ref", required=True, help="reference translations, line-aligned with --src")
    t.add_argument("--tokenize", default=None, help="sacrebleu tokenizer; default zh for Chinese output, else 13a")
    t.add_argument("--output", default=None, help="also write the translations here")
    t.add_argument("--limit", type=int, default=None, help="only the first N lines")
    t.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _translation_options(t)
    t.set_defaults(func=run_evaluate_translation)


def run_evaluate_translation(args) -> None:
    import json
    import time

    from ..tasks.translate import evaluate_files

    model, tokenizer = _load_app_model(args.model, args.adapter)
    start = time.perf_counter()
    result = evaluate_files(model, tokenizer, args.src, args.ref, output_path=args.output, tokenize=args.tokenize,
                            limit=args.limit, progress=not args.json, **_translation_kwargs(args))
    result.pop("hypotheses")
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(result))
        return
    print(result["bleu_text"])
    print(f"BLEU signature: {result['bleu_signature']}")
    print(result["chrf_text"])
    print(f"chrF signature: {result['chrf_signature']}")
    print(f"{result['sentences']} sentences in {result['seconds']}s")


def _add_evaluate_chat(esub) -> None:
    c = esub.add_parser("chat", help="perplexity of a model on the assistant replies of a chat JSONL file")
    c.add_argument("model", help="a model folder")
    c.add_argument("--data", required=True, help="chat JSONL ({'messages': [...]} per line)")
    c.add_argument("--adapter", default=None, help="a LoRA adapter folder to load onto the model")
    c.add_argument("--batch-size", type=int, default=16)
    c.set_defaults(func=run_evaluate_chat)


def run_evaluate_chat(args) -> None:
    import json

    from ..tasks.chat import chat_perplexity

    model, tokenizer = _load_app_model(args.model, args.adapter)
    print(json.dumps(chat_perplexity(model, tokenizer, args.data, args.batch_size)))


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="an interactive chat with a model in the terminal (streams replies)",
                       description="zenlm chat MODEL; commands: /reset, /system TEXT, /exit")
    p.add_argument("model", help="a model folder (decoder-only or encoder-decoder) with the chat role tokens")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to load onto the model")
    p.set_defaults(func=run_chat)


def run_chat(args) -> None:
    from ..tasks.chat import ChatSession, run_terminal

    model, tokenizer = _load_app_model(args.model, args.adapter)
    options = dict(do_sample=args.temperature > 0, temperature=max(args.temperature, 0.0), top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)
    session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens, options=options)
    run_terminal(session)


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model folder on new data: LoRA adapters or all weights",
                       description="zenlm finetune BASE DATA --method lora|full [--config FILE.yaml] "
                                   "[--key.sub VALUE ...]")
    p.add_argument("base", help="the model folder to start from")
    p.add_argument("data", help="training file or folder (.tsv pairs, chat .jsonl, .jsonl, or text)")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--config", default=None, help="a YAML with `zenlm train` keys and a lora: section")
    p.add_argument("--valid", default=None, help="validation file (default: the last 10%% of DATA)")
    p.add_argument("--out", default=None, help="output folder (default runs/finetune-BASE-METHOD)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key.sub VALUE, e.g. --max_steps 200 --lora.rank 4")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> None:
    import json
    import logging

    from ..tasks.finetune import finetune
    from ..train import parse_overrides

    # the options may also come after DATA, where argparse.REMAINDER has swallowed them
    late = argparse.ArgumentParser(add_help=False)
    for flag in ("--method", "--config", "--valid", "--out"):
        late.add_argument(flag, default=getattr(args, flag[2:]))
    known, rest = late.parse_known_args(args.overrides)
    if known.method not in ("lora", "full"):
        raise ValueError(f"--method must be lora or full, got {known.method!r}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = finetune(args.base, args.data, known.method, known.config, parse_overrides(rest), known.out,
                       known.valid)
    print(json.dumps(summary))


def add_prepare(sub) -> None:
    from ..tasks.prepare import PREPARERS

    p = sub.add_parser("prepare", help="turn a shared data set into the files a recipe trains on",
                       description="zenlm prepare NAME --out DIR (reads ../shared/data in place)")
    p.add_argument("name", choices=sorted(PREPARERS))
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_prepare)


def run_prepare(args) -> None:
    import json

    from ..tasks.prepare import prepare

    print(json.dumps(prepare(args.name, args.out)))


# --------------------------------------------------------------------------- quantize
def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="store a model's weights as int8 or int4 (safetensors)",
                       description="zenlm quantize MODEL --int8|--int4|--dynamic OUT")
    p.add_argument("model", help="a model folder (zenlm or Hugging Face)")
    p.add_argument("out", help="folder for the quantized model")
    scheme = p.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--int8", dest="scheme", action="store_const", const="int8",
                        help="weight-only int8, one scale per output channel (~4x smaller)")
    scheme.add_argument("--int4", dest="scheme", action="store_const", const="int4",
                        help="weight-only int4, one scale per group of columns (~8x smaller)")
    scheme.add_argument("--dynamic", dest="scheme", action="store_const", const="dynamic",
                        help="int8 weights and int8 activations at run time (integer matmuls; faster on CPU)")
    p.add_argument("--group-size", type=int, default=None, help="columns per scale (int4 default 64)")
    p.add_argument("--keep-embeddings", action="store_true", help="leave the token embedding table in float")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> None:
    from ..folders import quantize_folder

    r = quantize_folder(args.model, args.out, args.scheme, args.group_size, not args.keep_embeddings)
    print(f"{r['scheme']}: {_bytes(r['source_bytes'])} -> {_bytes(r['quantized_bytes'])} "
          f"({r['ratio']:.2f}x smaller), written to {r['out']}")
    if r["scheme"] == "dynamic":
        from ..cpu import cpu_info

        bits = cpu_info().int8_activation_bits
        print(f"on this CPU the activations are quantized to {bits} bits at run time "
              + ("(VNNI)" if bits == 8 else "(no VNNI: 8-bit products would saturate)")
              + "; each CPU picks its own width when the model runs")


# --------------------------------------------------------------------------- average
def add_average(sub) -> None:
    p = sub.add_parser("average", help="average the weights of a run's last checkpoints into one model",
                       description="zenlm average CKPT CKPT [CKPT ...] --out DIR")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders of one run (e.g. OUT/checkpoints/step-*)")
    p.add_argument("--out", required=True, help="folder for the averaged model")
    p.set_defaults(func=run_average)


def run_average(args) -> None:
    import json

    from ..checkpoint import average_checkpoints

    print(json.dumps(average_checkpoints(args.checkpoints, args.out)))


# --------------------------------------------------------------------------- explain
def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="attention heatmaps, translation alignment and gradient x input attributions",
                       description="zenlm explain MODEL \"text\" [--target TRANSLATION] --out DIR")
    p.add_argument("model", help="a model folder")
    p.add_argument("text", help="the input (the source sentence for a translation model)")
    p.add_argument("--target", default=None, help="encoder-decoder: the translation to align (default: greedy)")
    p.add_argument("--out", default="runs/explain", help="folder for the PNGs and index.html")
    p.set_defaults(func=run_explain)


def run_explain(args) -> None:
    from ..explain import explain, write_report

    model, tokenizer = _load_app_model(args.model)
    expl = explain(model, tokenizer, args.text, target=args.target)
    index = write_report(expl, args.out)
    if expl.extra.get("target") is not None:
        print(f"target: {expl.extra['target']}")
    if expl.predicted is not None:
        print(f"predicted next token: {expl.predicted!r}")
    print(f"report: {index}")


# --------------------------------------------------------------------------- estimate
def _count(text: str) -> float:
    """A count written as 1.3e11, 132e9, 110M, 3.3B or 1,000,000."""
    t = text.strip().replace(",", "").replace("_", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(t[-1:].lower(), 1.0)
    try:
        return float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_estimate(sub) -> None:
    p = sub.add_parser("estimate", help="training FLOPs, wall time, energy and cost of a run",
                       description="zenlm estimate --preset NAME|--params N --tokens T --hardware cpu|a100|h100|custom")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--preset", help="a preset name (counts attention FLOPs too)")
    what.add_argument("--params", type=_count, help="parameter count, e.g. 110M (6N FLOPs per token)")
    p.add_argument("--tokens", type=_count, help="training tokens, e.g. 132e9 (= tokens per epoch x epochs)")
    p.add_argument("--hardware", default="cpu", help="cpu (this machine, calibrated) | a100 | h100 | custom")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation in (0, 1]")
    p.add_argument("--price-per-hour", type=float, default=None, help="USD per device-hour")
    p.add_argument("--peak-flops", type=_count, default=None, help="peak FLOP/s per device (custom hardware)")
    p.add_argument("--watts", type=float, default=None, help="power per device")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the attention term")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine's trainer throughput first (about a minute) and cache it")
    p.add_argument("--threads", type=int, default=None, help="torch threads for --calibrate")
    p.set_defaults(func=run_estimate)


def run_estimate(args) -> None:
    from ..estimate import calibrate, estimate

    if args.calibrate:
        cal = calibrate(threads=args.threads)
        print(f"calibrated: {cal['tokens_per_s']:,.0f} tokens/s, MFU {cal['mfu']:.1%} of a measured "
              f"{cal['peak_flops'] / 1e9:,.0f} GFLOP/s peak (cached)")
        if args.tokens is None:
            return
    if args.tokens is None:
        raise ValueError("--tokens is required (e.g. --tokens 132e9)")
    if args.preset is None and args.params is None:
        raise ValueError("give --preset NAME or --params N")
    print(estimate(args.tokens, preset=args.preset, params=args.params, hardware=args.hardware, mfu=args.mfu,
                   price_per_hour=args.price_per_hour, peak_flops=args.peak_flops, watts=args.watts,
                   devices=args.devices, seq_len=args.seq_len).summary())


# --------------------------------------------------------------------------- distill
def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="train a smaller student on a teacher's soft targets",
                       description="zenlm distill --teacher DIR --student-config PRESET DATA... "
                                   "[--set hidden_size=64 ...] [--train.key VALUE ...]")
    p.add_argument("data", nargs="+", help="training text files or folders (pairs for a seq2seq teacher)")
    p.add_argument("--teacher", required=True, help="the teacher model folder")
    p.add_argument("--student-config", required=True, help="a preset name or a config.json / model folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="student config override, e.g. --set hidden_size=64 --set num_decoder_layers=2")
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft-target KL term (rest: labels)")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state relation loss")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run_distill)


def run_distill(args) -> None:
    import json
    import logging

    from ..distill import DistillConfig, distill

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    train = {"max_steps": args.steps, "batch_size": args.batch_size, "optim.lr": args.lr,
             "optim.min_lr": args.lr / 10, "threads": args.threads}
    summary = distill(args.teacher, args.student_config, args.data, args.out, overrides,
                      DistillConfig(args.temperature, args.alpha, args.hidden_weight), train)
    print(json.dumps(summary))


# --------------------------------------------------------------------------- main
COMMANDS: list[Callable] = [add_info, add_tokenizer, add_demo, add_generate, add_train, add_convert,
                            add_index, add_search, add_ask, add_evaluate, add_serve, add_keys, add_plans, add_billing,
                            add_translate, add_chat, add_finetune, add_prepare,
                            add_quantize, add_average, add_explain, add_estimate, add_distill]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zenlm", description="Build, train, run and sell transformer language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        start, end = ("\033[31m", "\033[0m") if sys.stderr.isatty() else ("", "")
        print(f"{start}error: {message}{end}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

