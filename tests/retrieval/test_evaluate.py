"""zenlm.retrieval.evaluate: nDCG@10, Recall@100 and MRR@10 against pytrec_eval, on random runs and on
one BM25 run over the real SciFact corpus (a few seconds)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from zenlm.retrieval import Index, evaluate_index, read_documents, read_qrels, read_queries, score_run
from zenlm.retrieval.evaluate import ranked

from .conftest import DATA

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
