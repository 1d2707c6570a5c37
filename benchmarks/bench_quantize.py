"""Quantization in one run: size on disk, tokens/s, validation perplexity and agreement with fp32 of
int8 (weight-only), dynamic int8 (integer matmuls) and int4 (weight-only, groups of 32, Q4_0 rounding),
beside llama.cpp's Q8_0/Q4_0 numerics emulated on the same model.

    .venv/bin/python benchmarks/bench_quantize.py MODEL_DIR [--threads 1]
    .venv/bin/python benchmarks/bench_quantize.py --decode smollm-135m   # + transformers fp32, batch-1 decode
    .venv/bin/python benchmarks/bench_quantize.py --rows                 # kernel vs dequantize+GEMM, native + AVX2

    .venv/bin/python benchmarks/bench_quantize.py --isas [--isa-preset gpt2-small]
    .venv/bin/python benchmarks/bench_quantize.py MODEL_DIR --llamacpp  # + llama.cpp's own llama-perplexity

--llamacpp: the model exported to GGUF by zenlm (f32, q8_0) and quantized by ``llama-quantize --pure``
(q4_0 everywhere, head too: zenlm int4's groups of 32), scored by llama.cpp's ``llama-perplexity`` on
the validation text with a context of the model's max_position_embeddings, beside zenlm fp32 / int8 /
int4 scored with llama-perplexity's own protocol (``llamacpp_protocol_perplexity``), so each row
compares like with like. The token ids llama.cpp scores are read back from its --kl-divergence-base
file and compared with zenlm's. The model's tokenizer must map to GGUF (byte-level BPE, e.g.
recipes/causal-decoder.yaml; a char tokenizer does not), else the section says why it is skipped.

--isas: dynamic int8 on this CPU as it is and with the AVX2 kernels forced (fbgemm without
VNNI, ATen at AVX2; each in its own process), in one run: relative error of the logits
against fp32, top-1 agreement and speed, for the activation width zenlm picks per CPU and
for full 8-bit activations everywhere (what zenlm did before: silently wrong without VNNI).

MODEL_DIR: a decoder-only zenlm checkpoint trained on tinyshakespeare (e.g. the best folder of
`zenlm train recipes/shakespeare-char.yaml`). Validation text: the last 10% of
../shared/data/tinyshakespeare/input.txt (the split the trainer holds out), scored in
non-overlapping windows of the model's context. Speed: prompt processing (batch 8 x context)
and greedy decoding (batch 1, 64 new tokens), best of 3, same threads for every variant.
"""
import argparse
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import zenlm
from zenlm.quantize import quantize_model

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, max_windows: int) -> float:
    n = min((len(ids) - 1) // window, max_windows)
    rows = torch.stack([ids[i * window:(i + 1) * window + 1] for i in range(n)])
    total, count = 0.0, 0
    for batch in rows.split(32):
        loss = model(batch, labels=batch).loss
        total += float(loss) * batch.numel() - float(loss) * batch.size(0)
        count += batch.numel() - batch.size(0)
    return math.exp(total / count)


@torch.no_grad()
def speed(model, vocab: int, window: int, reps: int = 3, new_tokens: int = 48) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (8, window), generator=gen)
    best_fwd = best_dec = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        model(prompt)
        best_fwd = min(best_fwd, time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(prompt[0, :8].tolist(), max_new_tokens=new_tokens, eos_token_id=[])
        best_dec = min(best_dec, time.perf_counter() - t)
    return prompt.numel() / best_fwd, new_tokens / best_dec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", help="a decoder-only checkpoint (omit to run only --translation / --also-preset)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=400)
    p.add_argument("--also-preset", default=None,
                   help="also time a random-weight model of this preset shape (size and speed only)")
    p.add_argument("--translation", default=None, help="also a translation model folder: BLEU per variant")
    p.add_argument("--src", help="source sentences for --translation (one per line)")
    p.add_argument("--ref", help="reference translations for --translation")
    p.add_argument("--limit", type=int, default=200, help="sentences to translate for BLEU")
    p.add_argument("--isas", action="store_true", help="dynamic int8 error and speed, native vs AVX2 forced")
    p.add_argument("--isa-preset", default="gpt2-small", help="model shape for --isas (a preset; random weights)")
    p.add_argument("--isa-worker", choices=("native", "avx2"), help=argparse.SUPPRESS)
    p.add_argument("--rows", action="store_true",
                   help="weight-only int8/int4: integer kernel vs dequantize + fp32 GEMM per row count, native and AVX2")
    p.add_argument("--rows-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--decode", default=None, metavar="SHAPE",
                   help="decode tokens/s at batch 1 of zenlm fp32/int8/int4/dynamic and transformers fp32 on an "
                        "open model's shape with random weights (bench_open_models.SHAPES, e.g. smollm-135m)")
    p.add_argument("--reps", type=int, default=3, help="--decode: alternating repeats (best of)")
    p.add_argument("--new", type=int, default=64, help="--decode: greedy tokens per run")
    p.add_argument("--llamacpp", action="store_true",
                   help="with MODEL_DIR: llama.cpp's llama-perplexity on the model's GGUF f32/Q8_0/Q4_0 beside zenlm "
                        "fp32/int8/int4 scored with the same protocol")
    args = p.parse_args()
    from zenlm.cpu import cpu_info
    print(cpu_info().describe(), flush=True)  # first: a ratio is only compared within one CPU
    if args.isa_worker:
        return isa_worker(args)
    torch.set_num_threads(args.threads)
    if args.rows_worker:
        return rows_worker()
    if args.isas:
        isa_table(args)
    if args.rows:
        rows_table(args)
    if args.decode:
        decode_table(args)
    if args.translation:
        bleu_table(args)
    if args.model and args.llamacpp:
        llamacpp_table(args)
    elif args.model:
        lm_table(args)
    if args.also_preset:
        preset_table(args)


