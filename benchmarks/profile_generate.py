"""Where zenlm's decoding time goes: the bench_generate model under torch.profiler.

    python benchmarks/profile_generate.py                 # 1 x greedy and 16 x beam 4, timings only
    python benchmarks/profile_generate.py 1x1 --profile   # plus the per-operator table

Builds (once, in a temporary folder) the same BART-shaped model bench_generate times, decodes
exactly 64 new tokens per prompt, prints ms per step, then the operators sorted by their own time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import bench_generate as bg
import zenlm
from zenlm.generation import Generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cells", nargs="?", default="1x1,16x4", help="batch x beams, comma-separated")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's operator table per cell")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bg.build_folder(Path(tmp))
        model = zenlm.load(Path(tmp))
    gen, src = Generator(model), bg.sources()
    with torch.inference_mode():
        for cell in args.cells.split(","):
            batch, beams = (int(n) for n in cell.split("x"))
            run = lambda: gen.generate(src[:batch], max_new_tokens=bg.NEW_TOKENS, min_new_tokens=bg.NEW_TOKENS,
                                       num_beams=beams)
            run()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            dt = statistics.median(times)
            print(f"{batch}x{beams}: {batch * bg.NEW_TOKENS / dt:.1f} tokens/s, {dt / bg.NEW_TOKENS * 1e3:.2f} ms/step",
                  flush=True)
            if args.profile:
                with torch.profiler.profile() as prof:
                    run()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
