"""zenlm's Trainer vs Hugging Face's Trainer, full training loop, seed-base shape.

Both sides train the same encoder-decoder (seed-base shape with BART's flavour, built by
``bench_model.build_models`` so the weights are identical) on the same batches:
BART-style denoising of tinyshakespeare, 8 rows x 128 target tokens with the corrupted
source (about 100 tokens) as encoder input. zenlm runs ``zenlm.train.Trainer.train()``
(data from its shards, AdamW, warmup+cosine, clipping, logging, progress, final eval
and checkpoint outside the timed steps); Hugging Face runs ``transformers.Trainer``
with ``BartForConditionalGeneration`` (fused AdamW, cosine schedule, clipping), fed the
same precomputed batches. Step 1's loss is printed on both sides as a parity check.

Tokens/s counts source + target tokens per step and is measured over the steps after
a warm-up; MFU is against the matmul peak of the precision used, measured here
(fp32: the best of MKL and oneDNN; bf16: oneDNN), with FLOPs counted as in
``bench_model.flops_per_step``. Sides run alternately so load from other processes
hits both.

    python benchmarks/bench_train.py                 # fp32 and bf16, 2 threads
    python benchmarks/bench_train.py --steps 8 --precision bf16
Needs the test extra plus ``accelerate`` (transformers.Trainer requires it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch
from bench_model import BATCH, SEQ_TRAIN, build_models, flops_per_step, measure_peaks

SHAKESPEARE = HERE.parents[1] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def zen_run(workdir: Path, model_dir: Path, tokenizer_path: Path, steps: int, warmup: int, bf16: bool,
            fast_cpu: bool, threads: int, attention: str = "auto") -> dict:
    from zenlm.train import TrainConfig, Trainer

    out = workdir / f"zen-{'bf16' if bf16 else 'fp32'}-{int(fast_cpu)}"
    config = TrainConfig.from_dict({
        "out_dir": str(out), "init_from": str(model_dir), "tokenizer": {"path": str(tokenizer_path)},
        "data": {"train": [str(SHAKESPEARE)], "objective": "denoise", "seq_len": SEQ_TRAIN,
                 "cache_dir": str(workdir / "cache"), "val_fraction": 0.05},
        "optim": {"lr": 1e-4, "warmup_steps": 2, "weight_decay": 0.01}, "max_steps": steps,
        "batch_size": BATCH, "eval_interval": 0, "eval_batches": 1, "checkpoint_interval": 0,
        "log_interval": 1, "precision": "bf16" if bf16 else "fp32", "threads": threads, "peak_flops": 1e12,
        "plot": False, "progress": False, "resume": "never", "fast_cpu": fast_cpu, "seed": 0,
        "attention_backend": attention})
    trainer = Trainer(config)
    trainer.train()
    records = [r for r in trainer.history if "loss" in r]
    t = [r["elapsed_s"] for r in records]
    timed = t[-1] - t[warmup - 1]
    tokens = sum(_tokens(trainer.data.train.batch(trainer._indices(s, 0))) for s in range(warmup, steps))
    if fast_cpu:
        from zenlm.kernels import fast_cpu as toggle

        toggle(False)
    # the batches this run drew (seeded shuffle), handed to transformers' Trainer so both see the same data
    batches = [trainer.data.train.batch(trainer._indices(s, 0)) for s in range(steps)]
    return {"tokens_per_s": tokens / timed, "first_loss": records[0]["loss"], "s_per_step": timed / (steps - warmup),
            "batches": batches, "flops": sum(_flops(trainer.model_config, trainer.data.train.batch(trainer._indices(s, 0)))
                         for s in range(warmup, steps)) / timed}


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum()) + batch["labels"].numel()


def _flops(config, batch: dict) -> float:
    src = float(batch["attention_mask"].sum(1).float().mean())
    return flops_per_step(config, batch["labels"].size(0), src, batch["labels"].size(1), training=True, logits=True)


def hf_run(workdir: Path, hf_model, batches: list, steps: int, warmup: int, bf16: bool, threads: int) -> dict:
    from transformers import (
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(threads)
    stamps: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    args = TrainingArguments(
        output_dir=str(workdir / "hf"), max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-4,
        warmup_steps=2, lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0, bf16=bf16, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        optim="adamw_torch_fused", seed=0)
    class InOrder(Trainer):  # transformers shuffles the dataset; these batches are already in zenlm's order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=hf_model, args=args, train_dataset=Batches(), data_collator=lambda items: items[0],
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # keep the report readable; logging itself stays on
    trainer.train()
    timed = stamps[-1] - stamps[warmup - 1]
    tokens = sum(_tokens(b) for b in batches[warmup:steps])
    return {"tokens_per_s": tokens / timed, "first_loss": losses[0] if losses else float("nan"),
            "s_per_step": timed / (steps - warmup)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--no-fast-cpu", action="store_true", help="zenlm fp32 without zenlm.fast_cpu()")
    ap.add_argument("--attention", default="auto", help="zenlm's attention_backend under bf16 (auto | math)")
    args = ap.parse_args(argv)
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(args.threads)
    import zenlm
    from zenlm import Tokenizer

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{args.threads} threads; steps {args.steps} (first {args.warmup} not timed)")
    peaks = measure_peaks(3)
    peak = {"fp32": max(v for k, v in peaks.items() if k.startswith("fp32")), "bf16": peaks["bf16 (oneDNN)"]}
    print("matmul peaks GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = Tokenizer.train([str(SHAKESPEARE)], vocab_size=10000, kind="bpe")
        tok_path = tok.save(work / "tok")
        zen, hf = build_models()
        model_dir = work / "init"
        zen.save_pretrained(model_dir)
        hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
        rows = []
        for precision in args.precision.split(","):
            bf16 = precision == "bf16"
            fast = not bf16 and not args.no_fast_cpu
            z = zen_run(work, model_dir, tok_path, args.steps, args.warmup, bf16, fast, args.threads,
                        args.attention if bf16 else "auto")
            if not rows:
                src = statistics.mean(float(b["attention_mask"].sum(1).float().mean()) for b in z["batches"])
                print(f"batch: {BATCH} x {src:.0f} source (denoised text) + {BATCH} x {SEQ_TRAIN} target tokens")
            hf.load_state_dict(hf_state)
            h = hf_run(work, hf.train(), z["batches"], args.steps, args.warmup, bf16, args.threads)
            mfu = z["flops"] / (peak[precision] * 1e9)
            hf_mfu = mfu * h["tokens_per_s"] / z["tokens_per_s"]
            rows.append((precision, z, h, mfu, hf_mfu))
            print(f"{precision}: zenlm Trainer {z['tokens_per_s']:.0f} tok/s ({z['s_per_step']:.2f} s/step, MFU "
                  f"{mfu:.1%}{', fast_cpu' if fast else ''}{', attention ' + args.attention if bf16 else ''}) | HF Trainer {h['tokens_per_s']:.0f} tok/s "
                  f"({h['s_per_step']:.2f} s/step, MFU {hf_mfu:.1%}) | ratio {z['tokens_per_s'] / h['tokens_per_s']:.2f}x"
                  f" | step-1 loss zenlm {z['first_loss']:.4f} HF {h['first_loss']:.4f}")
        if len(rows) == 2:
            best_z = max(r[1]["tokens_per_s"] for r in rows)
            best_h = max(r[2]["tokens_per_s"] for r in rows)
            print(f"best settings: zenlm {best_z:.0f} tok/s vs HF {best_h:.0f} tok/s: ratio {best_z / best_h:.2f}x")
        print(json.dumps({r[0]: {"zenlm_tok_s": round(r[1]["tokens_per_s"], 1), "hf_tok_s": round(r[2]["tokens_per_s"], 1),
                                 "ratio": round(r[1]["tokens_per_s"] / r[2]["tokens_per_s"], 3),
                                 "zenlm_mfu": round(r[3], 4), "hf_mfu": round(r[4], 4)} for r in rows}))
    del zenlm


if __name__ == "__main__":
    main()
