"""Machine translation over ``zenlm.generation``: batched beam search, files, and sacrebleu scores.

A sentence is encoded exactly as the ``seq2seq`` objective encodes training pairs
(its tokens, then ``</s>``), so the model sees at inference what it learned from.
Sentences are sorted by length into batches (less padding), translated with beam
search (4 beams by default) and returned in the input order.

A model trained by a translation recipe records its language pair in
``config.extra`` (``source_lang`` / ``target_lang``); asking it for another pair,
or handing it a file whose name says another language (``test.de`` as the
source of an en→de model), is an error rather than a silent garbage translation.
Scores are sacrebleu's corpus BLEU and chrF, printed with their signatures;
Chinese output is scored with sacrebleu's ``zh`` tokenizer.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..tokenizer import Tokenizer
from .prepare import read_lines, read_parallel


# --------------------------------------------------------------------------- language pair
def language_pair(model) -> tuple[str, str] | None:
    """(source, target) recorded in the model's config, or None when it records none."""
    extra = getattr(model.config, "extra", None) or {}
    src, tgt = extra.get("source_lang"), extra.get("target_lang")
    return (str(src), str(tgt)) if src and tgt else None


def check_pair(model, source_lang: str | None = None, target_lang: str | None = None) -> tuple[str, str] | None:
    """Refuse a language pair the model was not trained for (when it records its pair)."""
    pair = language_pair(model)
    if pair is None:
        return None
    for asked, have, side in ((source_lang, pair[0], "source"), (target_lang, pair[1], "target")):
        if asked is not None and asked != have:
            raise ValueError(f"this model translates {pair[0]}->{pair[1]}; it was not trained for {side} language "
                             f"{asked!r} ({source_lang or pair[0]}->{target_lang or pair[1]})")
    return pair


# ISO 639-1 codes: only a suffix from this list is read as a language (``notes.md``, ``a.py`` are not)
ISO_639_1 = set(["aa", "ab", "ae", "af", "ak", "am", "an", "ar", "as", "av", "ay", "az", "ba", "be", "bg", "bh", "bi", "bm", "bn", "bo", "br", "bs", "ca", "ce", "ch", "co", "cr", "cs", "cu", "cv", "cy", "da", "de", "dv", "dz", "ee", "el", "en", "eo", "es", "et", "eu", "fa", "ff", "fi", "fj", "fo", "fr", "fy", "ga", "gd", "gl", "gn", "gu", "gv", "ha", "he", "hi", "ho", "hr", "ht", "hu", "hy", "hz", "ia", "id", "ie", "ig", "ii", "ik", "io", "is", "it", "iu", "ja", "jv", "ka", "kg", "ki", "kj", "kk", "kl", "km", "kn", "ko", "kr", "ks", "ku", "kv", "kw", "ky", "la", "lb", "lg", "li", "ln", "lo", "lt", "lu", "lv", "mg", "mh", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "na", "nb", "nd", "ne", "ng", "nl", "nn", "no", "nr", "nv", "ny", "oc", "oj", "om", "or", "os", "pa", "pi", "pl", "ps", "pt", "qu", "rm", "rn", "ro", "ru", "rw", "sa", "sc", "sd", "se", "sg", "si", "sk", "sl", "sm", "sn", "so", "sq", "sr", "ss", "st", "su", "sv", "sw", "ta", "te", "tg", "th", "ti", "tk", "tl", "tn", "to", "tr", "ts", "tt", "tw", "ty", "ug", "uk", "ur", "uz", "ve", "vi", "vo", "wa", "wo", "xh", "yi", "yo", "za", "zh", "zu"]) - {"ts"}  # .ts is TypeScript far more often than Tsonga


def file_language(path: os.PathLike) -> str | None:
    """The language a file's suffix names (``test.de`` → ``de``, ``dev.zh.txt`` → ``zh``), if any.

    Only ISO 639-1 codes count, so ``.md`` or ``.py`` never trigger the language check."""
    for suffix in reversed(Path(path).suffixes):
        code = suffix[1:].lower()
        if code in ("txt", "gz", "tsv", "raw", "tok"):
            continue
        return code if code in ISO_639_1 else None
    return None


