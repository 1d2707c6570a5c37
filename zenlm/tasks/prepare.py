"""Turn the shared data sets into the files the recipes train on.

The sources in ``../shared/data`` come in their publishers' layouts (gzipped
line-aligned files, TSV with attribution, ``__eou__``-separated dialogues, JSONL
poems); the trainer reads TSV pairs, chat JSONL and plain text. Each function
here reads one source in place and writes the derived files into an output
folder (never into the source), atomically, and returns what it wrote with counts.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path

from ..checkpoint import atomic_write

DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def read_lines(path: os.PathLike) -> list[str]:
    """Lines of a text file (``.gz`` read transparently), without newlines.

    A missing, unreadable, non-UTF-8 or empty file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{path} is not a readable UTF-8 text file: {e}") from None
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path} is empty (no non-blank lines)")
    return lines


def read_parallel(src: os.PathLike, tgt: os.PathLike) -> tuple[list[str], list[str]]:
    """Two line-aligned files; their line counts must match."""
    a, b = read_lines(src), read_lines(tgt)
    if len(a) != len(b):
        raise ValueError(f"line counts differ: {src} has {len(a)} lines, {tgt} has {len(b)}")
    return a, b


def _write_text(path: Path, lines: Iterable[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _tsv(pairs: Iterable[tuple[str, str]]) -> list[str]:
    clean = lambda s: " ".join(s.replace("\t", " ").split())
    return [f"{clean(a)}\t{clean(b)}" for a, b in pairs if a.strip() and b.strip()]


# --------------------------------------------------------------------------- translation
def multi30k(out: os.PathLike, src: str = "en", tgt: str = "de", root: Path = DATA_ROOT / "multi30k") -> dict:
    """Multi30k task 1: train.tsv / val.tsv pairs, and test_2016_flickr.{src,tgt} for evaluation."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        a, b = read_parallel(root / f"{split}.{src}.gz", root / f"{split}.{tgt}.gz")
        rows = _tsv(zip(a, b))
        _write_text(out / f"{split}.tsv", rows)
        counts[split] = len(rows)
    for split in ("val", "test_2016_flickr"):
        a, b = read_parallel(root / f"{split}.{src}.gz", root / f"{split}.{tgt}.gz")
        _write_text(out / f"{split}.{src}", a)
        _write_text(out / f"{split}.{tgt}", b)
        counts[f"{split}_eval"] = len(a)
    return counts


def tatoeba(out: os.PathLike, src: str = "en", tgt: str = "zh", root: Path = DATA_ROOT / "tatoeba-zh-en") -> dict:
    """Tatoeba en-zh (columns English, Chinese, attribution): train.tsv / dev.tsv in the asked
    direction, and dev.{src,tgt} for evaluation. (Tatoeba has no official split; the data
    README explains the 1,000 pairs held back elsewhere.)"""
    if {src, tgt} != {"en", "zh"}:
        raise ValueError(f"tatoeba-zh-en holds en and zh only, got {src}->{tgt}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "dev"):
        pairs = []
        for i, line in enumerate(read_lines(root / f"{split}.tsv")):
            cols = line.split("\t")
            if len(cols) < 2:
                raise ValueError(f"{root / f'{split}.tsv'} line {i + 1} has {len(cols)} column(s), expected 2 or 3")
            pairs.append({"en": cols[0], "zh": cols[1]})
        rows = _tsv([(p[src], p[tgt]) for p in pairs])
        _write_text(out / f"{split}.tsv", rows)
        counts[split] = len(rows)
        if split == "dev":
            _write_text(out / f"dev.{src}", [p[src] for p in pairs])
            _write_text(out / f"dev.{tgt}", [p[tgt] for p in pairs])
    return counts


# --------------------------------------------------------------------------- dialogue
def dialogue_turns(line: str) -> list[str]:
    """One DailyDialog line → its utterances (``__eou__``-separated, whitespace normalised)."""
    return [" ".join(u.split()) for u in line.split("__eou__") if u.strip()]


def dailydialog(out: os.PathLike, root: Path = DATA_ROOT / "dailydialog", system: str | None = None,
                extra_train: list[dict] | None = None) -> dict:
    """DailyDialog → chat JSONL (speakers alternate: user, assistant, ...).

    Validation/test dialogues that also occur in train are dropped (the published split
    shares 69 and 93 of them), and train's exact duplicates are kept once, so reported
    perplexities are on unseen dialogues. Licence: CC BY-NC-SA 4.0, non-commercial."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {s: read_lines(root / f"dialogues_{s}.txt.gz") for s in ("train", "validation", "test")}
    keyed = {s: [tuple(dialogue_turns(line)) for line in lines] for s, lines in splits.items()}
    seen: set = set()
    counts: dict = {}
    for split in ("train", "validation", "test"):
        kept = []
        for turns in keyed[split]:
            if len(turns) < 2 or turns in seen:
                continue
            if split == "train":
                seen.add(turns)
            kept.append(turns)
        counts[split] = len(kept)
        counts[f"{split}_dropped"] = len(keyed[split]) - len(kept)
        records = [_dialogue_record(t, system) for t in kept]
        if split == "train":  # the same dialogues as plain text, for pretraining the base model
            _write_text(out / "pretrain.txt", ("\n".join(t) + "\n" for t in kept))
        if split == "train" and extra_train:
            records += extra_train
            random.Random(0).shuffle(records)
            counts["train_extra"] = len(extra_train)
        _write_text(out / f"{split}.jsonl", (json.dumps(r, ensure_ascii=False) for r in records))
    return counts


def _dialogue_record(turns: tuple, system: str | None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def assistant_mix(tatoeba_root: Path = DATA_ROOT / "tatoeba-zh-en", poems_root: Path = DATA_ROOT / "tang-poems",
                  n_translate: int = 3000, n_poems: int = 2000, seed: int = 0) -> list[dict]:
    """Conversations built from the other sets: translation requests answered from Tatoeba's
    train split, and "write a poem titled ..." answered from the 全唐诗."""
    rng = random.Random(seed)
    rows = [line.split("\t") for line in read_lines(tatoeba_root / "train.tsv")]
    rows = [r for r in rows if len(r) >= 2]
    out = []
    for en, zh, *_ in rng.sample(rows, min(n_translate, len(rows))):
        if rng.random() < 0.5:
            ask, answer = f"Translate into Chinese: {en}", zh
        else:
            ask, answer = f"Translate into English: {zh}", en
        out.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]})
    poems = [p for p in read_poems(poems_root) if p["title"] and 2 <= len(p["paragraphs"]) <= 8]
    for p in rng.sample(poems, min(n_poems, len(poems))):
        out.append({"messages": [{"role": "user", "content": f"Write a poem titled {p['title']}."},
                                 {"role": "assistant", "content": "\n".join(p["paragraphs"])}]})
    return out


