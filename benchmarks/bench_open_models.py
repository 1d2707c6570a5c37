"""Open-model shapes, random weights: zenlm vs transformers on loading, memory, prefill and decode.

Three Hugging Face folders are written with random bf16 weights straight through safetensors (the
tensor names and shapes come from transformers' own model class built on the meta device, the
config from its config class), as the real models ship them:

* SmolLM-135M's shape (Llama: hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied);
* Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 / 2 heads, MLP 4864, vocab 151936, tied, q/k/v bias);
* Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 / 8 heads, MLP 8192, vocab 128256, tied, llama3 RoPE):
  loading only (time, peak memory), plus one short forward.

Every measurement runs in a fresh process (``--child``) that imports its library, resets the
resident-memory high-water mark (``/proc/self/clear_refs``), then loads: "peak load" is the peak
resident size while loading minus the size after the imports; "after fwd" is the peak once a
forward has touched every weight (memory-mapped weights count only once read). Load time is the
best of three loads in that process (page cache warm for both sides: the folder was just written).
Prefill: one forward over a ``--prompt``-token batch-1 prompt (best of two after a warm-up);
decode: ``--new`` greedy steps through each library's KV cache (forward of one token + argmax),
tokens/s. fp32 runs load the bf16 folder with dtype=float32 on both sides; bf16 runs keep bf16,
and run only where the CPU multiplies bf16 natively (``zenlm.cpu.cpu_info().bf16``). "same
tokens" says whether a library's greedy continuation equals transformers'.

llama.cpp (where ``bash scripts/build-llamacpp.sh`` built its tools; otherwise one "skipped" line): the
same folder converted by llama.cpp's own converter (f32 for fp32, bf16 for bf16), timed by its own
``llama-bench`` (prefill: one ``--prompt``-token batch; decode: ``--new`` tokens one at a time, from an
empty context; mean of 3 repetitions) at the same thread count, and its greedy tokens after the same
prompt from ``llama-server`` at temperature 0 (benchmarks/llamacpp_peer.py). The folders carry a
byte-level BPE tokenizer trained on tinyshakespeare, which the converter needs (the ids run past it
into the padded vocabulary, as they do in a random-weight model). ``--rounds`` alternates the three
engines that many times (the CPU is shared) and keeps each one's best prefill and decode.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_open_models.py [--threads 1] [--prompt 128] [--new 32]
        [--skip-1b] [--only smollm,qwen] [--rounds 2] [--no-llamacpp]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_peer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "smollm-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)),
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643, use_sliding_window=False)),
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
        vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072, head_dim=64,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}


# --------------------------------------------------------------------------- folders
def write_folder(shape: str, directory: Path) -> int:
    """config.json from transformers' config class, model.safetensors with random bf16 weights
    (normal, std 0.02; norms 1), names and shapes from the model class on the meta device.
    Returns the parameter count."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config_name, model_name, kwargs = SHAPES[shape]
    config = getattr(transformers, config_name)(**kwargs)
    config.dtype = torch.bfloat16
    config.architectures = [model_name]  # as save_pretrained of a model writes it (llama.cpp's converter reads it)
    with torch.device("meta"):
        meta = getattr(transformers, model_name)(config)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in meta.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = torch.empty(p.shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        tensors[name] = t
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    write_tokenizer(directory)
    count = sum(t.numel() for t in tensors.values())
    del tensors
    gc.collect()
    return count


def write_tokenizer(directory: Path, vocab_size: int = 2000) -> None:
    """tokenizer.json + tokenizer_config.json (byte-level BPE on tinyshakespeare's first 200 kB): what
    llama.cpp's converter reads a vocabulary from; transformers and zenlm load it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    text = corpus.read_text(encoding="utf-8")[:200_000] if corpus.is_file() else __doc__ * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
                            ).save_pretrained(directory)


def prompt_ids(vocab: int, n: int) -> list[int]:
    """The batch-1 prompt every engine gets: random ids from a fixed seed (the child's own draw)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, n), generator=g)[0].tolist()


def measure_llamacpp(folder: Path, dtype: str, args, vocab: int) -> dict:
    """llama.cpp on the same folder at the same precision: llama-bench's prefill and decode tokens/s,
    and llama-server's greedy tokens after the same prompt."""
    kind = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    made = llamacpp_peer.model_file(folder, kind, folder.parent / "gguf")
    timed = llamacpp_peer.bench(made["path"], n_prompt=args.prompt, n_gen=args.new, threads=args.threads)
    ran = llamacpp_peer.greedy(made["path"], prompt_ids(vocab, args.prompt), args.new, threads=args.threads)
    return {"prefill_tps": timed["pp_tps"], "decode_tps": timed["tg_tps"], "tokens": ran["tokens"],
            "gguf_bytes": made["bytes"], "build": timed.get("build_commit"), "convert_s": made["seconds"]}


def best_of(runs: list[dict]) -> dict:
    """One engine's rounds: the best prefill and decode, the rest from the first round."""
    out = dict(runs[0])
    for key in ("prefill_tps", "decode_tps"):
        out[key] = max(r[key] for r in runs)
    return out


# --------------------------------------------------------------------------- one measurement (child process)
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    if spec["lib"] == "zenlm":
        import zenlm

        def load():
            return zenlm.load(spec["folder"], dtype=dtype)
    else:
        import transformers

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=dtype).eval()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # high-water mark := current resident size
    except OSError:
        pass
    base = _status("VmRSS")
    start = time.perf_counter()
    model = load()
    times = [time.perf_counter() - start]
    out = {"peak_load": _status("VmHWM") - base,
           "weights": sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()),
           "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})}
    vocab = model.config.vocab_size
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids(vocab, spec["prompt"])])
        first = cache = logits = step = None
        if not spec["speed"]:  # loading only: one short forward touches every weight
            model(ids[:, :8])
            out["peak_forward"] = _status("VmHWM") - base
        else:
            model(ids[:, :16], use_cache=True)  # warm-up (kernels, packing)
            out["peak_forward"] = _status("VmHWM") - base
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                first = model(ids, use_cache=True)
                best = min(best, time.perf_counter() - start)
            out["prefill_tps"] = spec["prompt"] / best
            cache, logits = first.past_key_values, first.logits
            tokens = []
            start = time.perf_counter()
            for _ in range(spec["new"]):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(nxt))
                step = model(nxt, past_key_values=cache, use_cache=True)
                cache, logits = step.past_key_values, step.logits
            out["decode_tps"] = spec["new"] / (time.perf_counter() - start)
            out["tokens"] = tokens
    model = first = cache = logits = step = None  # noqa: F841 (free the model before the timed reloads)
    gc.collect()
    for _ in range(spec["loads"] - 1):  # more loads for the time (the first paid one-time costs too)
        start = time.perf_counter()
        model = load()
        times.append(time.perf_counter() - start)
        del model
        gc.collect()
    out["load_s"], out["load_first_s"] = min(times), times[0]
    return out


