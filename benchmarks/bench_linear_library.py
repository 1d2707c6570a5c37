"""Which library should run zenlm's fp32 Linear layers on this CPU? One training step of the
seed-base BART shape (8x128 + 8x128 tokens, fused AdamW) timed alternately for transformers'
BART and zenlm with fp32 Linears through MKL, through oneDNN and with fast_cpu() off; medians.
Then the choice ``zenlm.fast_cpu()`` made by its own calibration (``zenlm.kernels.fp32_linear_backend``).

    python benchmarks/bench_linear_library.py [--reps 5] [--threads 2]
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python benchmarks/bench_linear_library.py          # an AVX2-only CPU, forced on a newer one
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_model as bm  # noqa: E402
from zenlm import kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(args.threads)
    zen, hf = bm.build_models()
    batch = bm.make_batch(zen.config.vocab_size)

    def zen_step(library):
        opt = torch.optim.AdamW(zen.parameters(), lr=1e-4, fused=True)

        def step():
            kernels.fast_cpu(library is not None, fp32_linear=library)
            try:
                opt.zero_grad(set_to_none=True)
                bm.zen_loss(zen, *batch).backward()
                opt.step()
            finally:
                kernels.fast_cpu(False)
        return step

    steps = {"transformers": bm.train_step_fn(hf, bm.hf_loss, batch, False, True), "zenlm MKL": zen_step("mkl"),
             "zenlm oneDNN": zen_step("onednn"), "zenlm fast_cpu off": zen_step(None)}
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    tokens = 2 * bm.BATCH * bm.SEQ_TRAIN
    base = statistics.median(times["transformers"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:20s} {t:7.3f} s/step {tokens / t:7.0f} tok/s   {base / t:5.2f}x transformers")
    print(f"fast_cpu() calibration chooses: {kernels.fp32_linear_backend()}")


if __name__ == "__main__":
    main()