# --------------------------------------------------------------------------- poetry
def read_poems(root: Path = DATA_ROOT / "tang-poems") -> list[dict]:
    path = root / "quan-tang-shi.jsonl.gz"
    poems = []
    for i, line in enumerate(read_lines(path)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i + 1} is not valid JSON: {e}") from None
        poems.append({"title": str(record.get("title") or "").strip(),
                      "paragraphs": [p.strip() for p in record.get("paragraphs") or [] if p.strip()]})
    return poems


def poem_text(title: str, paragraphs: list[str]) -> str:
    """The layout the poetry model learns: title line, then one line per couplet half (句)."""
    lines = []
    for p in paragraphs:  # a paragraph is a couplet "AAAAA，BBBBB。": one line per half
        lines.extend(_split_couplet(p))
    return f"{title}\n" + "\n".join(lines)


def _split_couplet(paragraph: str) -> list[str]:
    out, current = [], ""
    for ch in paragraph:
        current += ch
        if ch in "，。！？；":
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def tang_poems(out: os.PathLike, root: Path = DATA_ROOT / "tang-poems", val_fraction: float = 0.02) -> dict:
    """全唐诗 → train.txt / valid.txt (poems separated by a blank line; split by a hash of the
    text, so the split is stable)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = [], []
    for p in read_poems(root):
        if not p["paragraphs"]:
            continue
        text = poem_text(p["title"], p["paragraphs"])
        (valid if _bucket(text) < val_fraction else train).append(text)
    _write_text(out / "train.txt", ["\n\n".join(train)])
    _write_text(out / "valid.txt", ["\n\n".join(valid)])
    return {"train": len(train), "valid": len(valid)}


def _bucket(text: str) -> float:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF


# --------------------------------------------------------------------------- code
def stdlib_code(out: os.PathLike, val_fraction: float = 0.05, max_file_bytes: int = 200_000) -> dict:
    """The Python standard library's own ``.py`` files (tests and site-packages left out) →
    train.txt / valid.txt, split by file, each file preceded by a ``# file: name`` line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, valid = [], []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(("site-packages", "test/", "idlelib/idle_test", "lib2to3/tests")) or "/tests/" in rel:
            continue
        try:
            if path.stat().st_size > max_file_bytes:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        (valid if _bucket(rel) < val_fraction else train).append(f"# file: {rel}\n{text}")
    _write_text(out / "train.txt", train)
    _write_text(out / "valid.txt", valid)
    return {"train_files": len(train), "valid_files": len(valid), "stdlib": str(stdlib)}


PREPARERS: dict[str, Callable[..., dict]] = {
    "multi30k": multi30k,
    "tatoeba-en-zh": lambda out: tatoeba(out, "en", "zh"),
    "tatoeba-zh-en": lambda out: tatoeba(out, "zh", "en"),
    "dailydialog": lambda out: dailydialog(out, extra_train=assistant_mix()),
    "tang-poems": tang_poems,
    "stdlib-code": stdlib_code,
}


def prepare(name: str, out: os.PathLike) -> dict:
    if name not in PREPARERS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(PREPARERS)}")
    return PREPARERS[name](out)


__all__ = [
    "DATA_ROOT",
    "PREPARERS",
    "assistant_mix",
    "dailydialog",
    "dialogue_turns",
    "multi30k",
    "poem_text",
    "prepare",
    "read_lines",
    "read_parallel",
    "read_poems",
    "stdlib_code",
    "tang_poems",
    "tatoeba",
]
