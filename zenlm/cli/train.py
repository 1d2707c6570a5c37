"""`zenlm tokenizer train`, `prepare`, `train`, `finetune`, `estimate`: from text to a trained model,
and what a run will cost before it starts (the README's tour, "Applications" and "Smaller ... models")."""
from __future__ import annotations

import argparse
import sys


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

    from ..estimate import human_bytes
    from ..tokenizer import Tokenizer

    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}")
    start = time.perf_counter()
    tok = Tokenizer.train(args.files, vocab_size=args.vocab_size, kind=args.kind, min_frequency=args.min_frequency,
                          show_progress=sys.stderr.isatty())
    path = tok.save(args.out)
    size = sum(os.path.getsize(f) for f in args.files)
    print(f"trained {args.kind} tokenizer: {tok.vocab_size} tokens from {human_bytes(size)} "
          f"in {time.perf_counter() - start:.1f}s -> {path}")


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
    p.add_argument("--adapter-format", choices=("zenlm", "peft"), default=None,
                   help="format of OUT/adapter with --method lora: zenlm's own (default) or a PEFT folder")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key.sub VALUE, e.g. --max_steps 200 --lora.rank 4")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> None:
    import json
    import logging

    from ..tasks.finetune import finetune
    from ..train import parse_overrides

    # the options may also come after DATA, where argparse.REMAINDER has swallowed them
    late = argparse.ArgumentParser(add_help=False)
    for flag in ("--method", "--config", "--valid", "--out", "--adapter-format"):
        late.add_argument(flag, default=getattr(args, flag[2:].replace("-", "_")))
    known, rest = late.parse_known_args(args.overrides)
    if known.method not in ("lora", "full"):
        raise ValueError(f"--method must be lora or full, got {known.method!r}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if known.adapter_format not in (None, "zenlm", "peft"):
        raise ValueError(f"--adapter-format must be zenlm or peft, got {known.adapter_format!r}")
    summary = finetune(args.base, args.data, known.method, known.config, parse_overrides(rest), known.out,
                       known.valid, adapter_format=known.adapter_format)
    print(json.dumps(summary))


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
