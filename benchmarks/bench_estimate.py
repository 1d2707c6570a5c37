"""Validate `zenlm estimate` on this machine: calibrate once, then predict and measure the
training wall time of three different configs, in one run.

    .venv/bin/python benchmarks/bench_estimate.py [--threads 1]

1. ``zenlm.estimate.calibrate``: zenlm's Trainer on the reference model (d=256, 4 layers,
   batch 8 x 128, char-level tinyshakespeare) gives the MFU and matmul peak of this machine.
2. For each config below, build the Trainer, predict the training-loop time from the config
   alone (``estimate(tokens, config=..., hardware="cpu")``), train, and compare with the measured
   time of the loop (the trainer's elapsed time at its last step; set-up, final evaluation and
   checkpoint excluded). Target: |predicted / measured - 1| <= 15%.
3. The same in CPU-seconds of the process (calibrated FLOPs per CPU-second), which the other
   jobs on a shared machine disturb far less than wall time.

The machine is shared (2 cores, other jobs running), so numbers are noisy; run it twice.
"""
import argparse
import logging
import tempfile
import time
from pathlib import Path

from zenlm.estimate import calibrate, estimate
from zenlm.train import TrainConfig, Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"

CONFIGS = [  # name, model, batch, seq, steps
    ("d192-L3 b8x64", {"hidden_size": 192, "intermediate_size": 768, "num_decoder_layers": 3}, 8, 64, 80),
    ("d256-L4 b8x128", {"hidden_size": 256, "intermediate_size": 1024, "num_decoder_layers": 4}, 8, 128, 40),
    ("d384-L4 b4x128", {"hidden_size": 384, "intermediate_size": 1536, "num_decoder_layers": 4}, 4, 128, 30),
]


def run(name, model, batch, seq, steps, threads, cal) -> tuple[float, float]:
    model = {"preset": "tiny", "num_attention_heads": 4, "max_position_embeddings": seq + 1, **model}
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_dict({
            "out_dir": out, "model": model, "tokenizer": {"kind": "char", "vocab_size": 256},
            "data": {"train": [str(SHAKESPEARE)], "seq_len": seq, "sampling": "random"},
            "max_steps": steps, "batch_size": batch, "eval_interval": 0, "eval_batches": 1,
            "log_interval": 5, "precision": "fp32", "threads": threads, "plot": False, "progress": False,
            "checkpoint_interval": 0, "optim": {"warmup_steps": 0}})
        trainer = Trainer(config)
        tokens = steps * batch * (seq + 1)  # the trainer counts the window's seq + 1 tokens
        predicted = estimate(tokens, config=trainer.model_config, hardware="cpu", seq_len=seq + 1,
                             calibration=cal).seconds
        cpu_start = time.process_time()
        trainer.train()
        cpu = time.process_time() - cpu_start
        measured = [r for r in trainer.history if "loss" in r][-1]["elapsed_s"]
    predicted_cpu = tokens * trainer.flops_per_token / cal["flops_per_cpu_second"]
    return predicted, measured, predicted_cpu, cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calibration-steps", type=int, default=40)
    args = p.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    logging.basicConfig(level=logging.WARNING)
    cal = calibrate(steps=args.calibration_steps, threads=args.threads, data=str(SHAKESPEARE))
    print(f"calibration: {cal['tokens_per_s']:,.0f} tokens/s on the reference model, MFU {cal['mfu']:.1%} of "
          f"{cal['peak_flops'] / 1e9:,.1f} GFLOP/s measured peak ({args.threads} thread(s))")
    print(f"{'config':<16} {'wall: predicted s':>17} {'measured s':>10} {'pred/meas':>9} {'≤15%':>4}   "
          f"{'CPU: predicted s':>16} {'measured s':>10} {'pred/meas':>9} {'≤15%':>4}")
    ok = lambda r: "yes" if abs(r - 1) <= 0.15 else "NO"
    for name, model, batch, seq, steps in CONFIGS:
        predicted, measured, predicted_cpu, cpu = run(name, model, batch, seq, steps, args.threads, cal)
        r, rc = predicted / measured, predicted_cpu / cpu
        print(f"{name:<16} {predicted:>17.1f} {measured:>10.1f} {r:>9.2f} {ok(r):>4}   "
              f"{predicted_cpu:>16.1f} {cpu:>10.1f} {rc:>9.2f} {ok(rc):>4}")


if __name__ == "__main__":
    main()
