"""Decoding speed: zenlm vs transformers' generate() (and CTranslate2 when installed) on identical weights.

A BART-shaped model (d_model 512, 6+6 layers, 8 heads, ffn 2048, vocab 10000, random weights
built locally with a fixed seed) is saved once as a Hugging Face folder; zenlm imports it through
``zenlm.hf``, transformers loads it with ``from_pretrained``, CTranslate2 converts it with its own
converter. Sources are 32 random tokens; every engine generates exactly 64 new tokens
(min = max = 64) at batch 1 and 16, greedy and beam 4, and the script checks that the engines
return the same tokens. Each engine runs in its own subprocess on the same number of threads
(CTranslate2 after torch in one process is much slower on 2 cores), timed as the median of
``--reps`` runs after a warm-up; tokens/s counts returned tokens (batch x 64).

It also reports time-to-first-token and tokens/s of zenlm (and transformers) for decoder-only
``tiny`` and ``gpt2-small`` shapes (32-token prompt, 64 new tokens, batch 1, greedy).

    python benchmarks/bench_generate.py                     # fp32, 2 threads, all engines
    python benchmarks/bench_generate.py --int8              # also CTranslate2 int8 vs zenlm dynamic-int8 linears
    python benchmarks/bench_generate.py --mkl               # also zenlm with fast_cpu=False (torch's MKL linears)
    python benchmarks/bench_generate.py --reps 5 --threads 2
    python benchmarks/bench_generate.py --threads 1 --cpu-time   # on a busy, shared machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SRC_LEN, NEW_TOKENS, VOCAB = 32, 64, 10000
CELLS = [(1, 1), (1, 4), (16, 1), (16, 4)]  # (batch, beams)


# --------------------------------------------------------------------------- the shared model
def build_folder(folder: Path) -> None:
    """The BART-shaped model with random weights, saved as transformers saves it, plus a word-level
    tokenizer over the 10000 ids (CTranslate2's converter reads the vocabulary from it)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=512, encoder_layers=6, decoder_layers=6,
                                     encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                                     decoder_ffn_dim=2048, max_position_embeddings=1024, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                                     forced_bos_token_id=None, forced_eos_token_id=None)
    model = transformers.BartForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"t{i}" for i in range(len(specials), VOCAB)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(folder)


def sources():
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(4, VOCAB, (16, SRC_LEN), generator=g)


# --------------------------------------------------------------------------- engines (one per process)
CLOCK = {"clock": time.perf_counter}


def time_cells(run, reps: int, cells) -> dict:
    src = sources()
    out = {}
    clock = CLOCK["clock"]
    for batch, beams in cells:
        ids = src[:batch]
        tokens = run(ids, beams)  # warm-up, and the tokens to compare
        times = []
        for _ in range(reps):
            start = clock()
            run(ids, beams)
            times.append(clock() - start)
        out[f"{batch}x{beams}"] = dict(tokens_per_s=batch * NEW_TOKENS / statistics.median(times),
                                       best_tokens_per_s=batch * NEW_TOKENS / min(times), tokens=tokens)
    return out


def engine_zenlm(folder: Path, reps: int, int8: bool, cells, mkl: bool = False) -> dict:
    import torch

    import zenlm
    from zenlm.generation import Generator

    model = zenlm.load(folder)
    if int8:  # int8 weights (embeddings and the tied head too) and activations, as CTranslate2's int8
        from zenlm.quantize import quantize_model

        model = quantize_model(model, "dynamic")
    gen = Generator(model)

    def run(ids, beams):  # fast_cpu (oneDNN linears while decoding) is the default; --mkl turns it off
        out = gen.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams,
                           fast_cpu=not mkl)
        return out.token_ids

    with torch.inference_mode():
        return time_cells(run, reps, cells)


def engine_hf(folder: Path, reps: int, int8: bool, cells) -> dict:
    import torch
    import transformers

    model = transformers.BartForConditionalGeneration.from_pretrained(folder).eval()

    def run(ids, beams):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=beams,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, no_repeat_ngram_size=0,
                             repetition_penalty=1.0, forced_bos_token_id=None, forced_eos_token_id=None,
                             length_penalty=1.0, early_stopping=False)
        return out[:, 1:].tolist()

    with torch.inference_mode():
        return time_cells(run, reps, cells)


