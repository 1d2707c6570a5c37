"""Corpora → token shards → batches for each training objective.

Text is tokenized once, by worker processes, into memory-mapped numpy shards
(uint16 when the vocabulary fits, else uint32) listed in an ``index.json``; a
second run with the same files and tokenizer finds the index and reuses them, and
a corpus larger than memory streams from disk. Bad records (invalid UTF-8, empty,
malformed JSON, over-long pairs, ...) are skipped, counted per reason and
reported, and ``max_bad_fraction`` turns them into an error.

Every batch is a pure function of the seed and the indices of the samples in it,
so a run that resumes at step *k* sees exactly the batches an uninterrupted run
would, and N data-parallel ranks together see the same global batch as one process.

Why it is one long module: it is one pipeline (corpus → shards → batches) whose stages share the
shard format (``index.json``, tokens/mask/index files) and the per-objective record rules; split, each
half would have to know the other's format. Each function is one step of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .model import IGNORE_INDEX
from .tokenizer import EOS, MASK, ROLE_TOKENS, Tokenizer

logger = logging.getLogger(__name__)

OBJECTIVES = ("causal", "masked", "denoise", "seq2seq", "chat")
FORMATS = ("text", "jsonl", "pairs", "chat")
SAMPLINGS = ("packed", "random")
CHAT_ROLES = ("system", "user", "assistant")
SHARD_VERSION = 1
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".tsv", ".jsonl", ".json", "")


# --------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    """Where the text is, how to read it, and what the model learns from it."""

    train: list = field(default_factory=list)  # files or folders
    valid: list = field(default_factory=list)  # optional; else the last val_fraction of train
    format: str = "text"  # text | jsonl | pairs (TSV or JSONL) | chat (JSONL with messages)
    objective: str = "causal"  # causal | masked | denoise | seq2seq | chat
    text_field: str = "text"
    source_field: str = "source"
    target_field: str = "target"
    messages_field: str = "messages"
    seq_len: int = 256  # context length (causal: predicted positions; windows hold seq_len + 1 tokens)
    max_source_len: int = 256
    max_target_len: int = 256
    val_fraction: float = 0.1
    sampling: str = "packed"  # packed: shuffled non-overlapping windows per epoch; random: random offsets
    mask_prob: float = 0.15  # masked LM
    noise_density: float = 0.3  # denoising: fraction of tokens inside masked spans
    mean_span: float = 3.0  # denoising: Poisson mean of span lengths
    num_workers: int = 0  # tokenizer processes; 0 = min(4, cpu count)
    chunk_bytes: int = 4 << 20  # a worker's unit of work
    cache_dir: Optional[str] = None  # default $ZENLM_CACHE or ~/.cache/zenlm, then /shards
    max_bad_fraction: Optional[float] = None  # above this share of bad records tokenization fails
    scrub_pii: bool = False  # replace e-mails, phones, ID/card numbers, IPs by <EMAIL> etc. (zenlm.privacy)
    # records (pairs, chat): batches of similar lengths, so little of a batch is padding. Each epoch's
    # shuffled order is cut into runs of this many batches; a run is sorted by length, cut into
    # batches, and the batches are shuffled. 0 = off (fairseq and HF's group_by_length do the same).
    group_by_length: int = 0

    def validate(self, prefix: str = "data.") -> None:
        def rule(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ValueError(f"{prefix}{key} {message}, got {getattr(self, key)!r}")

        rule(isinstance(self.train, list) and len(self.train) > 0 and all(isinstance(p, str) for p in self.train),
             "train", "must be a non-empty list of file or folder paths")
        rule(isinstance(self.valid, list) and all(isinstance(p, str) for p in self.valid), "valid",
             "must be a list of file or folder paths")
        rule(self.format in FORMATS, "format", f"must be one of {', '.join(FORMATS)}")
        rule(self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}")
        rule(self.sampling in SAMPLINGS, "sampling", f"must be one of {', '.join(SAMPLINGS)}")
        for key in ("seq_len", "max_source_len", "max_target_len", "chunk_bytes"):
            rule(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key, "must be a positive integer")
        rule(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "must be an integer >= 0")
        rule(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        rule(isinstance(self.group_by_length, int) and self.group_by_length >= 0, "group_by_length",
             "must be an integer >= 0")
        rule(not self.group_by_length or not self.is_stream, "group_by_length",
             f"applies to records (objective seq2seq or chat), not to objective {self.objective!r}")
        rule(0.0 < self.mask_prob < 1.0, "mask_prob", "must be in (0, 1)")
        rule(0.0 < self.noise_density < 1.0, "noise_density", "must be in (0, 1)")
        rule(self.mean_span > 0, "mean_span", "must be > 0")
        rule(self.max_bad_fraction is None or 0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction",
             "must be null or in [0, 1]")
        wants = {"causal": ("text", "jsonl"), "masked": ("text", "jsonl"), "denoise": ("text", "jsonl"),
                 "seq2seq": ("pairs",), "chat": ("chat",)}[self.objective]
        rule(self.format in wants, "format", f"must be {' or '.join(wants)} for objective {self.objective!r}")

    @property
    def is_stream(self) -> bool:
        """Language-model objectives read one packed token stream; the others read records."""
        return self.objective in ("causal", "masked", "denoise")


# --------------------------------------------------------------------------- chat template
def chat_segments(messages: Sequence[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The chat template, in one place: ``<|role|>content<|end|>`` per message.

    Returns (text, trained) pieces; only an assistant's content and its closing
    ``<|end|>`` are trained, so the model learns to answer and to stop, never to
    imitate the user. ``add_generation_prompt`` appends ``<|assistant|>`` for inference."""
    end = ROLE_TOKENS[3]
    pieces: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES or \
                not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {', '.join(CHAT_ROLES)}, 'content': str}}, "
                             f"got {message!r}"[:300])
        trained = message["role"] == "assistant"
        pieces.append((f"<|{message['role']}|>", False))
        pieces.append((message["content"] + end, trained))
    if add_generation_prompt:
        pieces.append(("<|assistant|>", False))
    return pieces


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False,
                tools: Optional[Sequence[dict]] = None, **template_kwargs) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask marking the tokens that carry loss: the one
    function that formats a chat for training, evaluation, ``zenlm chat``, the server and RAG.

    A tokenizer with a model's own template (``tokenizer.has_chat_template``) renders it as
    transformers' ``apply_chat_template`` does; the loss then falls on each assistant turn (its
    content, tool calls and end-of-turn token), found by rendering the conversation's prefixes,
    which works for every template (see ``zenlm.chat_template.chat_spans``). ``add_generation_prompt``
    (inference) appends the assistant header and gives an all-zero mask. ``tools`` and
    ``template_kwargs`` (``enable_thinking=False``, ...) go to the template. Without a template,
    zenlm's ``<|role|>`` template (``chat_segments``) is used; it takes no tools."""
    if tokenizer.has_chat_template:
        return _encode_with_template(tokenizer, messages, add_generation_prompt, tools, template_kwargs)
    if tools:
        raise ValueError("tools need a model's own chat template; zenlm's <|role|> template has no place for them")
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in chat_segments(messages, add_generation_prompt):
        piece = tokenizer.encode(text)
        ids.extend(piece)
        mask.extend([int(trained)] * len(piece))
    return ids, mask