def lm_table(args) -> None:
    fp32 = zenlm.load(args.model)
    tok = zenlm.load_tokenizer(args.model)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    valid = torch.tensor(tok.encode(text[int(len(text) * 0.9):]))
    window = fp32.config.max_position_embeddings - 1
    print(f"model {args.model}: {fp32.num_parameters():,} parameters, context {window}; "
          f"{args.threads} thread(s); validation {len(valid):,} tokens (<= {args.max_windows} windows)")
    rows, agree = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("fp32", "int8", "dynamic", "int4"):
            model = fp32 if scheme == "fp32" else quantize_model(fp32, scheme)
            folder = Path(tmp) / scheme
            model.save_pretrained(folder)
            loaded = zenlm.load(folder)  # measure what comes back from disk
            size = os.path.getsize(folder / "model.safetensors")
            ppl = perplexity(loaded, valid, window, args.max_windows)
            fwd, dec = speed(loaded, fp32.config.vocab_size, window)
            rows.append((scheme, size, ppl, fwd, dec))
            agree[scheme] = agreement(loaded, fp32, valid, window)
    table(rows)
    new = agree["fp32"][2]
    print(f"\nagreement with fp32: greedy = share of {new} greedy tokens equal to fp32's, position by position, "
          f"after 8-token prompts from 16 places in the validation text (the context holds {window + 1}); "
          f"top-1 = argmax equal to fp32's under teacher forcing, 50 validation windows")
    for scheme, (greedy, top1, _) in agree.items():
        print(f"{scheme:<9} greedy {greedy:.3f}  top-1 {top1:.4f}")
    print("\nllama.cpp's numerics on the same model, emulated: every matrix (the tied head too, as --pure) "
          "rounded by the gguf package's Q8_0 / Q4_0, each matmul's input rounded to Q8_0 blocks (ggml's vec_dot "
          "type for both)")
    for qtype in ("Q8_0", "Q4_0"):
        model = llamacpp_numerics(fp32, qtype)
        ppl = perplexity(model, valid, window, args.max_windows)
        greedy, top1, _ = agreement(model, fp32, valid, window)
        print(f"{qtype:<9} val ppl {ppl:.3f} ({ppl - rows[0][2]:+.3f})  greedy {greedy:.3f}  top-1 {top1:.4f}")


