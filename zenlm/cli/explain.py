"""`zenlm distill` and `zenlm explain`: smaller and explainable models (the README's "Smaller,
explainable, responsible models"; `quantize` sits with the other folder operations in cli/model.py)."""
from __future__ import annotations


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
    from .generate import load_app_model

    model, tokenizer = load_app_model(args.model)
    expl = explain(model, tokenizer, args.text, target=args.target)
    index = write_report(expl, args.out)
    if expl.extra.get("target") is not None:
        print(f"target: {expl.extra['target']}")
    if expl.predicted is not None:
        print(f"predicted next token: {expl.predicted!r}")
    print(f"report: {index}")
