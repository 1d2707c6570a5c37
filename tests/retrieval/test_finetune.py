"""zenlm.retrieval.finetune: the in-batch ranking loss and contrastive fine-tuning on zenlm's Trainer
(learning, checkpoints, resume, validation)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zenlm.retrieval import ContrastiveConfig, Embedder, contrastive_finetune, ranking_loss

from .conftest import TEXTS, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