@torch.no_grad()
def llamacpp_protocol_perplexity(model, ids: Sequence[int], n_ctx: int, bos: Optional[int]) -> tuple[float, int, int]:
    """Perplexity as llama.cpp's ``llama-perplexity`` computes it (tools/perplexity/perplexity.cpp,
    ``perplexity()``, no --ppl-stride): the text's ids with a BOS in front when the vocabulary adds one
    (``bos``; None: it does not), cut into ``len // n_ctx`` chunks of ``n_ctx`` (the tail dropped), each
    chunk's first token replaced by BOS (when added), evaluated from an empty cache, and only the second
    half scored: the logits at positions n_ctx//2 .. n_ctx-2 against the next token, n_ctx - 1 - n_ctx//2
    per chunk. Returns (ppl, chunks, tokens scored)."""
    tokens = ([bos] if bos is not None else []) + [int(i) for i in ids]
    chunks, first = len(tokens) // n_ctx, n_ctx // 2
    if len(tokens) < 2 * n_ctx:  # llama-perplexity refuses such a text too
        raise ValueError(f"{len(tokens)} tokens: llama-perplexity needs at least 2 * n_ctx = {2 * n_ctx}")
    rows = torch.tensor(tokens[:chunks * n_ctx]).view(chunks, n_ctx)
    if bos is not None:
        rows[:, 0] = bos
    nll, count = 0.0, 0
    for batch in rows.split(16):
        logp = torch.log_softmax(model(batch).logits[:, first:n_ctx - 1].float(), -1)
        nll -= float(logp.gather(-1, batch[:, first + 1:, None]).double().sum())  # llama.cpp sums in double
        count += batch.size(0) * (n_ctx - 1 - first)
    return math.exp(nll / count), chunks, count


def _gguf_add_bos(path: Path) -> tuple[Optional[int], bool]:
    """(tokenizer.ggml.bos_token_id, tokenizer.ggml.add_bos_token) of a GGUF: what llama.cpp reads."""
    import gguf

    from zenlm.gguf import read_metadata

    meta = read_metadata(gguf.GGUFReader(str(path)))
    return meta.get("tokenizer.ggml.bos_token_id"), bool(meta.get("tokenizer.ggml.add_bos_token"))


def _llamacpp_scored(gguf_file: Path, text_file: Path, n_ctx: int, threads: int,
                     tmp: Path) -> tuple[list[int], dict]:
    """llama-perplexity's result on the file and the ids it scored (its tokenization of the text, BOS
    included, cut to whole chunks), read from the header of the --kl-divergence-base file the same run
    writes: "_logits_", n_ctx, n_vocab, n_chunk (int32), then n_chunk * n_ctx int32 ids."""
    import struct

    from llamacpp_peer import perplexity

    out = tmp / "base.logits"
    result = perplexity(gguf_file, text_file, ctx=n_ctx, threads=threads, extra=["--kl-divergence-base", out])
    with open(out, "rb") as f:
        magic, (ctx, _vocab, chunks) = f.read(8), struct.unpack("<3i", f.read(12))
        if magic != b"_logits_" or ctx != n_ctx:
            raise RuntimeError(f"{out}: not a llama-perplexity logits file of n_ctx {n_ctx} ({magic!r}, {ctx})")
        ids = list(struct.unpack(f"<{chunks * n_ctx}i", f.read(4 * chunks * n_ctx)))
    out.unlink()  # n_chunk * n_ctx * n_vocab * 2 bytes of log-probabilities follow: not kept
    return ids, result


