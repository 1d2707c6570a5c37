"""`zenlm plans`, `keys`, `serve`, `billing report`: serving and selling (the README's "Serving and
selling"). The tables are ``zenlm.serve.billing``'s ``format_plan``, ``format_keys`` and ``format_report``."""
from __future__ import annotations

import sys


def _database_arg(p) -> None:
    p.add_argument("--database", default=None,
                   help="SQLite path or postgresql://user:pass@host/db (default: $ZENLM_DATABASE_URL or ./zenlm.sqlite3)")


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
    from ..serve.billing import Billing, format_plan, to_micros

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
        print(format_plan(plan))


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
    from ..serve.billing import Billing, format_keys, format_time

    billing = Billing.open(args.database)
    if args.keys_command == "create":
        key, record = billing.create_key(args.customer, args.plan, args.expires_days)
        print(key)
        print(f"created key {record['prefix']}… for {record['customer']} on plan {record['plan']} "
              f"(expires {format_time(record['expires_at'])}); the key is shown only now", file=sys.stderr)
    elif args.keys_command == "list":
        print(format_keys(billing.list_keys(args.customer)))
    else:
        k = billing.revoke_key(args.prefix)
        print(f"revoked {k['prefix']}… ({k['customer']}, plan {k['plan']})")


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with keys, plans, budgets and a usage ledger")
    p.add_argument("models", nargs="*", metavar="MODEL_DIR",
                   help="model folders to serve (NAME=DIR to rename); with --engine llama.cpp also .gguf files")
    p.add_argument("--engine", choices=("zenlm", "llama.cpp"), default="zenlm",
                   help="what runs the models: zenlm's own engine, or llama.cpp's server as a child process "
                        "behind this gateway (a folder is exported to GGUF first; the child dies with the server)")
    p.add_argument("--engine-threads", type=int, default=None, metavar="N", help="threads per llama.cpp child")
    p.add_argument("--embeddings", action="append", default=[], metavar="DIR", help="an embedding model folder")
    p.add_argument("--index", action="append", default=[], metavar="DIR",
                   help="a search index folder (zenlm index build) for /v1/search and the playground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _database_arg(p)
    p.add_argument("--admin-token", default=None, help="enables /admin/* (default: $ZENLM_ADMIN_TOKEN)")
    p.add_argument("--hardware-price", default="0", metavar="PER_HOUR",
                   help="what this machine costs per hour, in currency units (for compute cost and margin)")
    p.add_argument("--upstream", action="append", default=[], metavar="NAME=URL[,URL...]",
                   help="a model served by OpenAI-compatible servers (vLLM, TGI, llama.cpp, zenlm), sold through "
                        "this server's keys and ledger; replicas balanced by fewest requests in flight. Options "
                        "after ';': timeout=S, concurrency=N, price=PER_HOUR (its hardware, per replica), "
                        "model=REMOTE_NAME, max_tokens=N (when the client gives none), tokenizer=FOLDER, eject=S, "
                        "api_key_env=VAR (the upstream's key, read from $VAR)")
    p.add_argument("--upstream-tokenizer", action="append", default=[], metavar="NAME=FOLDER",
                   help="the tokenizer (a model folder or .gguf) that counts an upstream's tokens when it reports "
                        "no usage")
    p.add_argument("--catalog", default=None, metavar="FILE.yaml",
                   help="upstreams from a YAML file: 'upstreams:' a list of {name, urls, timeout, concurrency, "
                        "price, tokenizer, model, max_tokens, eject, health, api_key_env}")
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
    from ..serve.upstream_config import parse_upstream

    tokenizers = {}
    for spec in args.upstream_tokenizer:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--upstream-tokenizer must look like NAME=FOLDER, got {spec!r}")
        tokenizers[name] = folder
    upstreams = [parse_upstream(spec, tokenizers) for spec in args.upstream]
    unknown = set(tokenizers) - {u.name for u in upstreams}
    if unknown:
        raise ValueError(f"--upstream-tokenizer names no --upstream: {', '.join(sorted(unknown))}")
    if args.catalog:
        from ..serve.upstream_config import load_catalog

        given = {u.name for u in upstreams}
        for up in load_catalog(args.catalog):
            if up.name in given:
                raise ValueError(f"catalog {args.catalog}: {up.name!r} is also given by --upstream")
            upstreams.append(up)
    children = []
    try:
        if args.engine == "llama.cpp":
            from ..serve.engines import LlamaCppConfig, LlamaCppServer

            if not args.models:
                raise ValueError("--engine llama.cpp needs a model: a .gguf file or a model folder")
            if args.engine_threads is not None and args.engine_threads < 1:
                raise ValueError(f"--engine-threads must be >= 1, got {args.engine_threads}")
            for spec in args.models:
                child = LlamaCppServer(LlamaCppConfig(spec, threads=args.engine_threads))
                children.append(child)
                child.start()
                print(f"llama.cpp serves {child.name} at {child.url} (pid {child.process.pid})", file=sys.stderr)
                upstreams.append(child.upstream())
            config.models = []
        serve(config, host=args.host, port=args.port, upstreams=upstreams)
    finally:
        for child in children:
            child.stop()


def add_billing(sub) -> None:
    p = sub.add_parser("billing", help="revenue, compute cost and gross margin")
    bsub = p.add_subparsers(dest="billing_command", required=True)
    r = bsub.add_parser("report", help="a month's report per customer, model and day")
    r.add_argument("--month", default=None, help="YYYY-MM (default: the current month, UTC, as the ledger counts)")
    r.add_argument("--by", choices=("customer", "model", "day", "upstream"), default=None,
                   help="one grouping (default: customer, model and day; upstream: per upstream replica)")
    r.add_argument("--csv", default=None, metavar="FILE")
    r.add_argument("--plot", default=None, metavar="FILE.png", help="bars per day (or per --by)")
    _database_arg(r)
    r.set_defaults(func=run_billing)


def run_billing(args) -> None:
    import time

    from ..serve.billing import Billing, format_report, month_of, plot_report, write_report_csv

    billing = Billing.open(args.database)
    if args.month is None:
        args.month = month_of(time.time())
    groupings = [args.by] if args.by else ["customer", "model", "day"]
    reports = [billing.report(args.month, by) for by in groupings]
    for report in reports:
        print()
        print(format_report(report))
    if args.csv:
        write_report_csv(reports, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        plot_report(billing.report(args.month, args.by or "day"), args.plot)
        print(f"wrote {args.plot}")