def engine_ct2(folder: Path, reps: int, int8: bool, cells, threads: int) -> dict:
    import ctranslate2
    import transformers

    out_dir = folder / ("ct2-int8" if int8 else "ct2-fp32")
    if not out_dir.exists():
        transformers.BartConfig.normalize_before = False  # CTranslate2 4.x's converter reads this old field
        ctranslate2.converters.TransformersConverter(str(folder)).convert(
            str(out_dir), quantization="int8" if int8 else None, force=True)
    translator = ctranslate2.Translator(str(out_dir), device="cpu", inter_threads=1, intra_threads=threads,
                                       compute_type="int8" if int8 else "float32")
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, VOCAB)]
    index = {t: i for i, t in enumerate(vocab)}

    def run(ids, beams):
        batch = [[vocab[i] for i in row] for row in ids.tolist()]
        results = translator.translate_batch(batch, beam_size=beams, max_decoding_length=NEW_TOKENS,
                                             min_decoding_length=NEW_TOKENS, length_penalty=1.0,
                                             return_end_token=True)
        return [[index[t] for t in r.hypotheses[0]] for r in results]

    return time_cells(run, reps, cells)


def decoder_only(reps: int) -> dict:
    """Time-to-first-token and tokens/s for decoder-only shapes (zenlm; transformers' GPT-2 for the
    gpt2-small shape, same weights)."""
    import torch
    import transformers

    import zenlm
    from zenlm import TransformerConfig, TransformerLM
    from zenlm.generation import Generator

    results = {}
    prompt = torch.randint(3, 4000, (1, 32), generator=torch.Generator().manual_seed(2))
    for preset in ("tiny", "gpt2-small"):
        torch.manual_seed(0)
        if preset == "gpt2-small":
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
            with tempfile.TemporaryDirectory() as d:
                hf.save_pretrained(d)
                model = zenlm.load(d)
        else:
            hf, model = None, TransformerLM(TransformerConfig.from_preset(preset)).eval()
        gen = Generator(model)
        row = {}
        with torch.inference_mode():
            for name, run in [("zenlm", lambda n: gen.generate(prompt, max_new_tokens=n, min_new_tokens=n)),
                              ("transformers", None if hf is None else lambda n: hf.generate(
                                  prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=0))]:
                if run is None:
                    continue
                run(2)
                first = statistics.median(_timed(lambda: run(1)) for _ in range(reps))
                full = statistics.median(_timed(lambda: run(NEW_TOKENS)) for _ in range(reps))
                row[name] = dict(ttft_ms=first * 1e3, tokens_per_s=NEW_TOKENS / full)
        results[preset] = row
    return results


def _timed(fn) -> float:
    clock = CLOCK["clock"]
    start = clock()
    fn()
    return clock() - start


# --------------------------------------------------------------------------- driver
def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK["clock"] = time.process_time
    folder = Path(args.folder)
    cells = [tuple(map(int, c.split("x"))) for c in args.cells.split(",")]
    if args.engine in ("zenlm", "zenlm-mkl"):
        res = engine_zenlm(folder, args.reps, args.int8, cells, mkl=args.engine == "zenlm-mkl")
    elif args.engine == "transformers":
        res = engine_hf(folder, args.reps, args.int8, cells)
    elif args.engine == "ctranslate2":
        res = engine_ct2(folder, args.reps, args.int8, cells, args.threads)
    else:
        res = decoder_only(args.reps)
    Path(args.result).write_text(json.dumps(res))