def _encode_with_template(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool,
                          tools: Optional[Sequence[dict]], template_kwargs: dict) -> tuple[list[int], list[int]]:
    from .chat_template import chat_spans

    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a 'role', got {message!r}"[:300])
    messages = list(messages)
    if add_generation_prompt:
        text = tokenizer.render_chat(messages, tools=tools, add_generation_prompt=True, **template_kwargs)
        ids = tokenizer.encode(text)
        return ids, [0] * len(ids)

    def render(prefix, prompt):
        return tokenizer.render_chat(prefix, tools=tools, add_generation_prompt=prompt, **template_kwargs)

    text, spans = chat_spans(render, messages)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask, k = [], 0
    for start, end in encoding.offsets:  # a token overlapping an assistant span carries loss
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        mask.append(int(k < len(spans) and end > spans[k][0]))
    return list(encoding.ids), mask


# --------------------------------------------------------------------------- reading
def list_files(paths: Sequence[str]) -> list[Path]:
    """Expand folders (recursively, sorted, hidden files skipped); a missing path is an error."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(path).parts)))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such data file or folder: {p}")
    if not files:
        raise ValueError(f"no files found in {list(paths)}")
    return files


def plan_chunks(files: Sequence[Path], chunk_bytes: int) -> list[tuple[str, int, int]]:
    """Split files into (path, start, end) byte ranges that begin and end on line boundaries."""
    chunks = []
    for path in files:
        size = path.stat().st_size
        start = 0
        with open(path, "rb") as f:
            while True:
                end = min(start + chunk_bytes, size)
                if end < size:
                    f.seek(end)
                    f.readline()  # extend to the end of the current line
                    end = f.tell()
                chunks.append((str(path), start, end))
                if end >= size:
                    break
                start = end
    return chunks


_WORKER: dict = {}


def _init_worker(tokenizer_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer as _Rust

    _WORKER["tokenizer"] = Tokenizer(_Rust.from_str(tokenizer_json))


def _decode_lines(data: bytes, start: int, bad: Counter, where: dict, path: str) -> list[tuple[int, str]]:
    """Split bytes into (offset, line) with invalid UTF-8 lines counted and dropped."""
    out, offset = [], start
    for raw in data.splitlines(keepends=True):
        try:
            out.append((offset, raw.decode("utf-8")))
        except UnicodeDecodeError:
            _bad(bad, where, "invalid_utf8", path, offset)
        offset += len(raw)
    return out


def _bad(bad: Counter, where: dict, reason: str, path: str, offset: int) -> None:
    bad[reason] += 1
    where.setdefault(reason, f"{path} byte {offset}")


@dataclass
class _Chunk:
    """What one worker's byte range becomes: a token list per record with its (len_a, len_b) row, a
    loss mask per chat record, and the bad records counted by reason (each reason's first place kept)."""
    path: str
    tokens: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    bad: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)

    def reject(self, reason: str, offset: int) -> None:
        _bad(self.bad, self.where, reason, self.path, offset)

    def keep(self, ids: list[int], len_b: int = 0, mask: Optional[list[int]] = None) -> None:
        self.tokens.append(ids)
        self.rows.append((len(ids) - len_b, len_b))
        if mask is not None:
            self.masks.append(mask)


