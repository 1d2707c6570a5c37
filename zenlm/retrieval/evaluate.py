"""Retrieval quality: nDCG@10, Recall@100 and MRR@10, computed as trec_eval computes them.

A run is {query id: {doc id: score}}. Documents are ranked the way trec_eval ranks them
(score descending, ties broken by doc id descending), gains are the graded judgements
(linear, as trec_eval's ``ndcg_cut``), and a document counts as relevant at grade >= 1.
Queries without any relevant judgement are left out of the means (their nDCG is
undefined); a judged query the run lacks scores 0. The test suite checks these numbers
against pytrec_eval to 1e-6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

METRICS = ("nDCG@10", "Recall@100", "MRR@10")
Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def ranked(scores: dict[str, float]) -> list[str]:
    """trec_eval's order: higher score first; equal scores by doc id, descending."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (-kv[1], _Desc(kv[0])))]


class _Desc(str):
    """A string that sorts in reverse, to break ties the way trec_eval does."""

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)


def ndcg(order: list[str], judged: dict[str, int], k: int) -> float:
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(order[:k]) if judged.get(d, 0) > 0)
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall(order: list[str], judged: dict[str, int], k: int) -> float:
    relevant = {d for d, g in judged.items() if g > 0}
    return len(relevant.intersection(order[:k])) / len(relevant) if relevant else 0.0


def reciprocal_rank(order: list[str], judged: dict[str, int], k: int) -> float:
    return next((1.0 / (i + 1) for i, d in enumerate(order[:k]) if judged.get(d, 0) > 0), 0.0)


@dataclass
class RetrievalScores:
    """Means over the judged queries, plus each query's values."""

    means: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    queries: int = 0
    label: str = ""

    def __str__(self) -> str:
        head = f"{self.label}: " if self.label else ""
        return head + "  ".join(f"{m} {self.means[m]:.4f}" for m in METRICS) + f"  ({self.queries} queries)"


def score_run(run: Run, qrels: Qrels) -> RetrievalScores:
    per_query = {}
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        order = ranked(run.get(qid, {}))
        per_query[qid] = {"nDCG@10": ndcg(order, judged, 10), "Recall@100": recall(order, judged, 100),
                          "MRR@10": reciprocal_rank(order, judged, 10)}
    n = len(per_query)
    if n == 0:
        raise ValueError("no query in the qrels has a relevant judgement (grade >= 1)")
    means = {m: sum(v[m] for v in per_query.values()) / n for m in METRICS}
    return RetrievalScores(means, per_query, n)


def evaluate_index(index, queries: dict[str, str], qrels: Qrels, mode: str = "hybrid", k: int = 100,
                   embedder=None, label: Optional[str] = None) -> tuple[RetrievalScores, Run]:
    """Search every judged query (at depth ``k`` ≥ 100 for Recall@100) and score the run."""
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no text in the queries file "
                         f"(first: {missing[0]!r}); check that the files belong together")
    qids = [q for q in qrels if any(g > 0 for g in qrels[q].values())]
    texts = [queries[q] for q in qids]
    vectors = None
    if mode != "bm25":
        vectors = (embedder or index.embedder).encode_queries(texts)
    rows = index.rank(texts, max(k, 100), mode, vectors=vectors)
    names = index.row_ids({r for ranking in rows for r, _ in ranking})
    run = {q: {names[r]: s for r, s in ranking} for q, ranking in zip(qids, rows)}
    scores = score_run(run, qrels)
    scores.label = label or mode
    return scores, run


def evaluate_retrieval_files(directory, queries_path, qrels_path, modes=("hybrid",), qrels_format: str = "auto",
                   model=None, precision: str = "fp32") -> list[RetrievalScores]:
    """``zenlm evaluate retrieval``: open the index, read queries and judgements, score each mode."""
    from .corpora import read_qrels, read_queries
    from .index import Index

    queries, qrels = read_queries(queries_path), read_qrels(qrels_path, qrels_format)
    with Index.open(directory, model, precision=precision) as index:
        return [evaluate_index(index, queries, qrels, mode)[0] for mode in modes]
