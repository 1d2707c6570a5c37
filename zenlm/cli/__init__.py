"""`zenlm …`: argument parsing only. Every command calls a library function.

One module per group of commands, as the README's tour runs: model.py (info, average, convert,
quantize), train.py (tokenizer, prepare, train, finetune, estimate), generate.py (generate,
translate, chat, evaluate translation|chat), retrieval.py (index, search, evaluate retrieval,
ask), serve.py (plans, keys, serve, billing), explain.py (distill, explain), demo.py (demo).
Each command is one ``add_<name>(subparsers)`` function that registers its parser and sets
``func``; tables are printed by library functions (``summary``/``format_*``) that Python users
can call too. Errors a user can cause (ValueError, FileNotFoundError) become one red line and
exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from . import demo, explain, generate, model, retrieval, serve, train


def add_evaluate(sub) -> None:
    """`zenlm evaluate retrieval|translation|chat`: one command; each benchmark lives with its group."""
    p = sub.add_parser("evaluate", help="score a system on a benchmark")
    esub = p.add_subparsers(dest="evaluate_command", required=True)
    retrieval.add_evaluate_retrieval(esub)
    generate.add_evaluate_translation(esub)
    generate.add_evaluate_chat(esub)


# the order of `zenlm --help`
COMMANDS: list[Callable] = [model.add_info, train.add_tokenizer, demo.add_demo, generate.add_generate,
                            train.add_train, model.add_convert, retrieval.add_index, retrieval.add_search,
                            retrieval.add_ask, add_evaluate, serve.add_serve, serve.add_keys, serve.add_plans,
                            serve.add_billing, generate.add_translate, generate.add_chat, train.add_finetune,
                            train.add_prepare, model.add_quantize, model.add_average, explain.add_explain,
                            train.add_estimate, explain.add_distill, model.add_export]


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
