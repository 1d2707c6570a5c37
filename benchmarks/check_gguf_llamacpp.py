"""The real consumer: llama.cpp loads zenlm's GGUF files and computes what zenlm computes.

For each variant (a tiny random model of each architecture zenlm exports, and the rotary scalings
it writes) the script exports model.gguf with zenlm, loads it with llama.cpp (llama-cpp-python)
and compares, on a prompt tokenized by both sides:

* the token ids of the prompt (llama.cpp's tokenizer from tokenizer.ggml.* vs zenlm's);
* the prompt's logits (max |difference|);
* greedy decoding for --tokens tokens: zenlm's argmax of a full forward each step vs llama.cpp's
  argmax of its own logits each step. The smallest top-1/top-2 gap zenlm saw is printed too, so
  a disagreement can be told from a near-tie.

Each file is compared with zenlm reading that same file (f32: the model itself; f16/q8_0: its
dequantized weights). At f32 the greedy tokens must be equal; f16 and q8_0 are reported (agreeing
prefix, logit error): llama.cpp multiplies q8_0 weights by activations it rounds to 8 bits as well.

Needs ``pip install llama-cpp-python`` (compiles llama.cpp: ~20 minutes on 2 cores); on a CPU with AMX
build it as ``CMAKE_ARGS="$(bash scripts/build-llamacpp.sh --cmake-args)" pip install llama-cpp-python``:
ggml's AMX path crashes every q8_0 file (see llamacpp_peer). Then:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/check_gguf_llamacpp.py [--tokens 32] [--types f32,f16,q8_0]

tests/test_gguf.py runs ``check`` as a ``slow`` test when llama_cpp is importable.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from zenlm import TransformerConfig, TransformerLM, Tokenizer
from zenlm.gguf import export_gguf, load_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_peer import python_greedy  # noqa: E402

TEXTS = ["hello world, this is zenlm talking to llama.cpp. " * 20, "numbers 123 4567 and émojis 🦙 über café",
         "def f(x):\n    return x * 2\n\n# tabs\tand  spaces", "The quick brown fox jumps over the lazy dog. " * 10]
PROMPT = "hello world, this is zenlm talking to llama.cpp. numbers 123 and 🦙"

VARIANTS = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama-bias": {"bias": True},
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "yarn-rope": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True, "head_size": 32},
    "phi3-partial": {"partial_rotary_factor": 0.5},
}


def tiny(tok: Tokenizer, seed: int = 0, **overrides) -> TransformerLM:
    kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_decoder_layers=2, max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = TransformerLM(TransformerConfig.from_preset("tiny", **kw)).eval()
    with torch.no_grad():  # larger weights than the init: peaked logits, fewer near-ties in greedy decoding
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@torch.no_grad()
def zenlm_greedy(model: TransformerLM, ids: list[int], n: int) -> tuple[list[int], float, np.ndarray]:
    seq, out, gap = list(ids), [], float("inf")
    prompt_logits = model(torch.tensor([ids])).logits[0].numpy()
    for _ in range(n):
        last = model(torch.tensor([seq])).logits[0, -1]
        top = torch.topk(last, 2).values
        gap = min(gap, float(top[0] - top[1]))
        nxt = int(last.argmax())
        out.append(nxt)
        seq.append(nxt)
    return out, gap, prompt_logits


def llamacpp_greedy(path: Path, ids: list[int], n: int, prompt: str = PROMPT) -> dict:
    """llama.cpp's tokenization of ``prompt``, its prompt logits and ``n`` greedy tokens, from a worker
    process (beside torch in one process llama.cpp's runtime crashed)."""
    result = python_greedy(path, ids, n, text=prompt)
    result["prompt_logits"] = np.array(result["prompt_logits"], dtype=np.float32)
    return result


@torch.no_grad()
def on_zenlms_path(model: TransformerLM, path: Path, ids: list[int], want: list[int]) -> dict:
    """Both engines read prompt + zenlm's greedy tokens in one pass: at how many of those steps llama.cpp's
    argmax is zenlm's token, the largest logit difference along the path, and zenlm's top-2 gap at the
    steps where they differ (a flip needs a gap below twice the logit error)."""
    seq = ids + want
    ours = model(torch.tensor([seq])).logits[0].numpy()
    theirs = np.array(python_greedy(path, seq, 0)["prompt_logits"], dtype=np.float32)
    steps = range(len(ids) - 1, len(seq) - 1)
    differ = [i for i in steps if int(theirs[i].argmax()) != int(ours[i].argmax())]
    top2 = np.sort(ours, axis=-1)[:, -2:]
    return {"path_agree": len(want) - len(differ), "path_logits_max_diff": float(np.abs(ours - theirs).max()),
            "gaps_where_they_differ": [float(top2[i, 1] - top2[i, 0]) for i in differ]}


def llamacpp_build() -> str:
    """llama-cpp-python's own system line (which ggml CPU features it was compiled with), from a worker."""
    import subprocess

    code = "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() or proc.stderr.strip()[-300:]


def check(out_dir: Path, tokens: int = 32, types=("f32",), variants=tuple(VARIANTS)) -> dict:
    """One row per (variant, type): llama.cpp against zenlm reading the same file (at f32 that is the
    model itself, bit-exact; at f16/q8_0 the dequantized weights: the same numbers llama.cpp holds,
    though it multiplies q8_0 weights by activations it rounds to 8 bits too)."""
    out_dir = Path(out_dir)
    tok = Tokenizer.train(TEXTS, vocab_size=320)
    ids = tok.encode(PROMPT)
    rows = []
    for name in variants:
        model = tiny(tok, **VARIANTS[name])
        for kind in types:
            path = out_dir / f"{name}-{kind}.gguf"
            report = export_gguf(model, tok, path, type=kind)
            want, gap, want_logits = zenlm_greedy(model if kind == "f32" else load_gguf(path), ids, tokens)
            try:
                ran = llamacpp_greedy(path, ids, tokens)
            except RuntimeError as e:  # a file llama.cpp refuses is a row of the report, not a crash
                rows.append(dict(variant=name, type=kind, architecture=report["architecture"], tokenizer_equal=False,
                                 prompt_logits_max_diff=float("nan"), greedy_equal=False, agreeing_prefix=0,
                                 min_top2_gap=gap, zenlm=want, llama_cpp=None, error=str(e).splitlines()[0]))
                continue
            got, got_logits, llama_ids = ran["greedy"], ran["prompt_logits"], ran["tokenized"]
            agree = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
            row = dict(variant=name, type=kind, architecture=report["architecture"],
                       tokenizer_equal=list(llama_ids) == ids,
                       prompt_logits_max_diff=float(np.abs(want_logits - got_logits).max()),
                       greedy_equal=want == got, agreeing_prefix=agree, min_top2_gap=gap, zenlm=want, llama_cpp=got)
            if kind != "f32":  # rounding makes near-ties fall either way: compare on one path, zenlm's
                row.update(on_zenlms_path(model if kind == "f32" else load_gguf(path), path, ids, want))
            rows.append(row)
    by_type = {kind: all(r["greedy_equal"] for r in rows if r["type"] == kind) for kind in types}
    return {"tokenizer_equal": all(r["tokenizer_equal"] for r in rows), "greedy_equal": by_type.get("f32", True),
            "greedy_equal_by_type": by_type, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--types", default="f32,f16,q8_0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None, help="folder for the .gguf files (default: a temporary one)")
    args = parser.parse_args(argv)
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not importable: pip install llama-cpp-python (builds llama.cpp, ~20 min on 2 cores)")
        return 2
    from zenlm.cpu import cpu_info

    print(cpu_info().describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = check(Path(args.out or tmp), args.tokens, tuple(args.types.split(",")), tuple(args.variants.split(",")))
    print(f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, {args.tokens} greedy tokens; "
          f"ggml: {llamacpp_build()}")
    print(f"{'variant':<13} {'type':<5} {'arch':<6} {'tok ids':<7} {'greedy':<6} {'agree':>5} "
          f"{'max|dlogit|':>11} {'min gap':>8}  on zenlm's path: agree, max|dlogit|, gaps where they differ")
    for r in result["rows"]:
        path = (f"  {r['path_agree']:>5} {r['path_logits_max_diff']:>11.2e} "
                f"{' '.join(f'{g:.3f}' for g in r['gaps_where_they_differ'])}" if "path_agree" in r else "")
        print(f"{r['variant']:<13} {r['type']:<5} {r['architecture']:<6} {str(r['tokenizer_equal']):<7} "
              f"{str(r['greedy_equal']):<6} {r['agreeing_prefix']:>5} {r['prompt_logits_max_diff']:>11.2e} "
              f"{r['min_top2_gap']:>8.3f}" + path + (f"  {r['error']}" if r.get("error") else ""))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0 if result["tokenizer_equal"] and result["greedy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
