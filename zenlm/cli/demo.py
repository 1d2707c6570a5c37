"""`zenlm demo`: the main job run by `make demo` (train a tiny model, index the docs, serve with billing)."""
from __future__ import annotations


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
