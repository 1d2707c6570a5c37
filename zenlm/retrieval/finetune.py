"""Contrastive fine-tuning of an embedder on (query, passage) pairs, through zenlm's Trainer.

Multiple-negatives ranking loss (Henderson et al. 2017; sentence-transformers'
MultipleNegativesRankingLoss): in a batch of B pairs, each query's positive is its own
passage and the other B−1 passages are its negatives, so no mined negatives are needed:
loss = cross-entropy(scale · cos(q_i, p_j), target i). A passage that is not really a
negative — the same passage text, or another positive of the same query — is masked out.

The training engine (``zenlm.train.Trainer``) runs the loop: AdamW without decay on
biases and norms, warmup + linear decay, gradient clipping, bf16 autocast, a held-out
validation loss, atomic checkpoints and exact resume (give ``out_dir`` to keep them).
``ContrastiveTrainer`` only swaps in what differs from language modelling — the data
(``PairBatches``), the model (the embedder's own encoder) and the objective
(``compute_loss``: two encoder passes, pooling, the ranking loss).
"""
from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import pool
from ..train import Trainer
from .embed import Embedder, fingerprint

log = logging.getLogger(__name__)


@dataclass
class ContrastiveConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    scale: float = 20.0  # inverse temperature on cosine similarities
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"  # or "bf16": autocast the forward passes (weights and optimizer stay fp32)
    valid_fraction: float = 0.0  # queries held out (all their pairs) for a validation loss; 0 = none
    out_dir: str | None = None  # checkpoints + metrics.jsonl, resumed if present; None = a temporary folder

    def validate(self, pairs: int) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2 (in-batch negatives), "
                             f"got epochs={self.epochs}, batch_size={self.batch_size}")
        if pairs < 2:
            raise ValueError(f"contrastive training needs at least 2 (query, passage) pairs, got {pairs}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"need lr > 0 and warmup_ratio in [0, 1), got lr={self.lr}, "
                             f"warmup_ratio={self.warmup_ratio}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")


def ranking_loss(queries: torch.Tensor, passages: torch.Tensor, scale: float,
                 same: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over scaled cosine similarities; ``same[i, j]`` masks passage j as a
    false negative for query i (the same passage text as its positive)."""
    scores = scale * F.normalize(queries, dim=-1) @ F.normalize(passages, dim=-1).T
    if same is not None:
        scores = scores.masked_fill(same & ~torch.eye(len(scores), dtype=torch.bool, device=scores.device),
                                    float("-inf"))
    return F.cross_entropy(scores, torch.arange(len(scores), device=scores.device))


class PairBatches:
    """Tokenised (query, passage) pairs as the Trainer reads data: ``batch(indices)`` maps
    global sample indices to tensors, a pure function of (seed, indices) — each epoch is
    a seeded permutation — so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, queries: list[list[int]], passages: list[list[int]], query_keys: list[str],
                 passage_keys: list[str], pad_id: int, seed: int, train: bool = True):
        self.queries, self.passages, self.pad_id, self.seed, self.train = queries, passages, pad_id, seed, train
        # integer codes: "same passage" / "same query" become tensor comparisons
        codes: dict[str, int] = {}
        self.passage_codes = [codes.setdefault(k, len(codes)) for k in passage_keys]
        codes = {}
        self.query_codes = [codes.setdefault(k, len(codes)) for k in query_keys]
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.queries)

    def _locate(self, i: int) -> int:
        epoch, j = divmod(int(i), len(self))
        if not self.train:
            return j
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self))
        return int(self._perm[j])

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :max(len(r), 1)] = 1
        return ids, mask

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self._locate(i) for i in indices]
        q_ids, q_mask = self._pad([self.queries[r] for r in rows])
        p_ids, p_mask = self._pad([self.passages[r] for r in rows])
        p = torch.tensor([self.passage_codes[r] for r in rows])
        q = torch.tensor([self.query_codes[r] for r in rows])
        # passage j is no negative for query i when it is i's passage, or another positive of i's query
        same = (p[:, None] == p[None, :]) | (q[:, None] == q[None, :])
        return {"query_ids": q_ids, "query_mask": q_mask, "passage_ids": p_ids, "passage_mask": p_mask,
                "same": same}