def measure(lib: str, folder: Path, dtype: str, args, speed: bool, loads: Optional[int] = None) -> dict:
    spec = {"lib": lib, "folder": str(folder), "dtype": dtype, "threads": args.threads, "prompt": args.prompt,
            "new": args.new, "speed": speed, "loads": loads or args.loads}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{lib} {folder.name} {dtype} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--only", default="smollm-135m,qwen2.5-0.5b", help="speed shapes, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the engines this often (best kept)")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch
    import transformers

    from zenlm.cpu import cpu_info

    info = cpu_info()
    print(info.describe())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"prompt {args.prompt} tokens, {args.new} decode steps, batch 1")
    skipped = "skipped: --no-llamacpp" if args.no_llamacpp else llamacpp_peer.missing("llama-bench", "llama-server",
                                                                                         "converter")
    peer = llamacpp_peer.find_llamacpp()
    print(f"llama.cpp: {skipped}" if skipped else
          f"llama.cpp {peer['version']} (llama-cpp-python sdist), tools in {peer['root']}, "
          f"built with {' '.join(peer['cmake_args']) or 'default flags'}")
    dtypes = ["float32"] + (["bfloat16"] if info.bf16 else [])
    if not info.bf16:
        print("bf16: this CPU has no native bf16 (AVX512_BF16/AMX): bf16 speed runs skipped")

    header = ("| model | dtype | lib | load s (best) | first load s | peak load MiB | peak / weights | after fwd MiB "
              "| prefill tok/s | decode tok/s | same tokens |")
    rule = "|" + "---|" * (header.count("|") - 1)
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="zenlm-open-models-") as tmp:
        shapes = [s for s in args.only.split(",") if s] + ([] if args.skip_1b else ["llama-3.2-1b"])
        for shape in shapes:
            folder = Path(tmp) / shape
            start = time.perf_counter()
            params = write_folder(shape, folder)
            print(f"\n{shape}: {params / 1e6:,.0f}M parameters, folder written in {time.perf_counter() - start:.0f} s "
                  f"({mib((folder / 'model.safetensors').stat().st_size)} MiB)", flush=True)
            speed = shape != "llama-3.2-1b"
            for dtype in (dtypes if speed else ["bfloat16", "float32"]):
                runs: dict[str, list[dict]] = {"zenlm": [], "transformers": [], "llama.cpp": []}
                for r in range(args.rounds if speed else 1):  # alternate the engines: the CPU is shared
                    for lib in ("zenlm", "transformers"):
                        runs[lib].append(measure(lib, folder, dtype, args, speed, loads=None if r == 0 else 1))
                    if speed and not skipped:
                        vocab = SHAPES[shape][2]["vocab_size"]
                        runs["llama.cpp"].append(measure_llamacpp(folder, dtype, args, vocab))
                got = {lib: (best_of(rs) if speed else rs[0]) for lib, rs in runs.items() if rs}
                for lib in ("zenlm", "transformers"):
                    got[lib].update({k: runs[lib][0][k] for k in ("load_s", "load_first_s", "peak_load")})
                for lib, m in got.items():
                    same = ""
                    if speed and lib != "transformers":
                        a, b = m["tokens"], got["transformers"]["tokens"]
                        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                        same = "yes" if a == b else f"first {first_diff} of {len(a)}"
                    if lib == "llama.cpp":
                        row = (f"| {shape} | {dtype} | llama.cpp | - | - | - | - | - | {m['prefill_tps']:.0f} | "
                               f"{m['decode_tps']:.1f} | {same} |")
                    else:
                        row = (f"| {shape} | {dtype} | {lib} | {m['load_s']:.2f} | {m['load_first_s']:.2f} | "
                               f"{mib(m['peak_load'])} | {m['peak_load'] / m['weights']:.2f} | "
                               f"{mib(m['peak_forward'])} | "
                               + (f"{m['prefill_tps']:.0f} | {m['decode_tps']:.1f} | {same} |" if speed
                                  else "- | - | - |"))
                    rows.append(row)
                    print(row, flush=True)
                z, h = got["zenlm"], got["transformers"]
                ratio = (f"{shape} {dtype}: load time transformers/zenlm "
                         f"{h['load_first_s'] / z['load_first_s']:.2f} (first load in a fresh process), "
                         f"{h['load_s'] / z['load_s']:.2f} (best repeat); peak load memory "
                         f"{z['peak_load'] / h['peak_load']:.2f}x transformers' "
                         f"({z['peak_load'] / z['weights']:.2f}x the weights; transformers "
                         f"{h['peak_load'] / h['weights']:.2f}x)")
                if speed:
                    ratio += (f", prefill {z['prefill_tps'] / h['prefill_tps']:.2f}x, "
                              f"decode {z['decode_tps'] / h['decode_tps']:.2f}x transformers' tokens/s")
                if "llama.cpp" in got:
                    lc = got["llama.cpp"]
                    ratio += (f"; vs llama.cpp: prefill {z['prefill_tps'] / lc['prefill_tps']:.2f}x, "
                              f"decode {z['decode_tps'] / lc['decode_tps']:.2f}x")
                ratios.append(ratio)
                print(ratio, flush=True)
            (folder / "model.safetensors").unlink()
            for made in (Path(tmp) / "gguf").glob(f"{shape}-*.gguf"):
                made.unlink()
    print("\n" + header + "\n" + rule)
    print("\n".join(rows))
    print("\nzenlm vs transformers (load time ratio > 1 = zenlm faster; memory and speed ratios: "
          "zenlm's / transformers'), and zenlm's tokens/s / llama.cpp's:")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