def llamacpp_table(args) -> None:
    """zenlm fp32/int8/int4 against llama.cpp's llama-perplexity on GGUF F32/Q8_0/Q4_0 of the same model,
    one protocol (llama-perplexity's) on both sides."""
    import datetime
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamacpp_peer import find_llamacpp, missing, perplexity as llamacpp_perplexity, quantize

    from zenlm.gguf import export_gguf

    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"\nllama.cpp's llama-perplexity vs zenlm, same protocol; {now:%Y-%m-%d %H:%M} UTC")
    if (why := missing("llama-perplexity", "llama-quantize")):
        print(why)
        return
    fp32 = zenlm.load(args.model)
    tok = zenlm.load_tokenizer(args.model)
    n_ctx = fp32.config.max_position_embeddings
    text = SHAKESPEARE.read_text(encoding="utf-8")
    valid_text = text[int(len(text) * 0.9):]
    ours = tok.encode(valid_text)
    found = find_llamacpp()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-llamacpp-") as tmp:
        tmp = Path(tmp)
        text_file = tmp / "valid.txt"
        text_file.write_text(valid_text, encoding="utf-8")
        files, made_by = {}, {}
        try:
            for kind in ("f32", "q8_0"):
                files[kind] = tmp / f"model-{kind}.gguf"
                export_gguf(fp32, tok, files[kind], type=kind)
                made_by[kind] = "zenlm export_gguf"
        except ValueError as e:
            print(f"skipped: the model's tokenizer or architecture does not go into GGUF ({e}); train one with a "
                  f"byte-level BPE tokenizer, e.g. recipes/causal-decoder.yaml")
            return
        files["q4_0"] = Path(quantize(files["f32"], tmp / "model-q4_0.gguf", "Q4_0", threads=args.threads,
                                      pure=True)["path"])
        made_by["q4_0"] = "llama-quantize --pure (from f32)"
        sizes = {kind: path.stat().st_size for kind, path in files.items()}
        bos_id, add_bos = _gguf_add_bos(files["f32"])
        bos = bos_id if add_bos else None
        theirs, f32_result = _llamacpp_scored(files["f32"], text_file, n_ctx, args.threads, tmp)
        expected = (([bos] if bos is not None else []) + ours)[:len(theirs)]
        differ = [i for i, (a, b) in enumerate(zip(theirs, expected)) if a != b]
        print(f"model {args.model}: {fp32.num_parameters():,} parameters, n_ctx {n_ctx} (max_position_embeddings); "
              f"llama.cpp {found['version']} ({found['root']}/bin), {args.threads} thread(s)")
        print(f"validation: last 10% of {SHAKESPEARE.name}, {len(valid_text):,} characters, {len(ours):,} zenlm tokens; "
              f"BOS {'prepended, id ' + str(bos) if bos is not None else 'not added'} (tokenizer.ggml.add_bos_token="
              f"{str(add_bos).lower()})")
        print(f"tokenization: llama.cpp scored {len(theirs):,} ids ({len(theirs) // n_ctx} chunks); "
              + ("identical to zenlm's" if not differ else
                 f"{len(differ)} differ from zenlm's, first at {differ[0]}: llama.cpp {theirs[differ[0]]}, "
                 f"zenlm {expected[differ[0]]}: the rows below do not compare like with like"))
        if len(expected) < len(theirs):
            print(f"tokenization: zenlm has only {len(expected):,} ids where llama.cpp scored {len(theirs):,}")
        theirs_ppl = {kind: f32_result if kind == "f32" else
                      llamacpp_perplexity(path, text_file, ctx=n_ctx, threads=args.threads)
                      for kind, path in files.items()}
    rows = []
    for scheme, kind in (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0")):
        model = fp32 if scheme == "fp32" else quantize_model(fp32, scheme)
        ppl, chunks, count = llamacpp_protocol_perplexity(model, ours, n_ctx, bos)
        rows.append((scheme, ppl, kind.upper(), theirs_ppl[kind]["ppl"], theirs_ppl[kind]["ppl_err"]))
    print(f"protocol (llama-perplexity's): {chunks} chunks of {n_ctx} tokens, each from an empty cache"
          f"{' with its first token replaced by BOS' if bos is not None else ''}, only the second half scored "
          f"({count:,} tokens); zenlm int4 = groups of 32 with Q4_0 rounding; GGUF files: "
          + ", ".join(f"{k.upper()} {made_by[k]} {sizes[k] / 1024:,.0f} K" for k in files))
    print(f"{'variant':<8} {'zenlm ppl':>10} {'Δ own fp32':>11}   {'llama.cpp':<9} {'ppl':>9} {'± err':>7} "
          f"{'Δ own f32':>10} {'llama.cpp - zenlm':>18}")
    for scheme, ppl, kind, theirs, err in rows:
        print(f"{scheme:<8} {ppl:>10.4f} {ppl - rows[0][1]:>+11.4f}   {kind:<9} {theirs:>9.4f} "
              f"{err if err is not None else float('nan'):>7.4f} {theirs - rows[0][3]:>+10.4f} {theirs - ppl:>+18.4f}")
    print("± err: llama-perplexity's standard error of one estimate; the rows score the same tokens, so their "
          "differences are far better resolved than that")
    print("llama.cpp's numerics emulated in torch (weights through gguf.quants, matmul inputs rounded to Q8_0), "
          "same protocol:")
    for qtype, theirs in (("Q8_0", rows[1][3]), ("Q4_0", rows[2][3])):
        ppl, _, _ = llamacpp_protocol_perplexity(llamacpp_numerics(fp32, qtype), ours, n_ctx, bos)
        print(f"{qtype + ' emu':<8} {ppl:>10.4f} {ppl - rows[0][1]:>+11.4f}   {qtype:<9} {theirs:>9.4f} "
              f"{'':>7} {'':>10} {theirs - ppl:>+18.4f}")


def _q8_0_input(x: torch.Tensor) -> torch.Tensor:
    """x rounded as ggml quantizes a matmul's input to Q8_0: blocks of 32, fp16 scale max|x| / 127."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127  # quantized with the fp32 scale, stored as fp16 (gguf.quants)
    q = torch.round(blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d))
    return (q * d.half().float()).reshape(x.shape).to(x.dtype)


def llamacpp_numerics(fp32, qtype: str):
    """A copy of ``fp32`` computing as llama.cpp's CPU backend does at ``qtype`` (weights through
    gguf.quants, inputs through Q8_0), in float: for quality only, not speed."""
    import copy

    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    model = copy.deepcopy(fp32)

    def roundtrip(w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.detach().float().numpy(), kind), kind)
                                ).reshape(w.shape).float()

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = roundtrip(m.weight)
            m.register_forward_pre_hook(lambda mod, inputs: (_q8_0_input(inputs[0]), *inputs[1:]))
    model.embed_tokens.weight.data = roundtrip(model.embed_tokens.weight)
    head = model.logits
    model.logits = lambda hidden: head(_q8_0_input(hidden))
    return model


@torch.no_grad()
def agreement(model, fp32, ids: torch.Tensor, window: int, places: int = 16, prompt: int = 8
              ) -> tuple[float, float, int]:
    """(greedy tokens equal to fp32's, teacher-forced top-1 agreement, tokens generated per prompt)."""
    new = min(64, window + 1 - prompt)
    same = 0
    for start in torch.linspace(0, len(ids) - prompt - 1, places).long().tolist():
        p = ids[start:start + prompt].tolist()
        a = list(model.generate(p, max_new_tokens=new, eos_token_id=[]))[-new:]
        b = list(fp32.generate(p, max_new_tokens=new, eos_token_id=[]))[-new:]
        same += sum(x == y for x, y in zip(a, b))
    rows = torch.stack([ids[i * window:(i + 1) * window] for i in range(min(50, len(ids) // window))])
    top1 = float((model(rows).logits.argmax(-1) == fp32(rows).logits.argmax(-1)).float().mean())
    return same / (places * new), top1, new


def preset_table(args) -> None:
    torch.manual_seed(0)
    big = zenlm.TransformerLM(zenlm.TransformerConfig.from_preset(args.also_preset)).eval()
    print(f"\n{args.also_preset} shape, random weights ({big.num_parameters():,} parameters): size and speed "
          f"only (perplexity of random weights means nothing); prompt batch 8 x 64, decode 16 tokens, 1 rep")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("fp32", "int8", "dynamic", "int4"):
            model = big if scheme == "fp32" else quantize_model(big, scheme)
            model.save_pretrained(Path(tmp) / scheme)
            size = os.path.getsize(Path(tmp) / scheme / "model.safetensors")
            fwd, dec = speed(model, big.config.vocab_size, 64, reps=1, new_tokens=16)
            rows.append((scheme, size, float("nan"), fwd, dec))
            print(f"  {scheme}: {size / 2**20:.1f} MiB, prompt {fwd:,.0f} tok/s, decode {dec:.2f} tok/s", flush=True)
            del model
    table(rows)


def bleu_table(args) -> None:
    """BLEU (sacrebleu, via zenlm.tasks.translate.evaluate_translation_files) of each variant, greedy decoding."""
    from zenlm.tasks.translate import evaluate_translation_files

    fp32, tok = zenlm.load(args.translation), zenlm.load_tokenizer(args.translation)
    print(f"translation model {args.translation}: {fp32.num_parameters():,} parameters; "
          f"{args.limit} sentences of {args.src}, greedy")
    base = None
    for scheme in ("fp32", "int8", "dynamic", "int4"):
        model = fp32 if scheme == "fp32" else quantize_model(fp32, scheme)
        t = time.perf_counter()
        r = evaluate_translation_files(model, tok, args.src, args.ref, limit=args.limit, beam=1)
        seconds = time.perf_counter() - t
        base = base if base is not None else r["bleu"]
        print(f"{scheme:<9} BLEU {r['bleu']:6.2f} ({r['bleu'] - base:+.2f})  {seconds:6.1f} s  {r['bleu_signature']}")
    print()


FORCED_AVX2 = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def isa_table(args) -> None:
    """One worker process per ISA (the forcing switches are read when torch starts)."""
    import json
    import subprocess
    import sys

    rows = {}
    for isa in ("native", "avx2"):
        env = {**os.environ, **(FORCED_AVX2 if isa == "avx2" else {})}
        out = subprocess.run([sys.executable, __file__, "--isa-worker", isa, "--isa-preset", args.isa_preset,
                              "--threads", str(args.threads)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the {isa} worker failed:\n{out.stderr[-2000:]}")
        print(out.stdout.splitlines()[0])  # the worker's CPU line
        rows[isa] = json.loads(out.stdout.splitlines()[-1])
    print(f"\ndynamic int8, {args.isa_preset} shape, random weights, {args.threads} thread(s); error = |logits - fp32| / "
          f"|fp32| on 4 x 64 tokens; top-1 = argmax agreement with fp32")
    print(f"{'ISA':<8} {'activations':>11} {'rel. error':>10} {'top-1':>6} {'prompt tok/s':>13} {'decode tok/s':>13} "
          f"{'8-bit everywhere: error':>24} {'fp32 prompt':>12} {'fp32 decode':>12}")
    for isa, r in rows.items():
        print(f"{isa:<8} {r['bits']:>9}-bit {r['error']:>10.4f} {r['top1']:>6.3f} {r['prompt']:>13,.0f} "
              f"{r['decode']:>13,.1f} {r['error_8bit']:>24.4f} {r['fp32_prompt']:>12,.0f} {r['fp32_decode']:>12,.1f}")


def isa_worker(args) -> None:
    import json

    import zenlm.quantize
    from zenlm.cpu import cpu_info

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = zenlm.TransformerLM(zenlm.TransformerConfig.from_preset(args.isa_preset)).eval()
    ids = torch.randint(3, fp32.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp32(ids).logits

        def measure(model):
            logits = model(ids).logits
            return (float((logits - ref).norm() / ref.norm()),
                    float((logits.argmax(-1) == ref.argmax(-1)).float().mean()))

        dynamic = quantize_model(fp32, "dynamic")
        error, top1 = measure(dynamic)
        info = cpu_info()
        # what zenlm did before choosing per CPU: 8-bit activations whatever the CPU has
        eight = dataclasses.replace(info, vnni=True, arch="x86_64")
        zenlm.quantize.cpu_info = lambda: eight
        for m in dynamic.modules():
            m.__dict__.pop("_packed_key", None)
        error_8bit, _ = measure(dynamic)
        zenlm.quantize.cpu_info = lambda: info
        prompt, decode = speed(dynamic, fp32.config.vocab_size, 64, reps=2, new_tokens=32)
        fp32_prompt, fp32_decode = speed(fp32, fp32.config.vocab_size, 64, reps=2, new_tokens=32)
    print(json.dumps({"bits": info.int8_activation_bits, "error": error, "top1": top1, "error_8bit": error_8bit,
                      "prompt": prompt, "decode": decode, "fp32_prompt": fp32_prompt, "fp32_decode": fp32_decode}))


SMOLLM_LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, out, gate+up, down


def rows_table(args) -> None:
    """The same sweep in one process per ISA (the forcing switches are read when torch starts)."""
    import subprocess
    import sys

    for isa in ("native", "avx2"):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               **(dict(FORCED_AVX2, MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2") if isa == "avx2" else {})}
        out = subprocess.run([sys.executable, __file__, "--rows-worker", "--threads", str(args.threads)], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the {isa} worker failed:\n{out.stderr[-2000:]}")
        print(out.stdout)


def rows_worker() -> None:
    """ms per SmolLM-135M layer (its four matrices) by rows: the integer kernel, dequantize + fp32 GEMM,
    and the fp32 layer itself; alternated in one process, best of 5. Sets ``zenlm.quantize.kernel_rows``."""
    from zenlm.quantize import QuantizationSpec, QuantizedLinear, kernel_rows

    torch.manual_seed(0)
    fp = [torch.nn.Linear(i, o, bias=False) for i, o in SMOLLM_LAYER]
    print(f"{torch.get_num_threads()} thread(s); ms per SmolLM-135M layer (4 matrices); load average "
          f"{os.getloadavg()[0]:.1f}")
    for scheme, group in (("int8", None), ("int4", 32)):
        mods = [QuantizedLinear.from_linear(f, QuantizationSpec(scheme, group)) for f in fp]
        print(f"{scheme}: zenlm takes the kernel up to {kernel_rows(mods[0].spec.bits)} rows on this CPU")
        print(f"{'rows':>5} {'kernel':>8} {'dequant+GEMM':>13} {'fp32':>8}")
        for rows in (1, 4, 8, 16, 24, 32, 48, 64, 128):
            xs = [torch.randn(rows, i) for i, _ in SMOLLM_LAYER]

            def run(limit, mods=mods, xs=xs):
                for m, x in zip(mods, xs):
                    m.kernel_rows = limit
                    m(x)
            sides = {"kernel": lambda: run(10**9), "dequant": lambda: run(0),
                     "fp32": lambda: [f(x) for f, x in zip(fp, xs)]}
            best = dict.fromkeys(sides, float("inf"))
            with torch.no_grad():
                for _ in range(5):
                    for name, fn in sides.items():
                        fn()
                        t = time.perf_counter()
                        for _ in range(3):
                            fn()
                        best[name] = min(best[name], (time.perf_counter() - t) / 3 * 1e3)
            print(f"{rows:>5} {best['kernel']:>8.2f} {best['dequant']:>13.2f} {best['fp32']:>8.2f}", flush=True)


def decode_table(args) -> None:
    """Batch-1 greedy decoding, 32-token prompt, ``--new`` tokens, every side alternated in this one
    process (best of ``--reps``); 512-token prompt processing once per side; agreement = the share of
    the ``--new`` greedy tokens equal to zenlm fp32's (random weights: nearly tied logits, a harsh test)."""
    import transformers

    from bench_open_models import SHAPES, prompt_ids, write_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.decode
        count = write_folder(args.decode, folder)
        fp32 = zenlm.load(folder, dtype=torch.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sides = {"zenlm fp32": fp32, "zenlm int8": quantize_model(fp32, "int8"),
             "zenlm int4 (g32)": quantize_model(fp32, "int4"), "zenlm dynamic": quantize_model(fp32, "dynamic"),
             "transformers fp32": hf}
    vocab = fp32.config.vocab_size
    prompt = prompt_ids(vocab, 32)
    long_prompt = torch.tensor([prompt_ids(vocab, 512)])
    print(f"{args.decode} shape ({count:,} parameters, {SHAPES[args.decode][2]['num_hidden_layers']} layers), random "
          f"weights; {torch.get_num_threads()} thread(s); prompt 32, {args.new} greedy tokens, best of {args.reps}, "
          f"sides alternated; quantized heads included (tied table); load average {os.getloadavg()[0]:.1f}")

    @torch.inference_mode()
    def run(name, model):
        start = time.perf_counter()
        if name.startswith("transformers"):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.new, min_new_tokens=args.new,
                                 do_sample=False)[0, -args.new:].tolist()
        else:
            out = list(model.generate(prompt, max_new_tokens=args.new, eos_token_id=[]))[-args.new:]
        return time.perf_counter() - start, out

    best, tokens = dict.fromkeys(sides, float("inf")), {}
    for name, model in sides.items():
        run(name, model)  # warm-up: kernels, packing, allocator
    for _ in range(args.reps):
        for name, model in sides.items():
            seconds, tokens[name] = run(name, model)
            best[name] = min(best[name], seconds)
    prefill = {}
    with torch.inference_mode():
        for name, model in sides.items():
            start = time.perf_counter()
            model(long_prompt)
            prefill[name] = 512 / (time.perf_counter() - start)
    base, ref = args.new / best["zenlm fp32"], tokens["zenlm fp32"]
    print(f"{'side':<20} {'decode tok/s':>12} {'x zenlm fp32':>12} {'agreement':>10} {'prompt 512 tok/s':>17}")
    for name in sides:
        tps = args.new / best[name]
        agree = sum(a == b for a, b in zip(tokens[name], ref)) / args.new
        print(f"{name:<20} {tps:>12.1f} {tps / base:>12.2f} {agree:>10.3f} {prefill[name]:>17.0f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def table(rows) -> None:
    base = rows[0]
    print(f"{'variant':<9} {'size':>10} {'x smaller':>9} {'val ppl':>8} {'Δppl':>7} {'prompt tok/s':>13} "
          f"{'x fp32':>7} {'decode tok/s':>13} {'x fp32':>7}")
    for scheme, size, ppl, fwd, dec in rows:
        print(f"{scheme:<9} {size / 1024:>8.0f} K {base[1] / size:>9.2f} {ppl:>8.3f} {ppl - base[2]:>+7.3f} "
              f"{fwd:>13,.0f} {fwd / base[3]:>7.2f} {dec:>13,.1f} {dec / base[4]:>7.2f}")


if __name__ == "__main__":
    main()
