"""zenlm vs Hugging Face BART on the seed-base shape: forward latency and training throughput.

Both models are built locally with random weights and the identical shape and flavour
(vocab 10000, d 768, ffn 3072, 8 heads, 6+6 layers, 512 positions, post-LN, GELU,
learned positions with BART's offset of 2, embedding LayerNorm, tied output
projection plus a logits bias, no dropout), zenlm's weights are copied into the HF
model and the outputs compared, so both sides do the same arithmetic. Then, in one
process and on the same threads, it measures

* forward latency of the backbone (``TransformerModel`` vs ``BartModel``) on a
  (1, 512) source and a (1, 512) target, under ``torch.inference_mode``;
* training throughput of the LM (``TransformerLM`` vs ``BartForConditionalGeneration``):
  forward + cross-entropy + backward + AdamW step on 8x128 source and 8x128 target
  tokens; tokens/s counts source + target tokens;

in fp32 and under bf16 autocast, and prints the zenlm/HF ratios and MFU against the
machine's matmul peak measured here (fp32 through torch's default MKL path and through
oneDNN, bf16). FLOPs count encoder parameters against source tokens and decoder
parameters (with the output projection) against target tokens, plus the attention
products. It also prints the fp32-vs-bf16 loss difference on a fixed batch.

The two models are timed alternately (zenlm step, HF step, ...) and the median is
reported, so load from other processes on a shared machine hits both sides alike.

    python benchmarks/bench_model.py                  # everything, 2 threads
    python benchmarks/bench_model.py --quick          # fewer repetitions
    python benchmarks/bench_model.py --no-fast-cpu    # zenlm without zenlm.fast_cpu()
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import zenlm
from zenlm import TransformerConfig, TransformerLM

SEQ_FORWARD = 512
BATCH, SEQ_TRAIN = 8, 128


# --------------------------------------------------------------------------- models
def zen_config() -> TransformerConfig:
    """seed-base's shape with BART's flavour, so the work matches BartModel's exactly."""
    return TransformerConfig.from_preset(
        "seed-base", pre_norm=False, activation="gelu", position="learned", position_offset=2,
        embedding_norm=True, final_norm=False, tie_word_embeddings=True, lm_head_bias=True,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)


def hf_config(c: TransformerConfig):
    from transformers import BartConfig

    return BartConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, encoder_layers=c.num_encoder_layers,
        decoder_layers=c.num_decoder_layers, encoder_attention_heads=c.num_attention_heads,
        decoder_attention_heads=c.num_attention_heads, encoder_ffn_dim=c.intermediate_size,
        decoder_ffn_dim=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        scale_embedding=False, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, decoder_start_token_id=c.start_token_id, tie_word_embeddings=True,
        attn_implementation="sdpa")


