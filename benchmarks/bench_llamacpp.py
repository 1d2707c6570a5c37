"""zenlm vs llama.cpp on a CPU, side by side in one run (issue 23): decode tokens/s at f32, int8 (vs Q8_0)
and int4 (vs Q4_0, group 32), 512-token prompt processing, and greedy agreement with fp32.

Shapes (random weights, from ``bench_open_models``): SmolLM-135M (Llama: hidden 576, 30 layers, 9/3 heads,
MLP 1536, vocab 49152, tied) and Qwen2.5-0.5B (hidden 896, 24 layers, 14/2 heads, vocab 151936, tied, q/k/v
bias). One Hugging Face folder per shape (bf16 weights, a small byte-level BPE tokenizer.json for llama.cpp's
converter); zenlm loads it at fp32 and quantizes it with ``zenlm.quantize.quantize_model`` (int8: per-channel
weight-only; int4: group 32, llama.cpp's Q4_0 rounding); llama.cpp gets the same weights through its own
converter (f32, q8_0) and ``llama-quantize --pure`` (q4_0 everywhere, the head too, as zenlm's int4).

zenlm side, in this process, batch 1, ``--prompt`` random tokens then ``--new`` greedy tokens:
* decode tokens/s = (new - 1) / (time of a new-token generate - time of a 1-token generate), eager and with the
  captured step (``GenerationConfig(compile=True)``, zenlm.decode_step); the first compiled call's cost
  (tracing + C++ compile, or an on-disk cache hit) is printed apart;
* prompt processing: one forward over a ``--pp``-token prompt plus the last row's logits, tokens/s;
* the output head: ms of one row's logits (its share of a compiled step).
llama.cpp side: ``llama-bench -p pp -n new -r 1`` (its own processes, llamacpp_peer), greedy tokens via
llama-server. Rounds alternate zenlm and llama.cpp (``--rounds``), best of each, so that load from other
processes hits both alike; the load average is printed. Without llama.cpp's tools the llama.cpp cells are
skipped with one line saying how to build them.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_llamacpp.py [--threads 2] [--shapes smollm-135m,qwen2.5-0.5b]
        [--precisions f32,int8,int4] [--prompt 32] [--new 64] [--pp 512] [--rounds 3] [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

from bench_open_models import SHAPES, write_folder  # noqa: E402
import llamacpp_peer as peer  # noqa: E402

LLAMACPP_KIND = {"f32": ("f32", False), "int8": ("q8_0", False), "int4": ("q4_0", True)}  # (kind, pure)


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- the shared folder
def make_folder(shape: str, folder: Path) -> None:
    """bench_open_models' random-weight folder plus a byte-level BPE tokenizer.json (a few hundred tokens;
    llama.cpp's converter reads one and pads the vocabulary to the model's)."""
    import json

    if not (folder / "tokenizer.json").is_file():
        write_folder(shape, folder)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        text = [(Path(torch.__file__).parent / "functional.py").read_text()[:200_000]]
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    # a config class saves no "architectures" (llama.cpp's converter picks its model class by it), and keeps
    # rope_theta under rope_parameters only (older readers look for it at the top)
    config = json.loads((folder / "config.json").read_text())
    if "architectures" not in config:
        config["architectures"] = [SHAPES[shape][1]]
        config.setdefault("rope_theta", SHAPES[shape][2]["rope_theta"])
        (folder / "config.json").write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------- zenlm
def generate_seconds(model, prompt: list[int], new: int, compile: bool) -> tuple[float, float, list[int]]:
    """Wall and process-CPU seconds of one batch-1 greedy generate of exactly ``new`` tokens, and the tokens."""
    from zenlm.generation import Generator

    start, cpu = time.perf_counter(), time.process_time()
    out = Generator(model).generate([prompt], max_new_tokens=new, eos_token_id=[], compile=compile)[0]
    return time.perf_counter() - start, time.process_time() - cpu, out.token_ids


def prefill_seconds(model, ids: torch.Tensor) -> float:
    from zenlm.model import KVCache

    with torch.inference_mode():
        start = time.perf_counter()
        hidden = model.decode(ids, cache=KVCache(ids.size(1) + 1), name="input_ids")[0]
        model.logits(hidden[:, -1])
        return time.perf_counter() - start


def head_ms(model, reps: int = 20) -> float:
    hidden = torch.randn(1, model.config.hidden_size)
    with torch.inference_mode():
        model.logits(hidden)
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            model.logits(hidden)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


class ZenlmCell:
    """One (shape, precision) model of zenlm and its best figures over the rounds."""

    def __init__(self, model, args, prompt: list[int], pp_ids: torch.Tensor):
        self.model, self.args, self.prompt, self.pp_ids = model, args, prompt, pp_ids
        self.best = {"eager": 0.0, "compiled": 0.0, "pp": 0.0, "eager_cpu": 0.0, "compiled_cpu": 0.0}
        self.tokens: dict[str, list[int]] = {}
        self.compile_s = None

    def warm(self) -> None:
        generate_seconds(self.model, self.prompt, 2, False)
        prefill_seconds(self.model, self.pp_ids[:, :16])
        if not self.args.no_compile:
            seconds, _, _ = generate_seconds(self.model, self.prompt, 2, True)
            from zenlm.decode_step import decode_step

            step = decode_step(self.model)
            used = step.reports[-1].used if step.reports else False
            self.compile_s = (seconds, step.compiled, used)  # used: the compiled step timed faster than eager

    def round(self) -> None:
        args = self.args
        for mode in ("eager",) + (() if args.no_compile else ("compiled",)):
            one, one_cpu, _ = generate_seconds(self.model, self.prompt, 1, mode == "compiled")
            full, full_cpu, tokens = generate_seconds(self.model, self.prompt, args.new, mode == "compiled")
            self.tokens[mode] = tokens
            self.best[mode] = max(self.best[mode], (args.new - 1) / max(full - one, 1e-9))
            # CPU time: on a shared machine the time this process ran (equal to wall time on an idle one at 1 thread)
            self.best[mode + "_cpu"] = max(self.best[mode + "_cpu"], (args.new - 1) / max(full_cpu - one_cpu, 1e-9))
        self.best["pp"] = max(self.best["pp"], self.pp_ids.size(1) / prefill_seconds(self.model, self.pp_ids))


# --------------------------------------------------------------------------- llama.cpp
def llamacpp_round(path: str, args, best: dict) -> None:
    out = peer.bench(path, n_prompt=args.pp, n_gen=args.new, threads=args.threads, repetitions=1)
    best["tg"] = max(best.get("tg", 0.0), out["tg_tps"])
    best["pp"] = max(best.get("pp", 0.0), out["pp_tps"])


def agreement(tokens: list[int], reference: list[int]) -> str:
    """Identical leading tokens out of the reference's (greedy paths part at the first difference)."""
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return f"{same}/{len(reference)}"


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="smollm-135m,qwen2.5-0.5b")
    parser.add_argument("--precisions", default="f32,int8,int4")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="zenlm eager only")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "zenlm-bench-llamacpp"),
                        help="folders and GGUF files, kept between runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import zenlm
    from zenlm.kernels import system_summary
    from zenlm.quantize import quantize_model

    print(system_summary(), flush=True)  # first: a ratio is only compared within one CPU
    skip = "skipped: --no-llamacpp" if args.no_llamacpp else peer.missing("llama-bench", "llama-server", "converter")
    if skip:
        print(f"llama.cpp: {skip}")
    else:
        found = peer.find_llamacpp()
        print(f"llama.cpp {found['version']} from {found['root']} ({' '.join(found['cmake_args']) or 'default flags'})")
    print(f"{args.threads} threads, batch 1, prompt {args.prompt}, {args.new} greedy tokens, pp {args.pp}, "
          f"{args.rounds} alternating rounds (best of each); {load()}", flush=True)

    rows = []
    work = Path(args.work)
    for shape in args.shapes.split(","):
        folder = work / shape
        make_folder(shape, folder)
        base = zenlm.load(folder, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        vocab = base.config.vocab_size
        prompt = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
        pp_ids = torch.randint(0, vocab, (1, args.pp), generator=g)
        reference = None
        llama_f32_tokens = None
        for precision in args.precisions.split(","):
            model = base if precision == "f32" else quantize_model(
                base, precision, group_size=32 if precision == "int4" else None)
            cell = ZenlmCell(model, args, prompt, pp_ids)
            cell.warm()
            path, best, llama_tokens = None, {}, None
            if not skip:
                kind, pure = LLAMACPP_KIND[precision]
                path = peer.model_file(folder, kind, work / "gguf", pure=pure)["path"]
                llama_tokens = peer.greedy(path, prompt, args.new, threads=args.threads)["tokens"]
                if precision == "f32":
                    llama_f32_tokens = llama_tokens
            for _ in range(args.rounds):
                cell.round()
                if path:
                    llamacpp_round(path, args, best)
            if precision == "f32":
                reference = cell.tokens["eager"]
            zen_fast = max(cell.best["eager"], cell.best["compiled"])
            head = head_ms(model)
            row = dict(shape=shape, precision=precision, eager=cell.best["eager"], compiled=cell.best["compiled"],
                       eager_cpu=cell.best["eager_cpu"], compiled_cpu=cell.best["compiled_cpu"],
                       llama=best.get("tg"), pp=cell.best["pp"], llama_pp=best.get("pp"), head_ms=head,
                       head_share=head * zen_fast / 1e3,
                       agree=agreement(cell.tokens["eager"], reference) if reference else "-",
                       compiled_same=(cell.tokens.get("compiled") == cell.tokens["eager"]) if not args.no_compile
                       else None,
                       llama_agree=agreement(llama_tokens, llama_f32_tokens) if llama_tokens and llama_f32_tokens
                       else "-", compile_s=cell.compile_s)
            rows.append(row)
            print(format_row(row), flush=True)
            del model, cell
        del base
    print()
    print_table(rows)
    print(load())


def format_row(r: dict) -> str:
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    best = max(r["eager"], r["compiled"])
    compile_s = "" if not r["compile_s"] else (f"; first compiled call {r['compile_s'][0]:.1f} s"
                                                + ("" if r["compile_s"][1] else " (compile failed: eager)")
                                                + ("" if r["compile_s"][2] else " (eager timed faster: kept)"))
    return (f"{r['shape']} {r['precision']}: decode eager {r['eager']:.1f}, compiled {r['compiled']:.1f} tok/s "
            f"(by CPU time {r['eager_cpu']:.1f} / {r['compiled_cpu']:.1f}) "
            f"(same tokens: {r['compiled_same']}), llama.cpp {r['llama'] or '-'}; ratio {ratio(best, r['llama'])}; "
            f"pp {r['pp']:.0f} vs {r['llama_pp'] or '-'} tok/s; head {r['head_ms']:.2f} ms "
            f"({100 * r['head_share']:.0f}% of a step){compile_s}")


def print_table(rows: list[dict]) -> None:
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    num = lambda x, d=1: f"{x:.{d}f}" if x else "-"  # noqa: E731
    print("| shape | precision | llama.cpp decode | zenlm eager | zenlm compiled | compiled / eager (CPU time) | "
          "zenlm / llama.cpp | "
          "pp512 llama.cpp | pp512 zenlm | pp ratio | head ms (share) | greedy = fp32: zenlm / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = max(r["eager"], r["compiled"])
        print(f"| {r['shape']} | {r['precision']} | {num(r['llama'])} | {num(r['eager'])} | {num(r['compiled'])} | "
              f"{ratio(r['compiled_cpu'], r['eager_cpu'])} | {ratio(best, r['llama'])} | {num(r['llama_pp'], 0)} | {num(r['pp'], 0)} | "
              f"{ratio(r['pp'], r['llama_pp'])} | {r['head_ms']:.2f} ({100 * r['head_share']:.0f}%) | "
              f"{r['agree']} / {r['llama_agree']} |")


if __name__ == "__main__":
    main()
