"""Files → documents, queries and relevance judgements.

Documents: plain text (split into passages at blank lines), JSONL / BEIR ``corpus.jsonl``
(optionally gzipped), ``ID<TAB>TEXT`` TSV, and SMART collections (Cranfield's
``cran.all.1400``). Queries: BEIR ``queries.jsonl`` (its ``metadata`` is never read: in
SciFact it holds the evidence labels), TSV, or SMART ``.I/.W``. Judgements: BEIR qrels TSV
(CRLF tolerated), TREC ``qid iter docid rel``, or Cranfield's ``cranqrel``.

A file that is not UTF-8, or a JSONL line that is not a JSON object with an id, is
reported as ``Skipped(path, reason)`` and the rest is read: one bad file must not
sink a collection of thousands.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, os.PathLike]
QRELS_FORMATS = ("auto", "beir", "trec", "cranfield")
DOC_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".jsonl.gz", ".json", ".tsv", ".tsv.gz")


@dataclass
class Document:
    """One retrievable unit. ``content`` (title + text, BEIR's convention) is what gets indexed."""

    id: str
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def content(self) -> str:
        return f"{self.title} {self.text}" if self.title else self.text


@dataclass
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _read_text(path: Path) -> str:
    """The whole file as text; UnicodeDecodeError propagates for the caller to report."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def _utf8_reason(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); skipped"


def _expand(paths: Iterable[PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(DOC_SUFFIXES)))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out


def read_documents(paths: Iterable[PathLike], passage_words: int = 200) -> tuple[list[Document], list[Skipped]]:
    """Every document in the files (folders are walked for known suffixes), plus what was skipped."""
    docs: list[Document] = []
    skipped: list[Skipped] = []
    for path in _expand(paths):
        try:
            text = _read_text(path)
        except UnicodeDecodeError as e:
            skipped.append(Skipped(str(path), _utf8_reason(e)))
            continue
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            skipped.append(Skipped(str(path), f"unreadable ({e}); skipped"))
            continue
        name = path.name.removesuffix(".gz")
        if name.endswith((".jsonl", ".json")):
            docs.extend(_jsonl_documents(path, text, skipped))
        elif name.endswith(".tsv"):
            docs.extend(_tsv_documents(path, text, skipped))
        elif text.lstrip().startswith(".I "):
            docs.extend(parse_smart_documents(text))
        else:
            docs.extend(_text_passages(path, text, passage_words))
    return docs, skipped


def _jsonl_documents(path: Path, text: str, skipped: list[Skipped]) -> Iterable[Document]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append(Skipped(f"{path}:{n}", f"not JSON ({e.msg}); line skipped"))
            continue
        if not isinstance(row, dict):
            skipped.append(Skipped(f"{path}:{n}", "not a JSON object; line skipped"))
            continue
        doc_id = row.get("_id", row.get("id"))
        body = row.get("text", row.get("contents"))
        if doc_id is None or not isinstance(body, str):
            skipped.append(Skipped(f"{path}:{n}", "needs an \"_id\" (or \"id\") and a string \"text\"; line skipped"))
            continue
        metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        yield Document(str(doc_id), body, str(row.get("title") or ""), metadata)


def _tsv_documents(path: Path, text: str, skipped: list[Skipped]) -> Iterable[Document]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            skipped.append(Skipped(f"{path}:{n}", "expected ID<TAB>TEXT; line skipped"))
            continue
        yield Document(parts[0].strip(), "\t".join(parts[1:]).strip())


def _text_passages(path: Path, text: str, passage_words: int) -> Iterable[Document]:
    """Paragraphs gathered into passages of about ``passage_words`` words (an embedding
    model sees a few hundred tokens at most, so a whole book as one vector means nothing)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    passages, current, words = [], [], 0
    for p in paragraphs:
        n = len(p.split())
        if current and words + n > passage_words:
            passages.append("\n\n".join(current))
            current, words = [], 0
        current.append(p)
        words += n
    if current:
        passages.append("\n\n".join(current))
    stem = path.name
    for i, passage in enumerate(passages):
        yield Document(stem if len(passages) == 1 else f"{stem}#{i}", passage, metadata={"path": str(path)})


# --------------------------------------------------------------------------- SMART (Cranfield)
def _smart_records(text: str) -> list[tuple[str, dict[str, str]]]:
    records = []
    for block in re.split(r"^\.I\s+", text, flags=re.M)[1:]:
        head, _, rest = block.partition("\n")
        fields: dict[str, list[str]] = {}
        key = None
        for line in rest.splitlines():
            m = re.match(r"^\.([A-Z])\s*$", line)
            if m:
                key = m.group(1)
                fields.setdefault(key, [])
            elif key is not None:
                fields[key].append(line.strip())
        records.append((head.strip(), {k: " ".join(v).strip() for k, v in fields.items()}))
    return records


def parse_smart_documents(text: str) -> list[Document]:
    """``.I id / .T title / .A author / .B source / .W text``. Cranfield's .W already starts
    with the title, so the title goes to metadata rather than being indexed twice."""
    return [Document(doc_id, f.get("W", ""), "", {k: v for k, v in (("title", f.get("T", "")),
                                                                   ("author", f.get("A", "")),
                                                                   ("source", f.get("B", ""))) if v})
            for doc_id, f in _smart_records(text)]


# --------------------------------------------------------------------------- queries
def read_queries(path: PathLike) -> dict[str, str]:
    """Query id → text. SMART query files are numbered 1..N in file order, because that is
    how Cranfield's judgements count them (its ``.I`` numbers skip values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no queries file at {path}")
    try:
        text = _read_text(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {_utf8_reason(e).removesuffix('; skipped')}") from None
    if text.lstrip().startswith(".I "):
        return {str(i): f.get("W", "") for i, (_, f) in enumerate(_smart_records(text), 1)}
    queries = {}
    name = path.name.removesuffix(".gz")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if name.endswith((".jsonl", ".json")):
            try:
                row = json.loads(line)
                queries[str(row["_id"] if "_id" in row else row["id"])] = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with \"_id\" and \"text\"") from None
        else:
            qid, sep, q = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{n}: expected ID<TAB>TEXT")
            queries[qid.strip()] = q.strip()
    return queries


# --------------------------------------------------------------------------- judgements
def read_qrels(path: PathLike, format: str = "auto") -> dict[str, dict[str, int]]:
    """Query id → {doc id: grade}. Grades are kept as given (higher = more relevant), except
    ``cranfield`` (cranqrel: 1 = most relevant … 4, and -1), which becomes 5 − grade with the
    -1 judgements dropped (their meaning is undocumented; the TREC copy turns them into
    the top grade 5, which would be wrong)."""
    if format not in QRELS_FORMATS:
        raise ValueError(f"unknown qrels format {format!r}; valid: {', '.join(QRELS_FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no qrels file at {path}")
    lines = [line.rstrip("\r\n").strip() for line in io.StringIO(_read_text(path))]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} holds no judgements")
    if format == "auto":
        first = lines[0].split()
        if first[:2] == ["query-id", "corpus-id"]:
            format = "beir"
        elif len(first) == 4:
            format = "trec"
        else:
            raise ValueError(f"{path}: cannot tell the qrels format from its first line {lines[0]!r}; "
                             f"pass format= one of beir, trec, cranfield")
    if format == "beir" and lines[0].split()[:2] == ["query-id", "corpus-id"]:
        lines = lines[1:]
    columns = {"beir": 3, "trec": 4, "cranfield": 3}[format]
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) != columns:
            raise ValueError(f"{path}: line {n} {line!r} has {len(parts)} columns; {format} qrels have {columns}")
        qid, doc, grade = (parts[0], parts[2], parts[3]) if format == "trec" else parts
        try:
            grade = int(grade)
        except ValueError:
            raise ValueError(f"{path}: line {n}: grade {grade!r} is not an integer") from None
        if format == "cranfield":
            if grade == -1:
                continue
            if not 1 <= grade <= 4:
                raise ValueError(f"{path}: line {n}: cranqrel grade {grade} outside 1..4 (or -1)")
            grade = 5 - grade
        qrels.setdefault(qid, {})[doc] = grade
    return qrels


def training_pairs(qrels: dict[str, dict[str, int]], queries: dict[str, str], documents: dict[str, Document],
                min_grade: int = 1) -> list[tuple[str, str]]:
    """(query text, passage text) pairs for contrastive fine-tuning: one per relevant judgement."""
    pairs = []
    for qid, judged in qrels.items():
        if qid not in queries:
            continue
        for doc_id, grade in judged.items():
            if grade >= min_grade and doc_id in documents:
                pairs.append((queries[qid], documents[doc_id].content))
    return pairs