def _tokenize_chunk(task: tuple) -> dict:
    """Worker: read one byte range, tokenize, write ``<prefix>.tokens.bin`` (+ mask, index)."""
    path, start, end, last_chunk, options, prefix = task
    tok: Tokenizer = _WORKER["tokenizer"].with_chat_options(options.get("chat"))
    fmt = options["format"]
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if options.get("scrub_pii"):  # personal data never reaches the shards
        from .privacy import scrub as clean
    else:
        clean = lambda t: t  # noqa: E731
    out = _Chunk(path)
    if fmt == "text":
        _tokenize_text(out, tok, data, start, last_chunk, clean)
    else:  # records: every line parsed first, then each objective's records encoded in a batch
        items = []
        for offset, line in _decode_lines(data, start, out.bad, out.where, path):
            value = _record_value(out, line, offset, options, clean)
            if value is not None:
                items.append((value, offset))
        {"jsonl": _tokenize_jsonl, "pairs": _tokenize_pairs, "chat": _tokenize_chats}[fmt](out, tok, items, options)
    return _write_chunk(out, prefix, np.dtype(options["dtype"]), with_mask=fmt == "chat")


def _tokenize_text(out: _Chunk, tok: Tokenizer, data: bytes, start: int, last_chunk: bool, clean) -> None:
    """Plain text: the whole range is one record; a file's last chunk ends with </s>."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "".join(line for _, line in _decode_lines(data, start, out.bad, out.where, out.path))
    if start == 0 and last_chunk and not text.strip():
        out.reject("empty", 0)
        return
    ids = tok.encode(clean(text)) if text else []
    if last_chunk and tok.eos_id is not None:
        ids.append(tok.eos_id)  # documents (files) end with </s>
    out.keep(ids)


def _record_value(out: _Chunk, line: str, offset: int, options: dict, clean):
    """One line's usable value (jsonl: the text; pairs: (source, target); chat: the messages), or None
    with the line counted as bad (empty, malformed, missing its field)."""
    fmt = options["format"]
    if not line.strip():
        return out.reject("empty", offset)
    if fmt == "pairs" and not out.path.endswith((".jsonl", ".json")):
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) < 2:
            return out.reject("malformed_pair", offset)
        record = {options["source_field"]: cols[0], options["target_field"]: cols[1]}
    else:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return out.reject("malformed_json", offset)
        if not isinstance(record, dict):
            return out.reject("malformed_json", offset)
    if fmt == "jsonl":
        value = record.get(options["text_field"])
        if not isinstance(value, str):
            return out.reject("missing_field", offset)
        return clean(value) if value.strip() else out.reject("empty", offset)
    if fmt == "pairs":
        a, b = record.get(options["source_field"]), record.get(options["target_field"])
        if not isinstance(a, str) or not isinstance(b, str):
            return out.reject("missing_field", offset)
        return (clean(a.strip()), clean(b.strip())) if a.strip() and b.strip() else out.reject("empty", offset)
    messages = record.get(options["messages_field"])
    if not isinstance(messages, list):
        return out.reject("missing_field", offset)
    if not messages:
        return out.reject("empty", offset)
    return [{**m, "content": clean(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str)
            else m for m in messages]


def _tokenize_jsonl(out: _Chunk, tok: Tokenizer, items: list, options: dict) -> None:
    """One text per record, each ending with </s>."""
    extra = [tok.eos_id] if tok.eos_id is not None else []
    for enc in tok.backend.encode_batch([text for text, _ in items], add_special_tokens=False):
        out.keep(enc.ids + extra)


def _tokenize_pairs(out: _Chunk, tok: Tokenizer, items: list, options: dict) -> None:
    """Source and target each ending with </s>; a pair over max_source_len / max_target_len is bad."""
    extra = [tok.eos_id] if tok.eos_id is not None else []
    src = tok.backend.encode_batch([a for (a, _), _ in items], add_special_tokens=False)
    tgt = tok.backend.encode_batch([b for (_, b), _ in items], add_special_tokens=False)
    for (_, offset), s, t in zip(items, src, tgt):
        s_ids, t_ids = s.ids + extra, t.ids + extra
        if len(s_ids) > options["max_source_len"] or len(t_ids) > options["max_target_len"]:
            out.reject("too_long", offset)
            continue
        out.keep(s_ids + t_ids, len_b=len(t_ids))


def _tokenize_chats(out: _Chunk, tok: Tokenizer, items: list, options: dict) -> None:
    """Each conversation with its loss mask (``encode_chat``); one the template refuses, one with no
    assistant reply and one over max_len are bad."""
    for messages, offset in items:
        try:
            ids, mask = encode_chat(tok, messages)
        except ValueError:
            out.reject("bad_messages", offset)
            continue
        if not any(mask):
            out.reject("no_assistant_reply", offset)
        elif len(ids) > options["max_len"]:
            out.reject("too_long", offset)
        else:
            out.keep(ids, mask=mask)


def _write_chunk(out: _Chunk, prefix: str, dtype: np.dtype, with_mask: bool) -> dict:
    """``<prefix>.tokens.bin`` (all records back to back), ``.mask.bin`` for chats, and ``.index.npy``
    (start, len_a, len_b per record); returns the shard's summary."""
    flat = np.fromiter((t for ids in out.tokens for t in ids), dtype=dtype, count=sum(map(len, out.tokens)))
    flat.tofile(prefix + ".tokens.bin")
    if with_mask:
        np.fromiter((m for ms in out.masks for m in ms), dtype=np.uint8, count=len(flat)).tofile(prefix + ".mask.bin")
    rows = out.rows
    starts = np.zeros(len(rows), dtype=np.int64)
    if rows:
        lengths = np.array([a + b for a, b in rows], dtype=np.int64)
        starts[1:] = np.cumsum(lengths)[:-1]
    index = np.column_stack([starts, np.array(rows, dtype=np.int64).reshape(-1, 2)]) if rows else \
        np.zeros((0, 3), dtype=np.int64)
    np.save(prefix + ".index.npy", index)
    return {"name": os.path.basename(prefix), "tokens": int(len(flat)), "records": len(rows),
            "bad": dict(out.bad), "where": out.where}


