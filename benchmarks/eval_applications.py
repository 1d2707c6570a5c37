"""Quality of the application recipes' models on real data, printed as one JSON line each.

    python benchmarks/eval_applications.py translation RUN_DIR --src FILE --ref FILE [--limit N]
    python benchmarks/eval_applications.py code RUN_DIR --valid runs/data/stdlib-code/valid.txt [--samples 50]
    python benchmarks/eval_applications.py poems RUN_DIR [--samples 8]
    python benchmarks/eval_applications.py chat MODEL_DIR --data FILE.jsonl

RUN_DIR is a ``zenlm train`` output folder: the model is ``RUN_DIR/best``, and training wall time,
steps and the best validation loss/perplexity come from ``RUN_DIR/metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def run_summary(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in records if "val_loss" in r]
    best = min(vals, key=lambda r: r["val_loss"]) if vals else {}
    return {"steps": max((r["step"] for r in records), default=0),
            "train_wall_s": max((r.get("elapsed_s", 0) for r in records), default=0),
            "best_val_loss": best.get("val_loss"), "best_val_ppl": best.get("val_ppl"), "best_step": best.get("step")}


def params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main() -> None:
    import torch

    import zenlm

    p = argparse.ArgumentParser()
    p.add_argument("task", choices=("translation", "code", "poems", "chat"))
    p.add_argument("run")
    p.add_argument("--src")
    p.add_argument("--ref")
    p.add_argument("--valid")
    p.add_argument("--data")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    model_dir = run / "best" if (run / "best").is_dir() else run
    model, tok = zenlm.load(model_dir), zenlm.load_tokenizer(model_dir)
    out = {"task": args.task, "model": str(model_dir), "parameters": params(model)}
    if (run / "metrics.jsonl").exists():
        out.update(run_summary(run))
    start = time.perf_counter()
    if args.task == "translation":
        from zenlm.tasks.translate import evaluate_translation_files

        result = evaluate_translation_files(model, tok, args.src, args.ref, limit=args.limit, beam=args.beam, progress=True)
        result.pop("hypotheses")
        out.update(result)
    elif args.task == "code":
        from zenlm.tasks.code import definition_prompts, parse_share, sample_definitions

        files = Path(args.valid).read_text(encoding="utf-8").split("# file: ")[1:]
        prompts = []
        for f in files:
            try:
                prompts += definition_prompts(f.split("\n", 1)[1], limit=3)
            except SyntaxError:
                continue
        prompts = prompts[:args.samples]
        # the whole window after the header: a definition cut by the token budget cannot parse
        budget = max(16, model.config.max_position_embeddings - max(len(tok.encode(q)) for q in prompts) - 1)
        gens = sample_definitions(model, tok, prompts, max_new_tokens=budget)
        completions = [g.text for g in gens]
        ended = [i for i, g in enumerate(gens) if g.finish_reason == "stop"]
        out.update({"samples": len(prompts), "max_new_tokens": budget,
                    "parse_share": parse_share(prompts, completions),
                    "ended_definitions": len(ended),
                    "parse_share_of_ended": (parse_share([prompts[i] for i in ended], [completions[i] for i in ended])
                                             if ended else None),
                    "examples": [prompts[i] + completions[i] for i in range(min(3, len(prompts)))]})
    elif args.task == "poems":
        from zenlm.tasks.poetry import check_form, write_poem

        titles = ["春夜", "山中", "送友人", "秋思", "月下獨酌", "江上", "登高", "別離"][:args.samples]
        poems = [write_poem(model, tok, t, lines=4, chars=5 if i % 2 == 0 else 7, seed=i) for i, t in enumerate(titles)]
        out.update({"form_ok": sum(check_form(p, 4, 5 if i % 2 == 0 else 7) for i, p in enumerate(poems)),
                    "samples": [f"{t}\n{p}" for t, p in zip(titles, poems)]})
    else:
        from zenlm.tasks.chat import chat_perplexity

        out.update(chat_perplexity(model, tok, args.data))
    out["eval_seconds"] = round(time.perf_counter() - start, 1)
    if out.get("best_val_loss") is not None:
        out["best_val_ppl"] = math.exp(out["best_val_loss"])
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
