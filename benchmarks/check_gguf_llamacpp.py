"""The real consumer: llama.cpp loads zenlm's GGUF files and computes what zenlm computes.

For each variant (a tiny random model of each architecture zenlm exports, and the rotary scalings
it writes) the script exports model.gguf with zenlm, loads it with llama.cpp (llama-cpp-python)
and compares, on a prompt tokenized by both sides:

* the token ids of the prompt (llama.cpp's tokenizer from tokenizer.ggml.* vs zenlm's);
* the prompt's logits (max |difference|);
* greedy decoding for --tokens tokens: zenlm's argmax of a full forward each step vs llama.cpp's
  argmax of its own logits each step. The smallest top-1/top-2 gap zenlm saw is printed too, so
  a disagreement can be told from a near-tie.

At f32 the greedy tokens must be equal; f16 and q8_0 are reported (agreeing tokens, logit error).

Needs ``pip install llama-cpp-python`` (compiles llama.cpp: ~20 minutes on 2 cores). Then:

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
from zenlm.gguf import export_gguf

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


# llama.cpp runs in its own process: loaded beside torch in one process, its OpenMP/ggml runtime
# crashed (segmentation fault on the first eval, llama-cpp-python 0.3.36, torch 2.13)
_WORKER = """
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, ids, n, prompt = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False, seed=0)
llm.reset()
llm.eval(ids)
prompt_logits = np.array(llm.scores[:len(ids)], dtype=np.float32).tolist()
out = []
for _ in range(n):
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(nxt)
    llm.eval([nxt])
tokenized = list(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
print(json.dumps({"version": llama_cpp.__version__, "greedy": out, "prompt_logits": prompt_logits,
                  "tokenized": tokenized}))
"""


def llamacpp_greedy(path: Path, ids: list[int], n: int, prompt: str = PROMPT) -> dict:
    """llama.cpp's tokenization of ``prompt``, its prompt logits and ``n`` greedy tokens, from a worker process."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _WORKER, str(path), json.dumps(ids), str(n), prompt],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"llama.cpp could not run {path.name} (exit {proc.returncode}): {proc.stderr[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["prompt_logits"] = np.array(result["prompt_logits"], dtype=np.float32)
    return result


def check(out_dir: Path, tokens: int = 32, types=("f32",), variants=tuple(VARIANTS)) -> dict:
    out_dir = Path(out_dir)
    tok = Tokenizer.train(TEXTS, vocab_size=320)
    ids = tok.encode(PROMPT)
    rows = []
    for name in variants:
        model = tiny(tok, **VARIANTS[name])
        want, gap, want_logits = zenlm_greedy(model, ids, tokens)
        for kind in types:
            path = out_dir / f"{name}-{kind}.gguf"
            report = export_gguf(model, tok, path, type=kind)
            try:
                ran = llamacpp_greedy(path, ids, tokens)
            except RuntimeError as e:  # a file llama.cpp refuses is a row of the report, not a crash
                rows.append(dict(variant=name, type=kind, architecture=report["architecture"], tokenizer_equal=False,
                                 prompt_logits_max_diff=float("nan"), greedy_equal=False, agreeing_prefix=0,
                                 min_top2_gap=gap, zenlm=want, llama_cpp=None, error=str(e).splitlines()[0]))
                continue
            got, got_logits, llama_ids = ran["greedy"], ran["prompt_logits"], ran["tokenized"]
            agree = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
            rows.append(dict(variant=name, type=kind, architecture=report["architecture"],
                             tokenizer_equal=list(llama_ids) == ids,
                             prompt_logits_max_diff=float(np.abs(want_logits - got_logits).max()),
                             greedy_equal=want == got, agreeing_prefix=agree, min_top2_gap=gap,
                             zenlm=want, llama_cpp=got))
    f32 = [r for r in rows if r["type"] == "f32"]
    return {"tokenizer_equal": all(r["tokenizer_equal"] for r in rows),
            "greedy_equal": all(r["greedy_equal"] for r in f32), "rows": rows}


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
    with tempfile.TemporaryDirectory() as tmp:
        result = check(Path(args.out or tmp), args.tokens, tuple(args.types.split(",")), tuple(args.variants.split(",")))
    from zenlm.cpu import cpu_info

    print(cpu_info().describe())
    print(f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, {args.tokens} greedy tokens")
    print(f"{'variant':<13} {'type':<5} {'arch':<6} {'tok ids':<7} {'greedy':<6} {'agree':>5} "
          f"{'max|dlogit|':>11} {'min gap':>8}")
    for r in result["rows"]:
        print(f"{r['variant']:<13} {r['type']:<5} {r['architecture']:<6} {str(r['tokenizer_equal']):<7} "
              f"{str(r['greedy_equal']):<6} {r['agreeing_prefix']:>5} {r['prompt_logits_max_diff']:>11.2e} "
              f"{r['min_top2_gap']:>8.3f}" + (f"  {r['error']}" if r.get("error") else ""))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0 if result["tokenizer_equal"] and result["greedy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