def hf_state_dict(zen: TransformerLM, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """zenlm weights under BART's names (fused q|k|v and k|v split apart)."""
    c, sd, out = zen.config, zen.state_dict(), {}
    d = c.hidden_size
    out[prefix + "shared.weight"] = sd["embed_tokens.weight"]
    for stack in ("encoder", "decoder"):
        p, z = f"{prefix}{stack}.", f"{stack}."
        out[p + "embed_tokens.weight"] = sd["embed_tokens.weight"]
        out[p + "embed_positions.weight"] = sd[z + "positions.weight"]
        for s in ("weight", "bias"):
            out[p + f"layernorm_embedding.{s}"] = sd[z + f"embed_norm.{s}"]
        n_layers = c.num_encoder_layers if stack == "encoder" else c.num_decoder_layers
        for i in range(n_layers):
            hp, zp = f"{p}layers.{i}.", f"{z}layers.{i}."
            for s in ("weight", "bias"):
                q, k, v = sd[zp + f"attn.qkv.{s}"].split(d)
                out[hp + f"self_attn.q_proj.{s}"], out[hp + f"self_attn.k_proj.{s}"] = q, k
                out[hp + f"self_attn.v_proj.{s}"] = v
                out[hp + f"self_attn.out_proj.{s}"] = sd[zp + f"attn.out.{s}"]
                out[hp + f"self_attn_layer_norm.{s}"] = sd[zp + f"attn_norm.{s}"]
                out[hp + f"fc1.{s}"] = sd[zp + f"mlp.fc_in.{s}"]
                out[hp + f"fc2.{s}"] = sd[zp + f"mlp.fc_out.{s}"]
                out[hp + f"final_layer_norm.{s}"] = sd[zp + f"mlp_norm.{s}"]
                if stack == "decoder":
                    k, v = sd[zp + f"cross_attn.kv.{s}"].split(d)
                    out[hp + f"encoder_attn.q_proj.{s}"] = sd[zp + f"cross_attn.q.{s}"]
                    out[hp + f"encoder_attn.k_proj.{s}"], out[hp + f"encoder_attn.v_proj.{s}"] = k, v
                    out[hp + f"encoder_attn.out_proj.{s}"] = sd[zp + f"cross_attn.out.{s}"]
                    out[hp + f"encoder_attn_layer_norm.{s}"] = sd[zp + f"cross_norm.{s}"]
    if prefix:
        out["lm_head.weight"] = sd["embed_tokens.weight"]
        out["final_logits_bias"] = sd["lm_head_bias"][None]
    return {k: v.clone() for k, v in out.items()}


def build_models(seed: int = 0):
    from transformers import BartForConditionalGeneration

    config = zen_config()
    torch.manual_seed(seed)
    zen = TransformerLM(config)
    with torch.no_grad():  # a non-zero logits bias so the copy is really checked
        zen.lm_head_bias.normal_(0.0, 0.02)
    hf = BartForConditionalGeneration(hf_config(config))
    missing, unexpected = hf.load_state_dict(hf_state_dict(zen), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight copy incomplete: missing {missing}, unexpected {unexpected}")
    return zen, hf


# --------------------------------------------------------------------------- FLOPs
def flops_per_step(config: TransformerConfig, batch: int, src: int, tgt: int, training: bool,
                   logits: bool) -> float:
    """Matmul FLOPs: 2 per weight per token forward (encoder weights x source tokens,
    decoder weights and the output projection x target tokens) plus QK^T and AV
    (2*2*T*S*d per layer); training is 3x forward."""
    d, ffn = config.hidden_size, config.intermediate_size
    enc_w = config.num_encoder_layers * (4 * d * d + 2 * d * ffn)
    dec_w = config.num_decoder_layers * (8 * d * d + 2 * d * ffn) + (config.vocab_size * d if logits else 0)
    attn = 4 * d * (config.num_encoder_layers * src * src + config.num_decoder_layers * (tgt * tgt + tgt * src))
    forward = batch * (2 * enc_w * src + 2 * dec_w * tgt + attn)
    return 3 * forward if training else forward


# --------------------------------------------------------------------------- timing
def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def measure_peaks(reps: int) -> dict[str, float]:
    """Best GFLOP/s of large square-ish matmuls on each path (best over a few shapes)."""
    shapes = [(1024, 768, 3072), (1024, 3072, 768), (2048, 2048, 2048)]
    peaks = {"fp32 (torch default / MKL)": 0.0, "fp32 (oneDNN)": 0.0, "bf16 (oneDNN)": 0.0}
    for m, k, n in shapes:
        x, w = torch.randn(m, k), torch.randn(n, k)
        xb, wb = x.bfloat16(), w.bfloat16()
        paths = {
            "fp32 (torch default / MKL)": lambda x=x, w=w: torch.mm(x, w.t()),
            "fp32 (oneDNN)": lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
            "bf16 (oneDNN)": lambda xb=xb, wb=wb: torch.mm(xb, wb.t()),
        }
        for name, fn in paths.items():
            fn()
            best = min(_time(fn) for _ in range(reps))
            peaks[name] = max(peaks[name], 2 * m * k * n / best / 1e9)
    return peaks


# --------------------------------------------------------------------------- workloads
def make_batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (BATCH, SEQ_TRAIN), generator=g)
    labels = torch.randint(3, vocab, (BATCH, SEQ_TRAIN), generator=g)
    dec = torch.cat([torch.full((BATCH, 1), 2), labels[:, :-1]], dim=1)
    return src, dec, labels


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def zen_loss(model, src, dec, labels):
    return model(src, dec, labels=labels).loss


def hf_loss(model, src, dec, labels):
    return model(input_ids=src, decoder_input_ids=dec, labels=labels, use_cache=False).loss


def train_step_fn(model, loss_fn, batch, bf16: bool, fused: bool, fast: bool | None = None):
    """One AdamW step; ``fast`` sets zenlm.fast_cpu() for the duration (None: leave as is)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)

    def step():
        previous = zenlm.kernels._FAST_CPU["enabled"]
        if fast is not None:
            zenlm.fast_cpu(fast)
        try:
            opt.zero_grad(set_to_none=True)
            with autocast(bf16):
                loss = loss_fn(model, *batch)
            loss.backward()
            opt.step()
        finally:
            zenlm.fast_cpu(previous)
    return step


def forward_fns(zen, hf, bf16: bool, fast: bool, compiled=None):
    """Forward closures: zenlm (``compiled``: a torch.compile'd ``TransformerModel.forward``, else eager), HF, plain."""
    src = torch.randint(3, zen.config.vocab_size, (1, SEQ_FORWARD), generator=torch.Generator().manual_seed(2))
    dec = torch.randint(3, zen.config.vocab_size, (1, SEQ_FORWARD), generator=torch.Generator().manual_seed(3))
    backbone = hf.model  # BartModel

    def zen_fwd(fast=fast):
        previous = zenlm.kernels._FAST_CPU["enabled"]
        zenlm.fast_cpu(fast)
        try:
            with torch.inference_mode(), autocast(bf16):
                (compiled or zenlm.TransformerModel.forward)(zen, src, dec)
        finally:
            zenlm.fast_cpu(previous)

    def hf_fwd():
        with torch.inference_mode(), autocast(bf16):
            backbone(input_ids=src, decoder_input_ids=dec, use_cache=False)
    return zen_fwd, hf_fwd, lambda: zen_fwd(False)


def timed_compile(fn):
    """Run ``fn`` once so torch.compile traces and compiles it, print how long that took, return ``fn``."""
    start = time.perf_counter()
    fn()
    print(f"  (torch.compile: first call {time.perf_counter() - start:.1f} s, not counted)", flush=True)
    return fn


def check_parity(zen, hf) -> float:
    """Max |logits difference| between the two models on the training batch (fp32)."""
    src, dec, _ = make_batch(zen.config.vocab_size)
    with torch.inference_mode():
        a = zen(src, dec).logits
        b = hf(input_ids=src, decoder_input_ids=dec, use_cache=False).logits
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (noisier)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    ap.add_argument("--no-fast-cpu", action="store_true", help="time zenlm without zenlm.fast_cpu()")
    ap.add_argument("--plain", action="store_true",
                    help="also time zenlm without fast_cpu() (to see what the oneDNN route brings)")
    ap.add_argument("--optimizer", choices=("fused", "default"), default="fused",
                    help="AdamW implementation, the same for both models (fused: torch's fused CPU kernel, "
                         "what zenlm's trainer uses; default: torch's per-tensor loop)")
    ap.add_argument("--compile", action="store_true",
                    help="also time zenlm under torch.compile (inductor; what TrainConfig.compile does), "
                         "compilation excluded from the timings")
    ap.add_argument("--only", choices=("forward", "train"), default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    args = ap.parse_args(argv)
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU

    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    fast = zenlm.fast_cpu(not args.no_fast_cpu)
    zenlm.fast_cpu(False)
    print(f"zenlm fast_cpu(): {'on' if fast else 'off'}; AdamW: {args.optimizer} (both models)")

    peaks = measure_peaks(reps=3 if args.quick else 6)
    for name, gflops in peaks.items():
        print(f"peak matmul {name:28s} {gflops:7.1f} GFLOP/s")
    peak = {False: max(peaks["fp32 (torch default / MKL)"], peaks["fp32 (oneDNN)"]), True: peaks["bf16 (oneDNN)"]}

    zen, hf = build_models()
    import transformers

    print(f"transformers {transformers.__version__}; parameters zenlm {zen.num_parameters():,} "
          f"HF {sum(p.numel() for p in hf.parameters()):,}")
    print(f"parity: max |logits zenlm - HF| = {check_parity(zen, hf):.2e} (fp32, same weights)")

    src, dec, labels = make_batch(zen.config.vocab_size)
    zenlm.fast_cpu(fast)  # zenlm's loss on the path that is timed
    with torch.no_grad():
        losses = {}
        for bf16 in (False, True):
            with autocast(bf16):
                losses[bf16] = (float(zen_loss(zen, src, dec, labels)), float(hf_loss(hf, src, dec, labels)))
    zenlm.fast_cpu(False)
    print(f"loss on a fixed batch: zenlm fp32 {losses[False][0]:.6f} bf16 {losses[True][0]:.6f} "
          f"(|diff| {abs(losses[False][0] - losses[True][0]):.2e}); "
          f"HF fp32 {losses[False][1]:.6f} bf16 {losses[True][1]:.6f} "
          f"(|diff| {abs(losses[False][1] - losses[True][1]):.2e})")

    precisions = {"fp32": [False], "bf16": [True], "both": [False, True]}[args.precision]
    tokens = 2 * BATCH * SEQ_TRAIN
    extra = f" {'plain':>10s} {'plain/HF':>9s}" if args.plain else ""
    extra += f" {'compiled':>10s} {'comp/HF':>9s}" if args.compile else ""
    print(f"\n{'measurement':50s} {'zenlm':>10s} {'HF BART':>10s} {'zenlm/HF':>9s} {'MFU zenlm':>10s} {'MFU HF':>8s}"
          + extra, flush=True)

    def show(seconds: float, is_train: bool) -> str:
        return f"{tokens / seconds:,.0f}" if is_train else f"{seconds:.3f}"

    def report(name: str, t: dict, unit: str, flops: float, pk: float, is_train: bool) -> None:
        mfu = {k: flops / v / 1e9 / pk for k, v in t.items()}
        line = (f"{name + ' (' + unit + ')':50s} {show(t['zenlm'], is_train):>10s} {show(t['hf'], is_train):>10s} "
                f"{t['hf'] / t['zenlm']:8.2f}x {mfu['zenlm']:9.1%} {mfu['hf']:7.1%}")
        for key in ("zenlm plain", "zenlm compiled"):
            if key in t:
                line += f" {show(t[key], is_train):>10s} {t['hf'] / t[key]:8.2f}x"
        print(line, flush=True)

    for bf16 in precisions:
        label = "bf16 autocast" if bf16 else "fp32"
        if args.only in (None, "forward"):
            zf, hfwd, plain = forward_fns(zen, hf, bf16, fast)
            fns = {"zenlm": zf, "hf": hfwd, **({"zenlm plain": plain} if args.plain else {})}
            if args.compile:
                fns["zenlm compiled"] = timed_compile(forward_fns(zen, hf, bf16, fast,
                                                                  torch.compile(zenlm.TransformerModel.forward))[0])
            t = alternate(fns, warmup=2, reps=reps)
            flops = flops_per_step(zen.config, 1, SEQ_FORWARD, SEQ_FORWARD, training=False, logits=False)
            report(f"forward latency (1,512)+(1,512) {label}", t, "s", flops, peak[bf16], False)
        if args.only in (None, "train"):
            batch = make_batch(zen.config.vocab_size)
            zen.train(), hf.train()
            fused = args.optimizer == "fused"
            fns = {"zenlm": train_step_fn(zen, zen_loss, batch, bf16, fused, fast),
                   "hf": train_step_fn(hf, hf_loss, batch, bf16, fused)}
            if args.plain:
                fns["zenlm plain"] = train_step_fn(zen, zen_loss, batch, bf16, fused, False)
            if args.compile:
                fns["zenlm compiled"] = timed_compile(
                    train_step_fn(zen, torch.compile(zen_loss), batch, bf16, fused, fast))
            t = alternate(fns, warmup=2, reps=max(3, reps - 2))
            del fns  # free the optimizer states before the next measurement
            zen.eval(), hf.eval()
            flops = flops_per_step(zen.config, BATCH, SEQ_TRAIN, SEQ_TRAIN, training=True, logits=True)
            report(f"training step 8x128+8x128 AdamW {label}", t, "tok/s", flops, peak[bf16], True)

    print("\nratio = HF time / zenlm time (>1: zenlm faster); MFU against the best measured peak of the "
          "precision used (fp32: max of MKL and oneDNN paths).")


if __name__ == "__main__":
    main()
