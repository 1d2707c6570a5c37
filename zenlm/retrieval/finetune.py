"""Contrastive fine-tuning of an embedder on (query, passage) pairs.

Multiple-negatives ranking loss (Henderson et al. 2017; sentence-transformers'
MultipleNegativesRankingLoss): in a batch of B pairs, each query's positive is its own
passage and the other B−1 passages are its negatives, so no mined negatives are needed:
loss = cross-entropy(scale · cos(q_i, p_j), target i). When two pairs in a batch share a
passage, that passage is not counted as a negative for the other query.

The objective needs two encoder passes per step and no LM head, which the general
``zenlm.train.Trainer`` (built around token-level objectives and ``TransformerLM``) does
not take; this is a compact loop that reuses its optimizer (AdamW, no decay on biases
and norms) and its warmup + decay schedule.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

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


def ranking_loss(queries: torch.Tensor, passages: torch.Tensor, scale: float,
                 same: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over scaled cosine similarities; ``same[i, j]`` masks passage j as a
    false negative for query i (the same passage text as its positive)."""
    scores = scale * F.normalize(queries, dim=-1) @ F.normalize(passages, dim=-1).T
    if same is not None:
        scores = scores.masked_fill(same & ~torch.eye(len(scores), dtype=torch.bool), float("-inf"))
    return F.cross_entropy(scores, torch.arange(len(scores)))


def contrastive_finetune(embedder: Embedder, pairs: Sequence[tuple[str, str]],
                         config: ContrastiveConfig | None = None, show_progress: bool = False) -> dict:
    """Train ``embedder`` in place on (query, passage) pairs; returns loss and timing."""
    from ..train import OptimConfig, lr_lambda, make_optimizer

    config = config or ContrastiveConfig()
    config.validate(len(pairs))
    pairs = [(q, p) for q, p in pairs]
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay, betas=[0.9, 0.999],
                        warmup_steps=int(config.warmup_ratio * total), schedule="linear", grad_clip=config.grad_clip)
    model = embedder.base_model
    model.train()
    optimizer = make_optimizer(model, optim, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total))
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="contrastive fine-tuning", unit="step")
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    losses, start = [], time.perf_counter()
    try:
        for _ in range(config.epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for s in range(steps_per_epoch):
                batch = [pairs[i] for i in order[s * config.batch_size:(s + 1) * config.batch_size]]
                if len(batch) < 2:
                    continue
                with autocast:
                    q = _embed(embedder, [b[0] for b in batch])
                    p = _embed(embedder, [b[1] for b in batch])
                texts = [b[1] for b in batch]
                same = torch.tensor([[a == b for b in texts] for a in texts])
                loss = ranking_loss(q.float(), p.float(), config.scale, same)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    # the weights changed: new identity, and the reduced-precision copy must be redone
    embedder.fingerprint = fingerprint(model)
    embedder.model = embedder._cast(model, embedder.precision)
    return {"steps": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "seconds": time.perf_counter() - start}


def _embed(embedder: Embedder, texts: list[str]) -> torch.Tensor:
    rows = embedder.tokenize(texts)
    # one padded batch in the given order (pairs must stay aligned)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), embedder.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return embedder.embed_tokens(ids, mask)