class ContrastiveTrainer(Trainer):
    """The Trainer with the embedder's encoder, pair batches and the ranking loss. Runs in one
    process: the objective makes two forward passes per step, which DDP does not allow."""

    def __init__(self, config, embedder: Embedder, train: PairBatches, valid: PairBatches | None, scale: float):
        self.embedder, self._pair_data, self.scale = embedder, (train, valid), scale
        super().__init__(config)
        if self.dist.enabled:
            raise ValueError("contrastive fine-tuning runs in one process, not under torchrun")

    def _tokenizer(self):
        return self.embedder.tokenizer

    def _model_config(self):
        return self.embedder.base_model.config

    def _model(self):
        return self.embedder.base_model.train().to(self.device)

    def _datasets(self):
        from ..data import BadDataReport, Datasets

        train, valid = self._pair_data
        return Datasets(train, valid if valid is not None else PairBatches([], [], [], [], 0, 0, False),
                        BadDataReport())

    def _window(self) -> int:
        return self.embedder.config.max_length

    def _tokens_in(self, batch: dict) -> int:
        return int(batch["query_mask"].sum() + batch["passage_mask"].sum())

    def _vectors(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.forward(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool(hidden.float(), mask, self.embedder.config.pooling, normalize=False)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        q = self._vectors(batch["query_ids"], batch["query_mask"])
        p = self._vectors(batch["passage_ids"], batch["passage_mask"])
        return ranking_loss(q, p, self.scale, batch["same"])

    def _loss_weight(self, batch: dict) -> torch.Tensor:
        return torch.tensor(len(batch["same"]), device=self.device)

    def evaluate(self) -> float:
        """The held-out pairs' mean loss; NaN when none were held out (nothing to measure)."""
        return super().evaluate() if len(self.data.valid) else float("nan")


def split_pairs(pairs: list[tuple[str, str]], fraction: float, seed: int
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Hold out ``fraction`` of the distinct queries with all their pairs (so no validation
    query was seen in training)."""
    if not fraction:
        return pairs, []
    queries = sorted({q for q, _ in pairs})
    random.Random(seed).shuffle(queries)
    held = set(queries[:max(1, round(fraction * len(queries)))])
    train = [pq for pq in pairs if pq[0] not in held]
    valid = [pq for pq in pairs if pq[0] in held]
    if len(train) < 2 or len(valid) < 2:
        raise ValueError(f"valid_fraction={fraction} leaves {len(train)} training and {len(valid)} validation pairs; "
                         f"each needs at least 2")
    return train, valid


def contrastive_finetune(embedder: Embedder, pairs: Sequence[tuple[str, str]],
                         config: ContrastiveConfig | None = None, show_progress: bool = False) -> dict:
    """Train ``embedder`` in place on (query, passage) pairs with ``zenlm.train.Trainer``;
    returns the steps, first/last training loss, validation loss and wall time."""
    from ..data import DataConfig
    from ..train import OptimConfig, TrainConfig

    config = config or ContrastiveConfig()
    config.validate(len(pairs))
    pairs = [(q, p) for q, p in pairs]
    train_pairs, valid_pairs = split_pairs(pairs, config.valid_fraction, config.seed)

    def batches(chosen: list[tuple[str, str]], train: bool) -> PairBatches:
        return PairBatches(embedder.tokenize([q for q, _ in chosen]), embedder.tokenize([p for _, p in chosen]),
                           [q for q, _ in chosen], [p for _, p in chosen], embedder.pad_id, config.seed, train)

    train_data = batches(train_pairs, True)
    valid_data = batches(valid_pairs, False) if valid_pairs else None
    steps = math.ceil(len(train_pairs) / config.batch_size) * config.epochs
    scratch = tempfile.TemporaryDirectory(prefix="zenlm-contrastive-") if config.out_dir is None else None
    train_config = TrainConfig(
        out_dir=config.out_dir or scratch.name,
        # the Trainer's file-based data settings are unused (PairBatches replaces them) but must validate
        data=DataConfig(train=["(query, passage) pairs given in memory"]),
        optim=OptimConfig(lr=config.lr, weight_decay=config.weight_decay, betas=[0.9, 0.999],
                          warmup_steps=int(config.warmup_ratio * steps), schedule="linear",
                          grad_clip=config.grad_clip),
        max_steps=steps, batch_size=config.batch_size, eval_interval=0, checkpoint_interval=0, keep_checkpoints=1,
        eval_batch_size=config.batch_size, log_interval=1, precision=config.precision, seed=config.seed,
        resume="auto" if config.out_dir else "never", plot=False, progress=show_progress)
    start = time.perf_counter()
    try:
        trainer = ContrastiveTrainer(train_config, embedder, train_data, valid_data, config.scale)
        summary = trainer.train()
    finally:
        embedder.base_model.eval()
        if scratch is not None:
            scratch.cleanup()
    # the weights changed: new identity, and the reduced-precision copy must be redone
    embedder.fingerprint = fingerprint(embedder.base_model)
    embedder.model = embedder._cast(embedder.base_model, embedder.precision)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    return {"steps": summary["step"], "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "valid_loss": summary["best_val_loss"] if valid_pairs else None,
            "train_pairs": len(train_pairs), "valid_pairs": len(valid_pairs),
            "seconds": time.perf_counter() - start}
