"""`zenlm info`, `average`, `convert`, `quantize`: a model's shape and costs, and folders in and out
(the README's "A tour of the CLI" and "Smaller ... models"). The tables are the library's:
``zenlm.estimate.cost_summary`` and ``zenlm.kernels.system_summary``."""
from __future__ import annotations


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and memory of a preset or checkpoint folder; --system: this CPU")
    p.add_argument("model", nargs="?", default=None,
                   help="a preset name (see `zenlm info --list`), a checkpoint folder or a Hugging Face folder")
    p.add_argument("--system", action="store_true",
                   help="what this CPU has (ISA, VNNI, bf16, AMX, cores, caches) and the kernels zenlm picks for it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--bytes-per-param", type=int, default=4, choices=(2, 4))
    p.set_defaults(func=run_info)


def run_info(args) -> None:
    import os

    from ..config import PRESETS, TransformerConfig
    from ..estimate import cost_summary

    if args.system:
        from ..kernels import system_summary

        print(system_summary())
        if args.model is None:
            return
    if args.model is None:
        raise ValueError("give a preset or model folder, or --system")
    if args.model in PRESETS:
        config = TransformerConfig.from_preset(args.model)
    elif os.path.isdir(args.model):
        from ..hf import is_hf_folder, read_hf_config  # a Hugging Face folder reads as it imports

        config = read_hf_config(args.model) if is_hf_folder(args.model) else TransformerConfig.load(args.model)
    else:
        raise ValueError(f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.seq_len is not None and not 0 < args.seq_len <= config.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [1, {config.max_position_embeddings}], got {args.seq_len}")
    print(cost_summary(config, args.batch_size, args.seq_len, args.bytes_per_param, name=args.model))


def add_average(sub) -> None:
    p = sub.add_parser("average", help="average the weights of a run's last checkpoints into one model",
                       description="zenlm average CKPT CKPT [CKPT ...] --out DIR")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders of one run (e.g. OUT/checkpoints/step-*)")
    p.add_argument("--out", required=True, help="folder for the averaged model")
    p.set_defaults(func=run_average)


def run_average(args) -> None:
    import json

    from ..checkpoint import average_checkpoints

    print(json.dumps(average_checkpoints(args.checkpoints, args.out)))


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face folders in and out (BERT, GPT-2, BART, Marian, Llama)")
    csub = p.add_subparsers(dest="convert_command", required=True)
    f = csub.add_parser("from-hf", help="a local Hugging Face model folder -> a zenlm checkpoint folder")
    f.add_argument("src")
    f.add_argument("out")
    f.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: float32")
    f.set_defaults(func=run_convert_from_hf)
    t = csub.add_parser("to-hf", help="a zenlm checkpoint folder -> a folder transformers' from_pretrained loads")
    t.add_argument("src")
    t.add_argument("out")
    t.set_defaults(func=run_convert_to_hf)


def run_convert_from_hf(args) -> None:
    import torch

    from ..hf import convert_from_hf

    out = convert_from_hf(args.src, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"converted {args.src} -> {out} (zenlm checkpoint)")


def run_convert_to_hf(args) -> None:
    from ..hf import convert_to_hf

    out = convert_to_hf(args.src, args.out)
    print(f"converted {args.src} -> {out} (Hugging Face folder)")


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="store a model's weights as int8 or int4 (safetensors)",
                       description="zenlm quantize MODEL --int8|--int4|--dynamic OUT")
    p.add_argument("model", help="a model folder (zenlm or Hugging Face)")
    p.add_argument("out", help="folder for the quantized model")
    scheme = p.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--int8", dest="scheme", action="store_const", const="int8",
                        help="weight-only int8, one scale per output channel (~4x smaller; decodes through "
                             "torch's int8 kernel)")
    scheme.add_argument("--int4", dest="scheme", action="store_const", const="int4",
                        help="weight-only int4, one fp16 scale per group of 32 columns, rounded as llama.cpp's "
                             "Q4_0 (~7x smaller; decodes through torch's int4 kernel)")
    scheme.add_argument("--dynamic", dest="scheme", action="store_const", const="dynamic",
                        help="int8 weights and int8 activations at run time (integer matmuls; faster on CPU)")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per scale (int4 default 32; the int4 kernel takes 32, 64, 128 or 256)")
    p.add_argument("--keep-embeddings", action="store_true",
                   help="leave the token embedding table, and so a tied output head, in float")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> None:
    from ..estimate import human_bytes
    from ..folders import quantize_folder

    r = quantize_folder(args.model, args.out, args.scheme, args.group_size, not args.keep_embeddings)
    print(f"{r['scheme']}: {human_bytes(r['source_bytes'])} -> {human_bytes(r['quantized_bytes'])} "
          f"({r['ratio']:.2f}x smaller), written to {r['out']}")
    if r["scheme"] == "dynamic":
        from ..cpu import cpu_info

        bits = cpu_info().int8_activation_bits
        print(f"on this CPU the activations are quantized to {bits} bits at run time "
              + ("(VNNI)" if bits == 8 else "(no VNNI: 8-bit products would saturate)")
              + "; each CPU picks its own width when the model runs")


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model in another ecosystem's format (gguf: llama.cpp, Ollama)")
    esub = p.add_subparsers(dest="export_command", required=True)
    g = esub.add_parser("gguf", help="one GGUF file llama.cpp loads: weights, hyper-parameters, tokenizer, template",
                        description="zenlm export gguf MODEL OUT.gguf [--type f32|f16|q8_0]")
    g.add_argument("model", help="a zenlm or Hugging Face model folder (Llama, Qwen2/3, Phi-3, Mistral, Gemma 2/3, "
                                 "or a zenlm decoder those architectures express)")
    g.add_argument("out", help="the .gguf file to write")
    g.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16",
                   help="f32 (exact), f16 (default) or q8_0 (8-bit blocks of 32, as llama.cpp's Q8_0)")
    g.add_argument("--arch", default=None, help="llama.cpp architecture: llama, qwen2, qwen3, phi3, gemma, gemma2, "
                                                "gemma3 (default: chosen from the model's config)")
    g.add_argument("--ignore-sliding-window", action="store_true",
                   help="write a sliding-window model (Mistral) as llama.cpp's converter does: llama.cpp's llama graph "
                        "attends to every position, so it equals the model only within the window (Gemma 2/3 keep "
                        "their windows in the file)")
    g.set_defaults(func=run_export_gguf)


def run_export_gguf(args) -> None:
    import sys

    from ..folders import load
    from ..gguf import export_gguf

    model = load(args.model)  # a zenlm or HF folder; its tokenizer.json comes along as model.tokenizer
    r = export_gguf(model, None, args.out, type=args.type, arch=args.arch,
                    ignore_sliding_window=args.ignore_sliding_window)
    print(f"{r['path']}: {r['architecture']} {r['type']}, {r['bytes'] / 1e6:.1f} MB")
    for warning in r.get("warnings", ()):
        print(f"warning: {warning}", file=sys.stderr)