def spawn(engine: str, folder: Path, args, int8: bool = False) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--folder", str(folder), "--result", result,
           "--threads", str(args.threads), "--reps", str(args.reps), "--cells", args.cells] + (["--int8"] if int8 else [])
    cmd += ["--cpu-time"] if args.cpu_time else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {engine}{' int8' if int8 else ''} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        return None
    return json.loads(Path(result).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also int8: CTranslate2 int8 vs zenlm int8 linear layers")
    ap.add_argument("--cells", default=",".join(f"{b}x{k}" for b, k in CELLS), help="batch x beams, e.g. 1x1,16x4")
    ap.add_argument("--no-decoder-only", action="store_true")
    ap.add_argument("--engines", default="", help="only these, e.g. zenlm,transformers ('zenlm int8' for int8)")
    ap.add_argument("--mkl", action="store_true", help="also zenlm with fast_cpu=False (torch's default MKL linears)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time instead of wall time: with --threads 1 this is robust to other "
                         "processes sharing the machine (wall time then only inflates)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    if args.child:
        return child(args)

    import importlib.util

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{args.threads} threads, median of {args.reps} runs after a warm-up, "
          f"{'process CPU time' if args.cpu_time else 'wall time'}; load average {os.getloadavg()[0]:.1f}")
    print(f"BART shape d512 6+6 layers ffn2048 vocab{VOCAB}; source {SRC_LEN} tokens; exactly {NEW_TOKENS} new tokens")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bart"
        build_folder(folder)
        engines = [("zenlm", False), ("transformers", False)]
        if args.mkl:
            engines.insert(1, ("zenlm-mkl", False))
        if importlib.util.find_spec("ctranslate2") is not None:
            engines.append(("ctranslate2", False))
        else:
            print("ctranslate2 not installed (pip install ctranslate2): its columns are skipped")
        if args.int8:
            engines += [("zenlm", True)] + ([("ctranslate2", True)] if ("ctranslate2", False) in engines else [])
        if args.engines:
            keep = set(args.engines.split(","))
            engines = [e for e in engines if e[0] + (" int8" if e[1] else "") in keep]
        results = {}
        for engine, int8 in engines:
            name = engine + (" int8" if int8 else "")
            print(f"running {name} ...", flush=True)
            results[name] = spawn(engine, folder, args, int8)
        print()
        names = [n for n in results if results[n] is not None]
        header = f"{'batch x beams':<14}" + "".join(f"{n + ' tok/s':>22}" for n in names)
        header += f"{'zenlm/HF':>10}" + (f"{'zenlm/CT2':>11}" if "ctranslate2" in names else "")
        header += f"{'zenlm/CT2 int8':>16}" if "ctranslate2 int8" in names and "zenlm int8" in names else ""
        print(header)
        for cell in args.cells.split(","):
            row = f"{cell:<14}" + "".join(f"{results[n][cell]['tokens_per_s']:>22.1f}" for n in names)
            z = results.get("zenlm")
            if z and results.get("transformers"):
                row += f"{z[cell]['tokens_per_s'] / results['transformers'][cell]['tokens_per_s']:>10.2f}"
            if z and results.get("ctranslate2"):
                row += f"{z[cell]['tokens_per_s'] / results['ctranslate2'][cell]['tokens_per_s']:>11.2f}"
            if results.get("zenlm int8") and results.get("ctranslate2 int8"):
                row += f"{results['zenlm int8'][cell]['tokens_per_s'] / results['ctranslate2 int8'][cell]['tokens_per_s']:>16.2f}"
            print(row)
        print()
        ref = results.get("transformers")
        for n in names:
            if n == "transformers" or ref is None:
                continue
            same = {cell: results[n][cell]["tokens"] == ref[cell]["tokens"] for cell in args.cells.split(",")}
            print(f"{n} tokens identical to transformers: " + ", ".join(f"{c} {'yes' if s else 'NO'}" for c, s in same.items()))
        if not args.no_decoder_only:
            print("\ndecoder-only, batch 1, 32-token prompt, greedy:")
            dec = spawn("decoder-only", folder, args)
            for preset, row in (dec or {}).items():
                for engine, r in row.items():
                    print(f"  {preset:<11} {engine:<13} time to first token {r['ttft_ms']:7.1f} ms   "
                          f"{r['tokens_per_s']:7.1f} tokens/s")


if __name__ == "__main__":
    main()
