"""zenlm.retrieval.index: the persistent index (FAISS + BM25 + SQLite), hybrid search by reciprocal rank
fusion, incremental updates, HNSW, interrupted writes, mismatched models and bad input."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from zenlm.cli import main
from zenlm.retrieval import Document, Embedder, Index, IndexConfig, reciprocal_rank_fusion

from .conftest import TEXTS, docs, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_queries_are_encoded_at_full_precision(tmp_path, tokenizer, cpu_with):
    """A bf16 or int8 embedder speeds up documents; queries keep the fp32 model, so near-tied documents
    are ranked as at fp32 (and the index's dense scores use those query vectors)."""
    cpu_with(bf16=True)  # the bf16 path on every host (emulated where the CPU has none)
    model = tiny_encoder(tokenizer.vocab_size, hidden=64)
    fp32 = Embedder(model, tokenizer).encode(TEXTS[:4])
    for precision in ("bf16", "int8"):
        reduced = Embedder(model, tokenizer, precision=precision)
        assert np.abs(reduced.encode_queries(TEXTS[:4]) - fp32).max() < 1e-6
        assert np.abs(reduced.encode(TEXTS[:4]) - fp32).max() > 1e-4  # documents do take the reduced path
    bf16 = Embedder(model, tokenizer, precision="bf16")
    with Index.build(tmp_path / "ix", docs(), bf16) as index:
        doc_vectors = bf16.encode([d.content for d in docs()])
        hit = index.search(TEXTS[2], k=1, mode="dense")[0]
        assert hit.score == pytest.approx(float(fp32[2] @ doc_vectors[2]), abs=1e-5)


def test_index_search_modes_and_reopen(tmp_path, embedder):
    index = Index.build(tmp_path / "ix", docs(), embedder)
    assert len(index) == len(TEXTS) and index.dense_kind == "flat"
    bm25 = index.search("volcanoes magma", k=3, mode="bm25")
    assert bm25[0].id == "d7" and bm25[0].metadata == {"n": 7}
    dense = index.search(TEXTS[4], k=3, mode="dense")
    assert dense[0].id == "d4" and dense[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(index.search("glaciers", k=50, mode="hybrid")) == len(TEXTS)  # k above the collection size
    before = {m: [(h.id, round(h.score, 6)) for h in index.search("the park dogs", k=5, mode=m)]
              for m in ("bm25", "dense", "hybrid")}
    index.close()
    with Index.open(tmp_path / "ix") as again:  # the model comes back from the recorded folder
        after = {m: [(h.id, round(h.score, 6)) for h in again.search("the park dogs", k=5, mode=m)]
                 for m in ("bm25", "dense", "hybrid")}
    assert before == after


def test_hybrid_is_reciprocal_rank_fusion(tmp_path, embedder):
    index = Index.build(tmp_path / "ix", docs(), embedder, IndexConfig(depth=12))
    q = "rain forest species and the park"
    b, d = index.rank_bm25([q], 12)[0], index.rank_dense([q], 12)[0]
    expect: dict[int, float] = {}
    for ranking in (b, d):
        for r, (row, _) in enumerate(ranking, 1):
            expect[row] = expect.get(row, 0) + 1 / (60 + r)
    got = index.rank([q], k=12, mode="hybrid")[0]
    assert {row: s for row, s in got} == pytest.approx(expect)
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    assert reciprocal_rank_fusion([[(1, 9.0), (2, 8.0)], [(2, 0.5), (3, 0.4)]], k=1) == [
        (2, 1 / 3 + 1 / 2), (1, 1 / 2), (3, 1 / 3)]


def test_incremental_add_update_delete_persist(tmp_path, embedder):
    index = Index.build(tmp_path / "ix", docs(6), embedder)
    changes = index.add([Document("d6", TEXTS[6]), Document("d0", "Volcanic ash grounded every flight.")])
    assert (changes.added, changes.updated) == (1, 1) and len(index) == 7
    assert index.get("d0").text.startswith("Volcanic")
    assert index.search("volcanic ash flight", k=1, mode="bm25")[0].id == "d0"
    assert index.search("Volcanic ash grounded every flight.", k=1, mode="dense")[0].id == "d0"
    gone = index.delete(["d3", "nope"])
    assert (gone.deleted, gone.missing) == (1, ["nope"])
    assert "d3" not in {h.id for h in index.search("stock market", k=10, mode="hybrid")}
    # the in-place FAISS/BM25 updates give what a fresh build of the same documents gives
    final = [index.get(i) for i in index.ids()]
    fresh = Index.build(tmp_path / "fresh", final, embedder)
    for q in ("volcanic flight", "stock market", TEXTS[2]):
        for mode in ("bm25", "dense", "hybrid"):
            assert ([(h.id, round(h.score, 5)) for h in index.search(q, k=6, mode=mode)] ==
                    [(h.id, round(h.score, 5)) for h in fresh.search(q, k=6, mode=mode)])
    fresh.close()
    index.close()
    with Index.open(tmp_path / "ix", embedder) as again:
        assert len(again) == 6 and sorted(again.ids()) == ["d0", "d1", "d2", "d4", "d5", "d6"]
        assert again.get("d3") is None
        assert again.search("rocket satellite", k=1, mode="hybrid")[0].id == "d6"
    files = sorted(p.name for p in (tmp_path / "ix").iterdir())
    assert len([f for f in files if f.startswith("dense-")]) == 1  # old generations cleaned up


def test_hnsw_index_recall_and_delete(tmp_path, tokenizer):
    """HNSW against exact search on random unit vectors: recall@10 >= 0.95; deletes rebuild it."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    class Fixed(Embedder):  # the index takes whatever vectors the embedder gives
        def encode(self, texts, batch_size=None, show_progress=False):
            return np.stack([vectors[int(t.split()[-1])] for t in texts])

    e = Fixed(tiny_encoder(tokenizer.vocab_size), tokenizer, name="fixed")
    corpus = [Document(str(i), f"v {i}") for i in range(3000)]
    flat = Index.build(tmp_path / "flat", corpus, e, IndexConfig(dense="flat"))
    hnsw = Index.build(tmp_path / "hnsw", corpus, e, IndexConfig(dense="hnsw", hnsw_m=16))
    assert (flat.dense_kind, hnsw.dense_kind) == ("flat", "hnsw")
    queries = [f"v {i}" for i in range(0, 3000, 30)]
    qv = rng.standard_normal((len(queries), 32)).astype(np.float32)
    exact = flat.rank_dense(queries, 10, qv)
    approx = hnsw.rank_dense(queries, 10, qv)
    recall = np.mean([len({r for r, _ in a} & {r for r, _ in x}) / 10 for a, x in zip(approx, exact)])
    assert recall >= 0.95, recall
    hnsw.delete([str(i) for i in range(0, 3000, 2)])
    assert len(hnsw) == 1500 and hnsw.dense_kind == "hnsw"
    assert all(int(h.id) % 2 == 1 for h in hnsw.search("v 7", k=20, mode="dense"))


def test_bm25_only_index(tmp_path):
    index = Index.build(tmp_path / "ix", docs())
    assert index.search("chess endgames", k=1, mode="bm25")[0].id == "d8"
    with pytest.raises(ValueError, match="without a model"):
        index.search("chess", mode="dense")
    assert index.search("the of and", k=3, mode="bm25") == []  # stop-words only: no match, no error
    index.close()
    assert main(["search", str(tmp_path / "ix"), "chess endgames"]) == 0  # the CLI falls back to bm25
    assert main(["search", str(tmp_path / "ix"), "chess", "--mode", "dense"]) == 2


def test_interrupted_build_and_update_leave_previous_index(tmp_path, embedder):
    index = Index.build(tmp_path / "ix", docs(5), embedder)
    index.close()

    def exploding():
        yield from docs()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Index.build(tmp_path / "ix", exploding(), embedder, overwrite=True)
    with Index.open(tmp_path / "ix", embedder) as again:
        assert sorted(again.ids()) == [f"d{i}" for i in range(5)]

    class Failing(Embedder):
        def encode(self, texts, batch_size=None, show_progress=False):
            raise KeyboardInterrupt

    failing = Failing(embedder.base_model, embedder.tokenizer, name=embedder.name)
    with Index.open(tmp_path / "ix", failing) as again:
        with pytest.raises(KeyboardInterrupt):
            again.add(docs())
        assert len(again) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ix.")]  # no leftovers

    # a crash between the database commit and the manifest: reopening rebuilds the derived files
    db = sqlite3.connect(tmp_path / "ix" / "docs.sqlite")
    with db:
        db.execute("DELETE FROM documents WHERE id = 'd1'")
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    db.close()
    with Index.open(tmp_path / "ix", embedder) as again:
        assert len(again) == 4
        assert "d1" not in {h.id for h in again.search(TEXTS[1], k=10, mode="hybrid")}


def test_model_and_dimension_mismatch_named(tmp_path, model_dir, embedder, tokenizer):
    Index.build(tmp_path / "ix", docs(), embedder).close()
    other = Embedder(tiny_encoder(tokenizer.vocab_size, seed=1), tokenizer, name="other-model")
    with pytest.raises(ValueError, match=r"built with model '.*encoder.*' \(dim 32, weights \w+\), but model 'other-model' \(dim 32"):
        Index.open(tmp_path / "ix", other)
    wider = Embedder(tiny_encoder(tokenizer.vocab_size, hidden=64), tokenizer, name="wide-model")
    with pytest.raises(ValueError, match=r"dim 32.*'wide-model' \(dim 64"):
        Index.open(tmp_path / "ix", wider)
    assert main(["search", str(tmp_path / "ix"), "cat", "--model", str(model_dir)]) == 0
    wide_dir = tmp_path / "wide"
    wider.save(wide_dir)
    assert main(["search", str(tmp_path / "ix"), "cat", "--model", str(wide_dir)]) == 2


def test_duplicate_ids_policy(tmp_path, embedder):
    index = Index.build(tmp_path / "ix", docs(3), embedder)
    with pytest.raises(ValueError, match="duplicate id 'x'.*items 0 and 2"):
        index.add([Document("x", "a"), Document("y", "b"), Document("x", "c")])
    assert len(index) == 3  # nothing written
    changes = index.add([Document("d1", "replaced text about glaciers")])
    assert changes.updated == 1 and len(index) == 3 and index.get("d1").text == "replaced text about glaciers"


def test_empty_query_rejected(tmp_path, embedder):
    index = Index.build(tmp_path / "ix", docs(), embedder)
    for mode in ("bm25", "dense", "hybrid"):
        with pytest.raises(ValueError, match="query is empty"):
            index.search("   ", mode=mode)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        index.search("cat", k=0)
    with pytest.raises(ValueError, match="unknown search mode 'fuzzy'"):
        index.search("cat", mode="fuzzy")
    index.close()
    assert main(["search", str(tmp_path / "ix"), ""]) == 2
