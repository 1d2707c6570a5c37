"""Mixtures of experts and T5, random weights: zenlm vs transformers on prefill and greedy decoding.

Three Hugging Face folders written by transformers' own classes (random fp32 weights), loaded by both:

* Mixtral-shaped, small: hidden 512, 4 layers, 8 heads / 2 KV heads, 8 experts of width 1408, top-2;
* Qwen3-MoE-shaped, small: hidden 512, 4 layers, 8 / 2 heads (q/k norm), 16 experts of width 384, top-4
  renormalised;
* Flan-T5-small's shape: d_model 512, 8 + 8 layers, 6 heads of 64, gated-GELU MLP 1024, vocab 32128.

Prefill: one forward over a ``--prompt``-token batch-1 prompt (T5: the encoder over the source plus the
decoder's first step). Decode: ``--new`` greedy tokens (exactly that many: ``min_new_tokens``) through
each library's generate and KV cache, minus the prefill, as tokens/s. The two libraries alternate
``--rounds`` times in this one process and each keeps its best; with ``--threads 1`` the times are process
CPU time (robust to other processes sharing the machine), else wall time. "same tokens" says whether
zenlm's greedy continuation equals transformers'.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_moe_t5.py [--threads 1] [--prompt 128] [--new 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHAPES = {
    "mixtral-small": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=4096)),
    "qwen3-moe-small": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        intermediate_size=1536, moe_intermediate_size=384, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, vocab_size=32000, max_position_embeddings=4096)),
    "flan-t5-small": ("T5Config", "T5ForConditionalGeneration", dict(
        d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, vocab_size=32128, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
}
OFF = dict(forced_eos_token_id=None, forced_bos_token_id=None, bad_words_ids=(), renormalize_logits=False)


def timed(clock, fn):
    start = clock()
    out = fn()
    return clock() - start, out


def measure(name: str, folder: Path, args, clock) -> dict:
    import torch
    import transformers

    import zenlm
    from zenlm.generation import Generator

    config_class, model_class, _ = SHAPES[name]
    hf = getattr(transformers, model_class).from_pretrained(folder).eval()
    ours = zenlm.load(folder)
    seq2seq = ours.config.is_encoder_decoder
    prompt = torch.randint(3, 30000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    start = torch.tensor([[ours.config.start_token_id]])

    def prefill_hf():
        return hf(input_ids=prompt, decoder_input_ids=start) if seq2seq else hf(input_ids=prompt)

    def prefill_ours():
        return ours(prompt, start) if seq2seq else ours(prompt)

    def generate_hf():
        out = hf.generate(prompt, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                          pad_token_id=0, eos_token_id=1)
        return out[0, 1 if seq2seq else args.prompt:].tolist()

    def generate_ours():
        return Generator(ours).generate([prompt[0].tolist()], max_new_tokens=args.new, min_new_tokens=args.new,
                                        eos_token_id=1, **OFF)[0].token_ids

    best = {side: {"prefill": float("inf"), "generate": float("inf")} for side in ("zenlm", "transformers")}
    tokens = {}
    with torch.inference_mode():
        for side, (p, g) in (("zenlm", (prefill_ours, generate_ours)), ("transformers", (prefill_hf, generate_hf))):
            p(), g()  # warm-up
        for _ in range(args.rounds):
            for side, (p, g) in (("zenlm", (prefill_ours, generate_ours)), ("transformers", (prefill_hf, generate_hf))):
                best[side]["prefill"] = min(best[side]["prefill"], timed(clock, p)[0])
                seconds, tokens[side] = timed(clock, g)
                best[side]["generate"] = min(best[side]["generate"], seconds)
    out = {}
    for side, b in best.items():
        out[side] = dict(prefill_tok_s=args.prompt / b["prefill"],
                         decode_tok_s=(args.new - 1) / max(b["generate"] - b["prefill"], 1e-9))
    out["same"] = tokens["zenlm"] == tokens["transformers"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated shape names")
    args = ap.parse_args()
    from zenlm.kernels import system_summary
    print(system_summary(), flush=True)  # first: a ratio is only compared within one CPU

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"{'process CPU time' if clock is time.process_time else 'wall time'}, best of {args.rounds} alternating "
          f"rounds; prompt {args.prompt}, {args.new} new tokens; load average {os.getloadavg()[0]:.1f}")
    print(f"{'shape':<17}{'prefill zenlm':>14}{'HF':>9}{'ratio':>7}{'decode zenlm':>14}{'HF':>8}{'ratio':>7}"
          f"{'same tokens':>13}   (tokens/s)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config_class, model_class, config) in SHAPES.items():
            if args.only and name not in args.only.split(","):
                continue
            torch.manual_seed(0)
            folder = Path(tmp) / name
            getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).save_pretrained(folder)
            r = measure(name, folder, args, clock)
            z, h = r["zenlm"], r["transformers"]
            print(f"{name:<17}{z['prefill_tok_s']:>14.0f}{h['prefill_tok_s']:>9.0f}"
                  f"{z['prefill_tok_s'] / h['prefill_tok_s']:>7.2f}{z['decode_tok_s']:>14.1f}{h['decode_tok_s']:>8.1f}"
                  f"{z['decode_tok_s'] / h['decode_tok_s']:>7.2f}{'yes' if r['same'] else 'no':>13}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
