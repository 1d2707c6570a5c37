"""Information retrieval: sentence embeddings, a persistent FAISS + BM25 + SQLite index with
hybrid search, evaluation (nDCG@10, Recall@100, MRR@10), contrastive fine-tuning and RAG.

Import cost stays small: FAISS, bm25s and PyStemmer load only when an index is used.
"""
from .corpora import Document, Skipped, read_documents, read_qrels, read_queries, training_pairs
from .embed import Embedder, EmbedderConfig
from .evaluate import METRICS, RetrievalScores, evaluate_index, score_run
from .finetune import ContrastiveConfig, contrastive_finetune, ranking_loss
from .index import Changes, Hit, Index, IndexConfig, reciprocal_rank_fusion
from .rag import Answer, ask

__all__ = ["Document", "Skipped", "read_documents", "read_qrels", "read_queries", "training_pairs", "Embedder",
           "EmbedderConfig", "METRICS", "RetrievalScores", "evaluate_index", "score_run",
           "ContrastiveConfig", "contrastive_finetune", "ranking_loss", "Changes", "Hit", "Index", "IndexConfig",
           "reciprocal_rank_fusion", "Answer", "ask"]