# --------------------------------------------------------------------------- translating
def translate(model, tokenizer: Tokenizer, texts: Sequence[str], beam: int = 4, batch_size: int = 32,
              max_new_tokens: int | None = None, length_penalty: float = 1.0, progress: bool = False,
              source_lang: str | None = None, target_lang: str | None = None, **options) -> list[str]:
    """Translate each text; returns translations in the input order. Blank texts translate to "".

    ``max_new_tokens`` defaults per batch to 2 × the longest source + 10 (within the window)."""
    from ..generation import Generator

    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings; for one sentence pass [text]")
    if not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an integer >= 1, got {beam!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_pair(model, source_lang, target_lang)
    config = model.config
    if config.family == "encoder-only":
        raise ValueError("an encoder-only model cannot translate; use an encoder-decoder (or decoder-only) model")
    eos = tokenizer.eos_id
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i} must be a str, got {type(text).__name__}")
        rows.append(tokenizer.encode(" ".join(text.split())) + ([eos] if eos is not None else []) if text.strip()
                    else None)
    window = config.max_position_embeddings
    for i, r in enumerate(rows):
        limit = window if config.is_encoder_decoder else window - 1
        if r is not None and len(r) > limit:
            raise ValueError(f"text {i} is {len(r)} tokens, longer than the model's context window of {window}")
    order = sorted((i for i, r in enumerate(rows) if r is not None), key=lambda i: -len(rows[i]))
    out = [""] * len(texts)
    generator = Generator(model, tokenizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="translate", unit="sent", dynamic_ncols=True)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            longest = max(len(rows[i]) for i in chunk)
            room = window - 1 if config.is_encoder_decoder else window - longest
            new = max_new_tokens or 2 * longest + 10
            new = max(1, min(new, room))
            result = generator.generate([rows[i] for i in chunk], num_beams=beam, max_new_tokens=new,
                                        length_penalty=length_penalty, **options)
            for i, gen in zip(chunk, result.generations):
                out[i] = gen.text.strip()
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out


def translate_file(model, tokenizer: Tokenizer, input_path: os.PathLike, output_path: os.PathLike,
                   **options) -> int:
    """Translate a file line by line into ``output_path``, written atomically only when every
    line is done (so a failure leaves no half-written output). Returns the line count."""
    from ..checkpoint import atomic_write

    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {output_path.parent} does not exist")
    if output_path.resolve() == Path(input_path).resolve():
        raise ValueError(f"--output {output_path} is the input file; write the translation elsewhere")
    _check_file_language(model, input_path, "source")
    lines = read_lines(input_path)
    hyps = translate(model, tokenizer, lines, **options)
    text = "".join(h + "\n" for h in hyps)
    atomic_write(output_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return len(hyps)


def _check_file_language(model, path: os.PathLike, side: str) -> None:
    pair, lang = language_pair(model), file_language(path)
    if pair is None or lang is None:
        return
    want = pair[0] if side == "source" else pair[1]
    if lang != want:
        raise ValueError(f"this model translates {pair[0]}->{pair[1]}, but the {side} file {path} is named as "
                         f"{lang!r}; pass a {want} file (or rename it if the suffix is not a language code)")


# --------------------------------------------------------------------------- scoring
def score(hypotheses: Sequence[str], references: Sequence[str], target_lang: str | None = None,
          tokenize: str | None = None) -> dict:
    """sacrebleu corpus BLEU and chrF with their signatures. ``tokenize`` defaults to ``zh``
    for Chinese output and sacrebleu's ``13a`` otherwise."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    tokenize = tokenize or ("zh" if target_lang == "zh" else "13a")
    bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": b.score, "chrf": c.score, "bleu_text": str(b), "chrf_text": str(c),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
            "sentences": len(hypotheses)}


def evaluate_translation_files(model, tokenizer: Tokenizer, src_path: os.PathLike, ref_path: os.PathLike,
                   output_path: os.PathLike | None = None, tokenize: str | None = None,
                   limit: int | None = None, **options) -> dict:
    """Translate ``src_path`` and score it against ``ref_path`` (line-aligned)."""
    from ..checkpoint import atomic_write

    _check_file_language(model, src_path, "source")
    _check_file_language(model, ref_path, "target")
    if output_path is not None and not Path(output_path).parent.is_dir():
        raise FileNotFoundError(f"output folder {Path(output_path).parent} does not exist")
    sources, refs = read_parallel(src_path, ref_path)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        sources, refs = sources[:limit], refs[:limit]
    pair = language_pair(model)
    hyps = translate(model, tokenizer, sources, **options)
    result = score(hyps, refs, target_lang=pair[1] if pair else None, tokenize=tokenize)
    if output_path is not None:
        text = "".join(h + "\n" for h in hyps)
        atomic_write(output_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    result["hypotheses"] = hyps
    return result


def format_scores(result: dict) -> str:
    """``zenlm evaluate translation``'s text: BLEU and chrF (``score``/``evaluate_translation_files``) each with
    its sacrebleu signature, then the sentence count (and the seconds, when ``result`` has them)."""
    took = f" in {result['seconds']}s" if "seconds" in result else ""
    return "\n".join([result["bleu_text"], f"BLEU signature: {result['bleu_signature']}", result["chrf_text"],
                      f"chrF signature: {result['chrf_signature']}", f"{result['sentences']} sentences{took}"])


__all__ = ["check_pair", "evaluate_translation_files", "file_language", "format_scores", "language_pair", "score", "translate",
           "translate_file"]