@dataclass
class BadDataReport:
    """Records skipped while tokenizing, counted per reason, with the first place each was seen."""

    good: int = 0
    bad: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def __str__(self) -> str:
        if not self.total_bad:
            return f"{self.good} records, none skipped"
        parts = ", ".join(f"{reason}={n} (first at {self.first.get(reason, '?')})" for reason, n in sorted(self.bad.items()))
        return f"{self.good} records kept, {self.total_bad} skipped: {parts}"


# --------------------------------------------------------------------------- shards
class TokenShards:
    """Memory-mapped token shards listed in ``index.json``: one global token stream
    (for LM objectives) that is also a list of records (pairs, conversations)."""

    def __init__(self, directory: os.PathLike):
        self.directory = Path(directory)
        meta = json.loads((self.directory / "index.json").read_text(encoding="utf-8"))
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self.report = BadDataReport(meta["good"], meta["bad"], meta["first"])
        self.tokens_per_shard = np.array([s["tokens"] for s in meta["shards"]], dtype=np.int64)
        self.token_offsets = np.concatenate([[0], np.cumsum(self.tokens_per_shard)])
        self._tokens = [self._map(s["name"] + ".tokens.bin", self.dtype, s["tokens"]) for s in meta["shards"]]
        self._masks = [self._map(s["name"] + ".mask.bin", np.uint8, s["tokens"]) if meta["has_mask"] else None
                       for s in meta["shards"]]
        rows = [np.load(self.directory / (s["name"] + ".index.npy")) for s in meta["shards"]]
        for r, base in zip(rows, self.token_offsets[:-1]):
            r[:, 0] += base  # global token offsets
        self.records = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.directory / name, dtype=dtype, mode="r", shape=(count,))

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    def __len__(self) -> int:
        return len(self.records)

    def _gather(self, arrays: list, start: int, length: int) -> np.ndarray:
        out, pos, end = [], start, start + length
        shard = int(np.searchsorted(self.token_offsets, start, side="right") - 1)
        while pos < end:
            base = self.token_offsets[shard]
            stop = min(end, self.token_offsets[shard + 1])
            out.append(arrays[shard][pos - base: stop - base])
            pos, shard = stop, shard + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the global stream, across shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise ValueError(f"token range [{start}, {start + length}) outside [0, {self.num_tokens})")
        return self._gather(self._tokens, start, length)

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(first part, second part, loss mask or None) of record i."""
        start, a, b = (int(x) for x in self.records[i])
        ids = self.tokens(start, a + b)
        mask = self._gather(self._masks, start, a + b) if self.meta["has_mask"] else None
        return ids[:a], ids[a:], mask


def _fingerprint(files: Sequence[Path], tokenizer_json: str, options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": SHARD_VERSION, "options": options,
                         "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]},
                        sort_keys=True).encode())
    h.update(hashlib.sha256(tokenizer_json.encode()).digest())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZENLM_CACHE", Path.home() / ".cache" / "zenlm")) / "shards"


def _shard_options(tokenizer: Tokenizer, config: DataConfig) -> dict:
    """Everything besides the files and tokenizer.json that the shards depend on (and so their cache key)."""
    fmt = config.format
    return {"format": fmt, "text_field": config.text_field, "source_field": config.source_field,
            "target_field": config.target_field, "messages_field": config.messages_field,
            "max_source_len": config.max_source_len, "max_target_len": config.max_target_len,
            # pairs are bounded by max_source_len / max_target_len only: their shards do not depend on
            # seq_len (nor get rebuilt when it changes)
            "max_len": None if fmt == "pairs" else config.seq_len,
            **({"scrub_pii": True} if config.scrub_pii else {}),
            # a model's own chat template formats the conversations (and so keys the cache)
            **({"chat": tokenizer.chat_options()} if fmt == "chat" and tokenizer.has_chat_template else {}),
            "dtype": "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"}


def _run_workers(tasks: list, tokenizer_json: str, num_workers: Optional[int], progress: bool) -> list[dict]:
    """``_tokenize_chunk`` over every task, in this process or a pool of forked workers; results in task order."""
    workers = num_workers or min(4, os.cpu_count() or 1)
    workers = max(1, min(workers, len(tasks)))
    results = []
    bar = _progress(len(tasks), "tokenizing", progress)
    if workers == 1:
        _init_worker(tokenizer_json)
        for task in tasks:
            results.append(_tokenize_chunk(task))
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(tokenizer_json,)) as pool:
            for result in pool.map(_tokenize_chunk, tasks, chunksize=1):
                results.append(result)
                bar.update(1)
    bar.close()
    return results


def build_shards(paths: Sequence[str], tokenizer: Tokenizer, config: DataConfig, progress: bool = True
                 ) -> TokenShards:
    """Tokenize files once into shards (reused when files, tokenizer and options are unchanged)."""
    from .checkpoint import atomic_write

    files = list_files(paths)
    fmt = config.format
    options = _shard_options(tokenizer, config)
    tokenizer_json = tokenizer.backend.to_str()
    key = _fingerprint(files, tokenizer_json, options)
    directory = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    directory = directory / key[:20]
    if (directory / "index.json").exists():
        shards = TokenShards(directory)
        logger.info("reusing token shards in %s: %s tokens; %s", directory, f"{shards.num_tokens:,}", shards.report)
        _check_bad(shards.report, config)
        return shards
    directory.mkdir(parents=True, exist_ok=True)
    chunks = plan_chunks(files, config.chunk_bytes)
    last = {}
    for i, (path, _, _) in enumerate(chunks):
        last[path] = i
    tasks = [(path, start, end, last[path] == i, options, str(directory / f"shard-{i:06d}"))
             for i, (path, start, end) in enumerate(chunks)]
    results = _run_workers(tasks, tokenizer_json, config.num_workers, progress)
    bad: Counter = Counter()
    first: dict = {}
    for r in results:
        bad.update(r["bad"])
        for reason, place in r["where"].items():
            first.setdefault(reason, place)
    meta = {"version": SHARD_VERSION, "fingerprint": key, "dtype": options["dtype"], "has_mask": fmt == "chat",
            "files": [str(f) for f in files], "options": options,
            "shards": [{"name": r["name"], "tokens": r["tokens"], "records": r["records"]} for r in results],
            "good": sum(r["records"] for r in results), "bad": dict(bad), "first": first}
    atomic_write(directory / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    shards = TokenShards(directory)
    logger.info("tokenized %d files into %d shards in %s: %s tokens; %s", len(files), len(results), directory,
                f"{shards.num_tokens:,}", shards.report)
    _check_bad(shards.report, config)
    return shards


def _check_bad(report: BadDataReport, config: DataConfig) -> None:
    if report.total_bad:
        logger.warning("bad data: %s", report)
    seen = report.good + report.total_bad
    if config.max_bad_fraction is not None and seen and report.total_bad / seen > config.max_bad_fraction:
        raise ValueError(f"bad data: {report.total_bad} of {seen} records ({report.total_bad / seen:.1%}) exceed "
                         f"data.max_bad_fraction={config.max_bad_fraction}: {report}")
    if report.good == 0:
        raise ValueError(f"no usable records in the data: {report}")


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety; the train extra brings tqdm
        enabled = False
    if not enabled or total <= 1:
        class _Null:
            def update(self, n=1): ...

            def close(self): ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="chunk", leave=False)


# --------------------------------------------------------------------------- batches
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class Batches:
    """Deterministic batches for one split and objective.

    ``batch(indices)`` turns global sample indices into tensors; sample i of the
    split is fixed by (seed, i) alone. ``train=True`` shuffles per epoch; the
    validation split is read in order, without random offsets."""

    def __init__(self, shards: TokenShards, config: DataConfig, tokenizer_ids: dict, family: str, seed: int,
                 split: tuple[float, float] = (0.0, 1.0), train: bool = True):
        self.shards, self.config, self.family, self.seed, self.train = shards, config, family, seed, train
        self.pad = tokenizer_ids["pad"]
        self.eos = tokenizer_ids["eos"]
        self.mask_id = tokenizer_ids["mask"]
        self.vocab_size = tokenizer_ids["vocab_size"]
        self.special = np.array(sorted(tokenizer_ids["special"]), dtype=np.int64)
        self._perm_epoch, self._perm = -1, None
        self._group_batch = 0
        if config.is_stream:
            n = shards.num_tokens
            self.lo, self.hi = int(n * split[0]), int(n * split[1])
            self.window = config.seq_len + (1 if config.objective == "causal" else 0)
            if self.hi - self.lo < 2 * self.window:
                raise ValueError(f"split of {self.hi - self.lo} tokens is too short for data.seq_len={config.seq_len}")
            # one window per epoch is lost to the random start offset
            self.num_samples = (self.hi - self.lo) // self.window - (1 if train else 0)
        else:
            n = len(shards)
            self.lo, self.hi = int(n * split[0]), int(n * split[1])
            if self.hi <= self.lo:
                raise ValueError(f"split of records [{self.lo}, {self.hi}) is empty")
            self.num_samples = self.hi - self.lo
        if self.mask_id is None and config.objective in ("masked", "denoise"):
            raise ValueError(f"objective {config.objective!r} needs a {MASK} token in the tokenizer")

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------ which sample is where
    def group_by_length(self, batch_size: int) -> None:
        """Order each epoch so consecutive runs of ``batch_size`` samples have similar lengths
        (``DataConfig.group_by_length``); the trainer calls this with its micro-batch size."""
        if self.config.is_stream or not self.train:
            raise ValueError("group_by_length applies to the training split of record data (pairs, chat)")
        self._group_batch = batch_size
        self._perm_epoch = -1

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            g = _rng(self.seed, 1, epoch)
            perm = g.permutation(self.num_samples)
            if self._group_batch:
                rows = self.shards.records[self.lo: self.hi]
                a, b = rows[:, 1], rows[:, 2]  # source and target lengths: sort by source, then target
                sizes = a + b if self.family == "decoder-only" else a.astype(np.int64) * (int(b.max()) + 1) + b
                batch, run = self._group_batch, self._group_batch * self.config.group_by_length
                out = []
                for start in range(0, len(perm), run):
                    chunk = perm[start: start + run]
                    chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
                    groups = [chunk[i: i + batch] for i in range(0, len(chunk), batch)]
                    out.extend(groups[j] for j in g.permutation(len(groups)))
                perm = np.concatenate(out)
            self._perm_epoch, self._perm = epoch, perm
        return self._perm

    def _locate(self, i: int) -> int:
        """Token start (stream) or record number of global sample i."""
        if not self.train:
            j = i % self.num_samples
            return self.lo + j * self.window if self.config.is_stream else self.lo + j
        epoch, j = divmod(int(i), self.num_samples)
        if self.config.is_stream and self.config.sampling == "random":
            return self.lo + int(_rng(self.seed, 2, i).integers(0, self.hi - self.lo - self.window + 1))
        k = int(self._epoch_perm(epoch)[j])
        if self.config.is_stream:
            offset = int(_rng(self.seed, 3, epoch).integers(0, self.window))
            return self.lo + offset + k * self.window
        return self.lo + k

    # ------------------------------------------------------------ tensors
    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        objective = self.config.objective
        if self.config.is_stream:
            rows = np.stack([self.shards.tokens(self._locate(i), self.window) for i in indices]).astype(np.int64)
            if objective == "causal":
                ids = torch.from_numpy(rows)
                return {"input_ids": ids, "labels": ids}
            if objective == "masked":
                return self._masked(rows, indices)
            return self._denoise(rows, indices)
        records = [self.shards.record(self._locate(i)) for i in indices]
        if objective == "seq2seq":
            return self._pairs([(a, b, None) for a, b, _ in records])
        return self._chat(records)

    def _masked(self, rows: np.ndarray, indices) -> dict[str, torch.Tensor]:
        """BERT: pick mask_prob of the non-special tokens; 80% → <mask>, 10% → random, 10% kept."""
        ids, labels = rows.copy(), np.full_like(rows, IGNORE_INDEX)
        for r, i in enumerate(indices):
            g = _rng(self.seed, 4, i)
            u = g.random((3, rows.shape[1]))
            chosen = (u[0] < self.config.mask_prob) & ~np.isin(rows[r], self.special)
            labels[r, chosen] = rows[r, chosen]
            to_mask = chosen & (u[1] < 0.8)
            to_random = chosen & (u[1] >= 0.8) & (u[2] < 0.5)
            ids[r, to_mask] = self.mask_id
            ids[r, to_random] = g.integers(0, self.vocab_size, size=int(to_random.sum()))
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}

    def _denoise(self, rows: np.ndarray, indices) -> dict[str, torch.Tensor]:
        """BART text infilling: spans with Poisson(mean_span) lengths cover noise_density of the
        tokens; each span becomes one <mask> (a zero-length span inserts one). The decoder
        reconstructs the original window."""
        length = rows.shape[1]
        sources = []
        for r, i in enumerate(indices):
            g = _rng(self.seed, 5, i)
            budget = int(round(length * self.config.noise_density))
            masked = np.zeros(length, dtype=bool)
            inserts = np.zeros(length + 1, dtype=bool)
            covered, tries = 0, 0
            while covered < budget and tries < 4 * length:
                tries += 1
                span = min(int(g.poisson(self.config.mean_span)), budget - covered)
                start = int(g.integers(0, length - span + 1))
                if span == 0:
                    inserts[start] = True
                    continue
                if masked[max(0, start - 1): start + span + 1].any():
                    continue  # keep spans apart so each stays one <mask>
                masked[start: start + span] = True
                covered += span
            out = []
            for t in range(length):
                if inserts[t]:
                    out.append(self.mask_id)
                if masked[t]:
                    if t == 0 or not masked[t - 1]:
                        out.append(self.mask_id)
                else:
                    out.append(int(rows[r, t]))
            if inserts[length]:
                out.append(self.mask_id)
            sources.append(out[:length])  # insertions never push the source beyond the window
        width = max(map(len, sources))
        ids = np.full((len(sources), width), self.pad, dtype=np.int64)
        attn = np.zeros_like(ids)
        for r, s in enumerate(sources):
            ids[r, :len(s)] = s
            attn[r, :len(s)] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
                "labels": torch.from_numpy(rows)}

    def _pad(self, seqs: list, value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        out = np.full((len(seqs), width), value, dtype=np.int64)
        attn = np.zeros((len(seqs), width), dtype=np.int64)
        for r, s in enumerate(seqs):
            out[r, :len(s)] = s
            attn[r, :len(s)] = 1
        return torch.from_numpy(out), torch.from_numpy(attn)

    def _pairs(self, records: list) -> dict[str, torch.Tensor]:
        """Supervised pairs: encoder-decoder reads source, predicts target; a decoder-only model
        reads source+target and is scored on the target only."""
        if self.family == "encoder-decoder":
            ids, attn = self._pad([a for a, _, _ in records], self.pad)
            labels, _ = self._pad([b for _, b, _ in records], IGNORE_INDEX)
            return {"input_ids": ids, "attention_mask": attn, "labels": labels}
        seqs = [np.concatenate([a, b]).astype(np.int64) for a, b, _ in records]
        ids, attn = self._pad(seqs, self.pad)
        labels = ids.clone()
        labels[attn == 0] = IGNORE_INDEX
        for r, (a, _, _) in enumerate(records):
            labels[r, :len(a)] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    def _chat(self, records: list) -> dict[str, torch.Tensor]:
        """Loss only on assistant replies. Encoder-decoder: the conversation up to the last reply
        (with the ``<|assistant|>`` prompt) is the source and that reply is the target."""
        if self.family == "encoder-decoder":
            pairs = []
            for ids, _, mask in records:
                trained = np.flatnonzero(mask)
                # the last reply is the final run of trained tokens
                breaks = np.flatnonzero(np.diff(trained) > 1)
                start = int(trained[breaks[-1] + 1] if len(breaks) else trained[0])
                pairs.append((ids[:start], ids[start: int(trained[-1]) + 1], None))
            return self._pairs(pairs)
        seqs = [ids.astype(np.int64) for ids, _, _ in records]
        ids, attn = self._pad(seqs, self.pad)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for r, (row, _, mask) in enumerate(records):
            keep = torch.from_numpy(mask.astype(bool))
            labels[r, :len(row)][keep] = ids[r, :len(row)][keep]
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def tokenizer_ids(tokenizer: Tokenizer) -> dict:
    """The ids Batches needs, read once from the tokenizer."""
    special = {i for t in (tokenizer.pad_token, EOS, "<s>", "<unk>", MASK, *ROLE_TOKENS, "[CLS]", "[SEP]")
               if t is not None and (i := tokenizer.token_to_id(t)) is not None}
    return {"pad": tokenizer.pad_id if tokenizer.pad_id is not None else 0, "eos": tokenizer.eos_id,
            "mask": tokenizer.token_to_id(MASK), "vocab_size": tokenizer.vocab_size, "special": special}


@dataclass
class Datasets:
    """The train and validation batches of a run, built from a DataConfig."""

    train: Batches
    valid: Batches
    report: BadDataReport


def load_datasets(config: DataConfig, tokenizer: Tokenizer, family: str, seed: int, progress: bool = True
                  ) -> Datasets:
    config.validate()
    ids = tokenizer_ids(tokenizer)
    shards = build_shards(config.train, tokenizer, config, progress)
    if config.valid:
        valid_shards = build_shards(config.valid, tokenizer, config, progress)
        train = Batches(shards, config, ids, family, seed, (0.0, 1.0), train=True)
        valid = Batches(valid_shards, config, ids, family, seed, (0.0, 1.0), train=False)
    else:
        if config.val_fraction <= 0:
            raise ValueError("data.val_fraction must be > 0 when data.valid lists no files")
        cut = 1.0 - config.val_fraction
        train = Batches(shards, config, ids, family, seed, (0.0, cut), train=True)
        valid = Batches(shards, config, ids, family, seed, (cut, 1.0), train=False)
    return Datasets(train, valid, shards.report)


def iter_texts(config: DataConfig) -> Iterator[str]:
    """Raw texts of the training files, for training a tokenizer on them (bad lines skipped)."""
    for path in list_files(config.train):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if config.format == "text":
                    yield line
                    continue
                if config.format == "pairs" and not str(path).endswith((".jsonl", ".json")):
                    yield from line.rstrip("\n").split("\t")[:2]
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if config.format == "jsonl" and isinstance(record.get(config.text_field), str):
                    yield record[config.text_field]
                elif config.format == "pairs":
                    yield from (v for v in (record.get(config.source_field), record.get(config.target_field))
                                if isinstance(v, str))
                elif config.format == "chat" and isinstance(record.get(config.messages_field), list):
                    yield from (m["content"] for m in record[config.messages_field]
                                if isinstance(m, dict) and isinstance(m.get("content"), str))


__all__ = ["DataConfig", "TokenShards", "Batches", "Datasets", "BadDataReport", "build_shards", "load_datasets",
           "chat_segments", "encode_chat", "list_files", "plan_chunks", "iter_texts", "tokenizer_ids"]
