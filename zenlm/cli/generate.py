"""`zenlm generate`, `translate`, `chat`, and `evaluate translation|chat`: running a model on text
(the README's tour and "Applications")."""
from __future__ import annotations

import sys
from typing import Optional


def load_app_model(path: str, adapter: Optional[str] = None):
    """The model folder (with a LoRA adapter on it, if given) and its tokenizer; a missing folder is
    one FileNotFoundError naming it."""
    import os

    from ..folders import load_tokenizer
    from ..lora import load_with_adapter

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model folder at {path}")
    return load_with_adapter(path, adapter), load_tokenizer(path)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model folder, streamed to the terminal",
                       description="zenlm generate MODEL --prompt TEXT [options]; greedy unless --temperature > 0 "
                                   "(sampling) or --num-beams > 1")
    p.add_argument("model", help="a model folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 64")
    p.add_argument("--min-new-tokens", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 0")
    p.add_argument("--temperature", type=float, default=None, help="> 0 samples; 0 or unset decodes greedily")
    p.add_argument("--top-k", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 0")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 1.0")
    p.add_argument("--min-p", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 0.0")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 1.0")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 0")
    p.add_argument("--num-beams", type=int, default=None, help="default: the model's own (an imported generation_config.json) or 1")
    p.add_argument("--length-penalty", type=float, default=None, help="default: the model's own (an imported generation_config.json) or 1.0")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); not printed")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--truncate", action="store_true", help="cut a prompt longer than the context window")
    p.add_argument("--compile", action="store_true",
                   help="decode through a captured step (torch.compile over a fixed-shape cache; batch 1, decoder-only): "
                        "the first run compiles (tens of seconds, then cached on disk), later ones decode faster")
    p.set_defaults(func=run_generate)


def run_generate(args) -> None:
    import os

    from ..folders import load, load_tokenizer
    from ..generation import Generator

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no model folder at {args.model}")
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    # options not given on the command line fall back to the model's defaults (an imported Hugging
    # Face folder's generation_config.json: beams, lengths, banned words), then to zenlm's
    given = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, top_k=args.top_k,
                 top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                 no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
                 length_penalty=args.length_penalty)
    options = {k: v for k, v in given.items() if v is not None}
    options.update(stop_strings=args.stop, seed=args.seed, truncate=args.truncate, compile=args.compile)
    if args.temperature is not None:
        options.update(do_sample=args.temperature != 0, temperature=args.temperature if args.temperature else 1.0)
    generator = Generator(model, tokenizer)
    if options.get("num_beams", generator.defaults.num_beams) > 1:
        print(generator.generate(args.prompt, **options)[0].text)
        return
    stream = generator.stream(args.prompt, **options)
    for delta in stream:
        print(delta, end="", flush=True)
    print()


def _translation_options(p) -> None:
    p.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy); default 4")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 2 x source length + 10")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--source-lang", default=None, help="checked against the pair the model records")
    p.add_argument("--target-lang", default=None, help="checked against the pair the model records")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to load onto the model")
    p.add_argument("--threads", type=int, default=None)


def _translation_kwargs(args) -> dict:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return dict(beam=args.beam, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                length_penalty=args.length_penalty, source_lang=args.source_lang, target_lang=args.target_lang)


def add_translate(sub) -> None:
    p = sub.add_parser("translate", help="translate text or a file with a translation model (beam search)",
                       description='zenlm translate MODEL "text" ... | --input FILE --output FILE')
    p.add_argument("model", help="a model folder (encoder-decoder, or decoder-only trained on pairs)")
    p.add_argument("text", nargs="*", help="sentences to translate (one output line each)")
    p.add_argument("--input", default=None, help="a file, one sentence per line")
    p.add_argument("--output", default=None, help="where --input's translations go (written when all are done)")
    _translation_options(p)
    p.set_defaults(func=run_translate)


def run_translate(args) -> None:
    from ..tasks.translate import translate, translate_file

    if bool(args.text) == bool(args.input):
        raise ValueError("give either sentences to translate or --input FILE (with --output FILE)")
    if args.input and not args.output:
        raise ValueError("--input needs --output FILE")
    if args.output and not args.input:
        raise ValueError("--output needs --input FILE")
    model, tokenizer = load_app_model(args.model, args.adapter)
    options = _translation_kwargs(args)
    if args.input:
        n = translate_file(model, tokenizer, args.input, args.output, progress=True, **options)
        print(f"translated {n} lines -> {args.output}", file=sys.stderr)
        return
    for line in translate(model, tokenizer, args.text, **options):
        print(line)


def add_evaluate_translation(esub) -> None:
    t = esub.add_parser("translation", help="sacrebleu BLEU and chrF of a model on a test set",
                        description="zenlm evaluate translation MODEL --src FILE --ref FILE")
    t.add_argument("model", help="a model folder")
    t.add_argument("--src", required=True, help="source sentences, one per line (.gz read too)")
    t.add_argument("--ref", required=True, help="reference translations, line-aligned with --src")
    t.add_argument("--tokenize", default=None, help="sacrebleu tokenizer; default zh for Chinese output, else 13a")
    t.add_argument("--output", default=None, help="also write the translations here")
    t.add_argument("--limit", type=int, default=None, help="only the first N lines")
    t.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _translation_options(t)
    t.set_defaults(func=run_evaluate_translation)


def run_evaluate_translation(args) -> None:
    import json
    import time

    from ..tasks.translate import evaluate_translation_files, format_scores

    model, tokenizer = load_app_model(args.model, args.adapter)
    start = time.perf_counter()
    result = evaluate_translation_files(model, tokenizer, args.src, args.ref, output_path=args.output, tokenize=args.tokenize,
                            limit=args.limit, progress=not args.json, **_translation_kwargs(args))
    result.pop("hypotheses")
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(result))
        return
    print(format_scores(result))


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="an interactive chat with a model in the terminal (streams replies)",
                       description="zenlm chat MODEL; commands: /reset, /system TEXT, /exit")
    p.add_argument("model", help="a model folder (decoder-only or encoder-decoder) with the chat role tokens")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to load onto the model")
    p.set_defaults(func=run_chat)


def run_chat(args) -> None:
    from ..tasks.chat import ChatSession, run_terminal

    model, tokenizer = load_app_model(args.model, args.adapter)
    options = dict(do_sample=args.temperature > 0, temperature=max(args.temperature, 0.0), top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)
    session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens, options=options)
    run_terminal(session)


def add_evaluate_chat(esub) -> None:
    c = esub.add_parser("chat", help="perplexity of a model on the assistant replies of a chat JSONL file")
    c.add_argument("model", help="a model folder")
    c.add_argument("--data", required=True, help="chat JSONL ({'messages': [...]} per line)")
    c.add_argument("--adapter", default=None, help="a LoRA adapter folder to load onto the model")
    c.add_argument("--batch-size", type=int, default=16)
    c.set_defaults(func=run_evaluate_chat)


def run_evaluate_chat(args) -> None:
    import json

    from ..tasks.chat import chat_perplexity

    model, tokenizer = load_app_model(args.model, args.adapter)
    print(json.dumps(chat_perplexity(model, tokenizer, args.data, args.batch_size)))
