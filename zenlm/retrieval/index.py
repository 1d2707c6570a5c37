"""A search index that lives in a folder: SQLite documents, FAISS vectors, BM25 terms.

Layout of ``DIR``::

    docs.sqlite        the truth: documents (id, title, text, metadata, vector) and meta
                       (model identity, settings, generation counter)
    dense-<g>.faiss    FAISS inner-product index over the vectors (exact, or HNSW when large)
    bm25-<g>/          bm25s index over the same documents, plus rows.npy (its doc order)
    index.json         manifest naming the generation <g> whose files are current

Every change (add, update, delete) is one SQLite transaction that also bumps the
generation; vectors are computed before it starts, so an interrupted build or update
rolls back and leaves the previous index as it was. The FAISS and BM25 files are derived
data: they are written under the new generation's names, the manifest is replaced
atomically, and the old files are removed. If a crash falls between the commit and the
manifest, ``Index.open`` sees the generations differ and rebuilds the derived files
from SQLite (no re-embedding: vectors are stored). ``Index.build`` of a fresh index
fills a hidden sibling folder and renames it into place only when complete.

Duplicate ids: adding a document whose id is already in the index replaces it (an
update); the same id twice in one batch is an error, since which one to keep would be
a guess. BM25 statistics (IDF, average length) depend on the whole collection, so the
BM25 index is rebuilt on each change; the expensive part, embedding, is incremental.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..checkpoint import atomic_write, replace_dir
from .corpora import Document
from .embed import Embedder

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MODES = ("bm25", "dense", "hybrid")
DENSE_KINDS = ("auto", "flat", "hnsw")
DB_NAME, MANIFEST_NAME = "docs.sqlite", "index.json"
FORMAT_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    row INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so it can be the FAISS id
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    vector BLOB
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class IndexConfig:
    """Settings fixed when an index is created (stored in it)."""

    dense: str = "auto"  # flat = exact inner product; hnsw = approximate; auto = hnsw above hnsw_threshold docs
    hnsw_threshold: int = 50_000
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    stemmer: Optional[str] = "english"  # PyStemmer language, or None
    stopwords: Optional[str] = "en"
    rrf_k: int = 60  # reciprocal rank fusion: score = sum 1 / (rrf_k + rank)
    depth: int = 100  # candidates taken from each retriever before fusing

    def validate(self) -> None:
        if self.dense not in DENSE_KINDS:
            raise ValueError(f"unknown dense index kind {self.dense!r}; valid: {', '.join(DENSE_KINDS)}")
        for name in ("hnsw_threshold", "hnsw_m", "ef_construction", "ef_search", "rrf_k", "depth"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")


@dataclass
class Hit:
    id: str
    score: float
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)


def format_hits(hits: Sequence[Hit], as_json: bool = False) -> str:
    """``zenlm search``: a line per hit, ranked from 1: rank, score, id and the first 160 characters of
    title and text; or, ``as_json``, one JSON object per line. Empty for no hits."""
    if as_json:
        return "\n".join(json.dumps({"rank": rank, "id": h.id, "score": h.score, "title": h.title, "text": h.text},
                                    ensure_ascii=False) for rank, h in enumerate(hits, 1))
    return "\n".join(f"{rank:>3}  {h.score:.4f}  {h.id}  "
                     + " ".join((f"{h.title}: {h.text}" if h.title else h.text).split())[:160]
                     for rank, h in enumerate(hits, 1))


@dataclass
class Changes:
    added: int = 0
    updated: int = 0
    deleted: int = 0
    missing: list = field(default_factory=list)  # ids asked to delete that were not there


def _index_error(directory: Path, built: dict, given: dict) -> Optional[str]:
    if built["dim"] != given["dim"] or built["fingerprint"] != given["fingerprint"]:
        return (f"index {directory} was built with model {built['name']!r} (dim {built['dim']}, weights "
                f"{built['fingerprint']}), but model {given['name']!r} (dim {given['dim']}, weights "
                f"{given['fingerprint']}) was given; search it with the same model or rebuild it")
    return None


class Index:
    """``Index.build(dir, docs, embedder)``, ``Index.open(dir)``, ``.add``, ``.delete``, ``.search``."""

    def __init__(self, directory: Path, db: sqlite3.Connection, embedder: Optional[Embedder] = None):
        self.directory, self.db, self._embedder = directory, db, embedder
        meta = dict(db.execute("SELECT key, value FROM meta"))
        self.config = IndexConfig(**json.loads(meta["config"]))
        self.model: Optional[dict] = json.loads(meta["model"]) if meta.get("model", "null") != "null" else None
        self.generation = int(meta["generation"])
        self._dense = self._bm25 = self._bm25_rows = None
        self._stemmer = None
        self._precision = "fp32"  # for a model loaded lazily from the recorded folder

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, directory: PathLike, embedder: Optional[Embedder] = None,
               config: Optional[IndexConfig] = None) -> "Index":
        """A new, empty index. ``embedder=None`` makes a BM25-only index."""
        config = config or IndexConfig()
        config.validate()
        directory = Path(directory)
        if (directory / DB_NAME).exists():
            raise ValueError(f"an index already exists at {directory}; open it to add documents")
        directory.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(directory / DB_NAME, check_same_thread=False)
        with db:
            db.executescript(SCHEMA)
            model = embedder.identity() if embedder is not None else None
            if model is not None and Path(model["name"]).is_dir():
                model["path"] = str(Path(model["name"]).resolve())
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("format", str(FORMAT_VERSION)), ("config", json.dumps(asdict(config))),
                ("model", json.dumps(model)), ("generation", "0")])
        index = cls(directory, db, embedder)
        index._write_derived()
        return index

    @classmethod
    def open(cls, directory: PathLike, embedder: Union[Embedder, PathLike, None] = None,
             precision: str = "fp32") -> "Index":
        """Reopen an index. ``embedder`` (an Embedder or a model folder) must be the model the
        index was built with; without one, the recorded model folder is loaded when a dense
        search first needs it."""
        directory = Path(directory)
        if not (directory / DB_NAME).is_file():
            raise FileNotFoundError(f"no index at {directory} (missing {DB_NAME})")
        db = sqlite3.connect(directory / DB_NAME, check_same_thread=False)
        index = cls(directory, db)
        if embedder is not None:
            if index.model is None:
                raise ValueError(f"index {directory} was built without a model (BM25 only); "
                                 f"it has no vectors for model {str(getattr(embedder, 'name', embedder))!r}")
            if not isinstance(embedder, Embedder):
                embedder = Embedder.load(embedder, precision=precision)
            error = _index_error(directory, index.model, embedder.identity())
            if error:
                db.close()
                raise ValueError(error)
            index._embedder = embedder
        index._precision = precision
        index._load_derived()
        return index

    @classmethod
    def build(cls, directory: PathLike, documents: Iterable[Document], embedder: Optional[Embedder] = None,
              config: Optional[IndexConfig] = None, overwrite: bool = False, show_progress: bool = False
              ) -> "Index":
        """A fresh index built in a hidden sibling folder and renamed into place when complete,
        so an interruption leaves whatever was at ``directory`` untouched."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not overwrite:
            raise ValueError(f"{directory} exists and is not empty; pass overwrite=True to replace it, "
                             "or open it and add documents")
        directory.parent.mkdir(parents=True, exist_ok=True)
        building = directory.parent / f".{directory.name}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        index = cls.create(building, embedder, config)
        try:
            index.add(documents, show_progress=show_progress)
        except BaseException:
            index.close()
            shutil.rmtree(building, ignore_errors=True)
            raise
        index.close()
        replace_dir(building, directory)
        return cls.open(directory, embedder)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            if self.model is None:
                raise ValueError(f"index {self.directory} was built without a model (BM25 only); "
                                 "use mode='bm25'")
            path = self.model.get("path") or self.model["name"]
            if not Path(path).is_dir():
                raise FileNotFoundError(f"index {self.directory} was built with model {self.model['name']!r}, "
                                        f"which is not at {path} any more; pass the model folder explicitly")
            embedder = Embedder.load(path, precision=self._precision, name=self.model["name"])
            error = _index_error(self.directory, self.model, embedder.identity())
            if error:
                raise ValueError(error)
            self._embedder = embedder
        return self._embedder

    # ------------------------------------------------------------------ documents
    def get(self, doc_id: str) -> Optional[Document]:
        row = self.db.execute("SELECT id, title, text, metadata FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else Document(row[0], row[2], row[1], json.loads(row[3]))

    def ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM documents ORDER BY row")]

    def add(self, documents: Iterable[Document], show_progress: bool = False, batch_size: Optional[int] = None
            ) -> Changes:
        """Insert documents; an id already present is replaced (see the module docstring)."""
        docs = list(documents)
        seen: dict[str, int] = {}
        for i, d in enumerate(docs):
            if not isinstance(d, Document):
                raise ValueError(f"item {i} is a {type(d).__name__}, not a Document")
            if not isinstance(d.id, str) or not d.id.strip():
                raise ValueError(f"document {i} has an empty or non-string id {d.id!r}")
            if not isinstance(d.text, str):
                raise ValueError(f"document {d.id!r} has text of type {type(d.text).__name__}, not str")
            if d.id in seen:
                raise ValueError(f"duplicate id {d.id!r} in one batch (items {seen[d.id]} and {i}); "
                                 "ids must be unique within a batch (an id already in the index is updated)")
            seen[d.id] = i
        if not docs:
            return Changes()
        vectors = None
        if self.model is not None:  # embed before touching the database: an interrupt changes nothing
            vectors = self.embedder.encode([d.content for d in docs], batch_size=batch_size,
                                           show_progress=show_progress)
        changes = Changes()
        removed, added = [], []
        with self.db:
            for i, d in enumerate(docs):
                old = self.db.execute("SELECT row FROM documents WHERE id = ?", (d.id,)).fetchone()
                if old is not None:
                    self.db.execute("DELETE FROM documents WHERE row = ?", old)
                    removed.append(old[0])
                    changes.updated += 1
                else:
                    changes.added += 1
                blob = None if vectors is None else vectors[i].tobytes()
                cur = self.db.execute("INSERT INTO documents (id, title, text, metadata, vector) VALUES (?, ?, ?, ?, ?)",
                                      (d.id, d.title, d.text, json.dumps(d.metadata, ensure_ascii=False), blob))
                added.append(cur.lastrowid)
            self._bump()
        self._write_derived(removed, added, vectors)
        return changes

    def delete(self, ids: Sequence[str]) -> Changes:
        if isinstance(ids, str):
            ids = [ids]
        changes = Changes()
        removed = []
        with self.db:
            for doc_id in ids:
                old = self.db.execute("SELECT row FROM documents WHERE id = ?", (doc_id,)).fetchone()
                if old is None:
                    changes.missing.append(doc_id)
                    continue
                self.db.execute("DELETE FROM documents WHERE row = ?", old)
                removed.append(old[0])
                changes.deleted += 1
            if changes.deleted:
                self._bump()
        if changes.deleted:
            self._write_derived(removed)
        return changes

    def _bump(self) -> None:
        self.generation += 1
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(self.generation),))

    # ------------------------------------------------------------------ derived files
    def _dense_kind(self, count: int) -> str:
        if self.config.dense != "auto":
            return self.config.dense
        return "hnsw" if count > self.config.hnsw_threshold else "flat"

    def _build_dense(self):
        import faiss

        rows, blobs = [], []
        for row, blob in self.db.execute("SELECT row, vector FROM documents ORDER BY row"):
            rows.append(row)
            blobs.append(blob)
        dim = self.model["dim"]
        vectors = (np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dim) if blobs
                   else np.zeros((0, dim), np.float32))
        if self._dense_kind(len(rows)) == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.config.ef_construction
        else:
            inner = faiss.IndexFlatIP(dim)
        index = faiss.IndexIDMap2(inner)
        if rows:
            index.add_with_ids(np.ascontiguousarray(vectors), np.asarray(rows, dtype=np.int64))
        return index

    def _tokenize(self, texts: list[str], show_progress: bool = False):
        import bm25s

        if self._stemmer is None and self.config.stemmer:
            import Stemmer

            self._stemmer = Stemmer.Stemmer(self.config.stemmer)
        return bm25s.tokenize(texts, stopwords=self.config.stopwords, stemmer=self._stemmer,
                              return_ids=False, show_progress=show_progress)

    def _build_bm25(self):
        import bm25s

        rows, texts = [], []
        for row, title, text in self.db.execute("SELECT row, title, text FROM documents ORDER BY row"):
            rows.append(row)
            texts.append(f"{title} {text}" if title else text)
        if not rows:
            return None, np.zeros(0, np.int64)
        retriever = bm25s.BM25()
        retriever.index(self._tokenize(texts), show_progress=False)
        return retriever, np.asarray(rows, dtype=np.int64)

    def _update_dense(self, removed: Sequence[int], added: Sequence[int], vectors: Optional[np.ndarray]) -> None:
        """Apply a change to the in-memory FAISS index: exact indexes take removals and
        additions in place, HNSW takes additions; anything else (HNSW removals, the first
        load, crossing the size at which ``auto`` switches to HNSW) rebuilds from SQLite."""
        kind = self._dense_kind(len(self))
        if self._dense is None or vectors is None and added or self.dense_kind != kind or (removed and kind == "hnsw"):
            self._dense = self._build_dense()
            return
        if removed:
            self._dense.remove_ids(np.asarray(removed, dtype=np.int64))
        if len(added):
            self._dense.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(added, dtype=np.int64))

    def _write_derived(self, removed: Sequence[int] = (), added: Sequence[int] = (),
                       vectors: Optional[np.ndarray] = None, rebuild: bool = False) -> None:
        """Bring the FAISS and BM25 indexes up to the current generation, write their files
        under the generation's names, then swap the manifest and remove the old files."""
        import faiss

        g = self.generation
        manifest = {"format": FORMAT_VERSION, "generation": g, "documents": len(self), "model": self.model,
                    "config": asdict(self.config)}
        self._bm25, self._bm25_rows = self._build_bm25()
        if self._bm25 is not None:
            bm25_dir = self.directory / f"bm25-{g}"
            shutil.rmtree(bm25_dir, ignore_errors=True)
            self._bm25.save(str(bm25_dir), show_progress=False)
            np.save(bm25_dir / "rows.npy", self._bm25_rows)
            manifest["bm25"] = bm25_dir.name
        if self.model is not None:
            if rebuild:
                self._dense = None
            self._update_dense(removed, added, vectors)
            name = f"dense-{g}.faiss"
            atomic_write(self.directory / name, lambda tmp: faiss.write_index(self._dense, tmp))
            manifest["dense"] = name
            manifest["dense_kind"] = self._dense_kind(self._dense.ntotal)
        atomic_write(self.directory / MANIFEST_NAME,
                     lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
        keep = {manifest.get("bm25"), manifest.get("dense"), MANIFEST_NAME, DB_NAME}
        for path in self.directory.iterdir():
            if path.name.startswith(("bm25-", "dense-")) and path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self._set_ef()

    def _load_derived(self) -> None:
        import bm25s
        import faiss

        path = self.directory / MANIFEST_NAME
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if manifest.get("generation") != self.generation:
            log.warning("index %s: files of generation %s do not match the documents (generation %d), "
                        "probably after an interrupted update; rebuilding them from the document store",
                        self.directory, manifest.get("generation"), self.generation)
            self._write_derived(rebuild=True)
            return
        if manifest.get("bm25"):
            bm25_dir = self.directory / manifest["bm25"]
            self._bm25 = bm25s.BM25.load(str(bm25_dir), show_progress=False)
            self._bm25_rows = np.load(bm25_dir / "rows.npy")
        if manifest.get("dense"):
            self._dense = faiss.read_index(str(self.directory / manifest["dense"]))
        self._set_ef()

    def _set_ef(self) -> None:
        import faiss

        if self._dense is not None:
            inner = faiss.downcast_index(self._dense.index)
            if isinstance(inner, faiss.IndexHNSW):
                inner.hnsw.efSearch = max(self.config.ef_search, self.config.depth)

    @property
    def dense_kind(self) -> Optional[str]:
        if self._dense is None:
            return None
        import faiss

        return "hnsw" if isinstance(faiss.downcast_index(self._dense.index), faiss.IndexHNSW) else "flat"

    # ------------------------------------------------------------------ search
    def _check_queries(self, queries: Sequence[str], k: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise ValueError(f"query {i} is a {type(q).__name__}, not a str")
            if not q.strip():
                raise ValueError(f"query {i} is empty" if len(queries) > 1 else "the query is empty")
        if mode != "bm25" and self.model is None:
            raise ValueError(f"index {self.directory} has no vectors (built without a model); use mode='bm25'")

    def rank_dense(self, queries: Sequence[str], depth: int, vectors: Optional[np.ndarray] = None
                   ) -> list[list[tuple[int, float]]]:
        if self._dense is None or self._dense.ntotal == 0:
            return [[] for _ in queries]
        if vectors is None:
            vectors = self.embedder.encode_queries(list(queries))
        scores, rows = self._dense.search(np.ascontiguousarray(vectors, dtype=np.float32),
                                          min(depth, self._dense.ntotal))
        return [[(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]

    def rank_bm25(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        if self._bm25 is None:
            return [[] for _ in queries]
        tokens = self._tokenize(list(queries))
        out: list[list[tuple[int, float]]] = [[] for _ in queries]
        asked = [i for i, t in enumerate(tokens) if t]  # a query of only stop-words matches nothing
        if asked:
            docs, scores = self._bm25.retrieve([tokens[i] for i in asked], k=min(depth, len(self._bm25_rows)),
                                               show_progress=False, n_threads=1)
            for i, dd, ss in zip(asked, docs, scores):
                out[i] = [(int(self._bm25_rows[d]), float(s)) for d, s in zip(dd, ss) if s > 0]
        return out

    def rank(self, queries: Sequence[str], k: int = 10, mode: str = "hybrid", depth: Optional[int] = None,
             vectors: Optional[np.ndarray] = None) -> list[list[tuple[int, float]]]:
        """(row, score) lists, best first, for each query."""
        queries = list(queries)
        self._check_queries(queries, k, mode)
        depth = max(k, depth or self.config.depth)
        if mode == "bm25":
            return [r[:k] for r in self.rank_bm25(queries, k)]
        if mode == "dense":
            return self.rank_dense(queries, k, vectors)
        return [reciprocal_rank_fusion([b, d], self.config.rrf_k)[:k]
                for b, d in zip(self.rank_bm25(queries, depth), self.rank_dense(queries, depth, vectors))]

    def search_many(self, queries: Sequence[str], k: int = 10, mode: str = "hybrid",
                    depth: Optional[int] = None) -> list[list[Hit]]:
        ranked = self.rank(queries, k, mode, depth)
        wanted = sorted({row for r in ranked for row, _ in r})
        docs = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            q = f"SELECT row, id, title, text, metadata FROM documents WHERE row IN ({','.join('?' * len(chunk))})"
            for row, doc_id, title, text, metadata in self.db.execute(q, chunk):
                docs[row] = (doc_id, title, text, json.loads(metadata))
        return [[Hit(docs[row][0], score, docs[row][2], docs[row][1], docs[row][3]) for row, score in r if row in docs]
                for r in ranked]

    def search(self, query: str, k: int = 10, mode: str = "hybrid", depth: Optional[int] = None) -> list[Hit]:
        """The ``k`` best documents for one query: BM25, dense, or both fused by reciprocal rank."""
        if not isinstance(query, str):
            raise ValueError(f"the query must be a str, got {type(query).__name__}")
        return self.search_many([query], k, mode, depth)[0]

    def row_ids(self, rows: Iterable[int]) -> dict[int, str]:
        rows = list(rows)
        out = {}
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            out.update(self.db.execute(f"SELECT row, id FROM documents WHERE row IN ({','.join('?' * len(chunk))})",
                                       chunk))
        return out


def reciprocal_rank_fusion(rankings: Sequence[Sequence[tuple[int, float]]], k: int = 60) -> list[tuple[int, float]]:
    """Cormack et al. 2009: each list gives 1 / (k + rank); sum, sort. Ties keep the
    order of first appearance (rank in the earliest list), so the result is deterministic."""
    scores: dict[int, float] = {}
    first: dict[int, tuple[int, int]] = {}
    for li, ranking in enumerate(rankings):
        for rank, (item, _) in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            first.setdefault(item, (rank, li))
    return sorted(scores.items(), key=lambda kv: (-kv[1], first[kv[0]]))


def index_files(paths: Sequence[PathLike], out: PathLike, model: Union[PathLike, Embedder, None] = None,
                overwrite: bool = False, config: Optional[IndexConfig] = None, precision: str = "fp32",
                batch_size: int = 32, show_progress: bool = False):
    """Read document files and put them in the index at ``out``: a new index (built aside and
    swapped in), or, when one is already there, an update of it (ids present are replaced).
    Returns (index, changes, skipped files)."""
    from .corpora import read_documents

    docs, skipped = read_documents(paths)
    if not docs:
        reasons = "; ".join(map(str, skipped[:3]))
        raise ValueError(f"no documents found in {', '.join(map(str, paths))}" + (f" ({reasons})" if reasons else ""))
    embedder = model if isinstance(model, Embedder) or model is None else Embedder.load(
        model, precision=precision, batch_size=batch_size)
    out = Path(out)
    if (out / DB_NAME).is_file() and not overwrite:
        index = Index.open(out, embedder, precision=precision)
        return index, index.add(docs, show_progress=show_progress, batch_size=batch_size), skipped
    index = Index.build(out, docs, embedder, config, overwrite=overwrite, show_progress=show_progress)
    return index, Changes(added=len(index)), skipped
