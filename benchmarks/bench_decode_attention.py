"""Cached self-attention of one decoding step at 16 prompts x 4 beams: is it the kernel or the memory?

    python benchmarks/bench_decode_attention.py

bench_generate's BART-shaped decoder at batch 16 x beam 4: 64 rows, 8 heads of 64, a preallocated
cache of 65 positions per layer, 6 layers (K and V: 102 MB when full). Times one step's six
single-query attentions over the first L positions two ways, torch's fused kernel
(``F.scaled_dot_product_attention``, what zenlm uses for fp32) and written out as matmul + softmax
+ matmul (zenlm's bf16 path, ``zenlm.kernels.cpu_attention``), first with the caches hot (the same
layer again and again) and then cold (between steps 108 MB of weights stream through, as the
step's linear layers do), and prints the bytes of cache read; last, the average step of a whole
64-token decode.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from zenlm.kernels import cpu_attention as _cpu_attention

ROWS, HEADS, DIM, CAPACITY, LAYERS = 64, 8, 64, 65, 6


def one_step(fn, q, keys, values, length: int) -> float:
    """Seconds for the six layers' attention over the first ``length`` cached positions."""
    start = time.perf_counter()
    for k, v in zip(keys, values):
        fn(q, k[:, :, :length], v[:, :, :length])
    return time.perf_counter() - start


def main() -> None:
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(2)
    keys = [torch.randn(ROWS, HEADS, CAPACITY, DIM) for _ in range(LAYERS)]
    values = [torch.randn(ROWS, HEADS, CAPACITY, DIM) for _ in range(LAYERS)]
    q = torch.randn(ROWS, HEADS, 1, DIM)
    weights = torch.randn(27_150_000)  # 108.6 MB, the decoder step's weights
    kernels = {"fused (sdpa)": F.scaled_dot_product_attention,
               "matmul+softmax": lambda q, k, v: _cpu_attention(q, k, v, None, False)}
    torch.testing.assert_close(kernels["fused (sdpa)"](q, keys[0], values[0]),
                               kernels["matmul+softmax"](q, keys[0], values[0]), rtol=1e-5, atol=1e-5)
    print(f"{ROWS} rows x {HEADS} heads x {DIM}, {LAYERS} layers, cache capacity {CAPACITY}; ms per step (6 layers)")
    with torch.inference_mode():
        for length in (16, 33, 64):
            read = 2 * LAYERS * ROWS * HEADS * length * DIM * 4
            line = f"L={length:2d} ({read / 1e6:5.1f} MB of K+V)"
            for name, fn in kernels.items():
                for cold in (False, True):
                    times = []
                    for rep in range(12):
                        if cold:
                            weights.sum()  # evict the caches as the step's matmuls do
                        dt = one_step(fn, q, keys, values, length)
                        if rep >= 2:
                            times.append(dt)
                    dt = statistics.median(times)
                    line += f"  {name} {'cold' if cold else 'hot'} {dt * 1e3:5.2f} ({read / dt / 1e9:4.1f} GB/s)"
            print(line, flush=True)
        # a whole 64-token decode: L = 1..64, cold, as in bench_generate's step
        line = "average step of a 64-token decode (cold)"
        read = sum(2 * LAYERS * ROWS * HEADS * length * DIM * 4 for length in range(1, 65)) / 64
        for name, fn in kernels.items():
            totals = []
            for _ in range(3):
                total = 0.0
                for length in range(1, 65):
                    weights.sum()
                    total += one_step(fn, q, keys, values, length)
                totals.append(total / 64)
            dt = statistics.median(totals)
            line += f"  {name} {dt * 1e3:5.2f} ms ({read / dt / 1e9:4.1f} GB/s)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
