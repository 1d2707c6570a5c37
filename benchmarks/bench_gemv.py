"""Memory bandwidth and fp32 matrix-vector speed: the floor under one decoding step.

    python benchmarks/bench_gemv.py

Reads 108 MB (sum, copy), then multiplies one row (and 64 rows) by the 37 fp32 weight matrices
of bench_generate's BART-shaped decoder step (6 layers x (fused QKV, out, cross Q, cross out, fc1,
fc2) + the 10000 x 512 head: 37 matrices, 108.6 MB) through each kernel torch ships: MKL (F.linear), oneDNN
(what zenlm.fast_cpu uses) and MKL's packed GEMM. GB/s = weight bytes / time.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def bench(name: str, fn, nbytes: int, reps: int = 7) -> None:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    dt = statistics.median(times)
    print(f"{name:40s} {dt * 1e3:7.2f} ms  {nbytes / dt / 1e9:6.1f} GB/s", flush=True)


def main() -> None:
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(2)
    x = torch.randn(27_000_000)
    bench("sum, 108 MB", x.sum, x.numel() * 4)
    y = torch.empty_like(x)
    bench("copy, 108 MB (read + write)", lambda: y.copy_(x), 2 * x.numel() * 4)
    layer = [(1536, 512), (512, 512), (512, 512), (512, 512), (2048, 512), (512, 2048)]
    shapes = layer * 6 + [(10000, 512)]
    weights = [torch.randn(*s) for s in shapes]
    nbytes = sum(w.numel() * 4 for w in weights)
    print(f"{len(weights)} weight matrices, {nbytes / 1e6:.1f} MB")
    for rows in (1, 64):
        xs = {k: torch.randn(rows, k) for k in (512, 2048)}
        bench(f"{rows} row(s): F.linear (MKL)", lambda: [F.linear(xs[w.size(1)], w) for w in weights], nbytes)
        bench(f"{rows} row(s): oneDNN", lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.size(1)], w, None, "none",
                                                                                   [], "") for w in weights], nbytes)
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
        bench(f"{rows} row(s): MKL packed", lambda: [torch.ops.mkl._mkl_linear(xs[w.size(1)], p, w, None, rows)
                                                     for w, p in zip(weights, packed)], nbytes)


if __name__ == "__main__":
    main()
