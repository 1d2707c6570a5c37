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
    p = sub.add_parser("info", help="parameters, FLOPs and memory of a preset or checkpoint folder")
    p.add_argument("model", help="a preset name (see `zenlm info --list`) or a checkpoint folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--bytes-per-param", type=int, default=4, choices=(2, 4))
    p.set_defaults(func=run_info)


def run_info(args) -> None:
    import os

    from .config import PRESETS, TransformerConfig, estimate_costs

    if args.model in PRESETS:
        config = TransformerConfig.from_preset(args.model)
    elif os.path.isdir(args.model):
        config = TransformerConfig.load(args.model)
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

    from .tokenizer import Tokenizer

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
    p = sub.add_parser("demo", help="the main job: train a tokenizer and a tiny model, then generate")
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    from .demo import run

    run(out=args.out, seconds=args.seconds, seed=args.seed)


# --------------------------------------------------------------------------- main
COMMANDS: list[Callable] = [add_info, add_tokenizer, add_demo]


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


if __name__ == "__main__":
    sys.exit(main())
