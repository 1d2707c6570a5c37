"""Knowledge distillation: train a small student to match a large teacher (Hinton et al. 2015).

The student minimises

    (1 - alpha) · CE(student, labels)
    + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))        (soft targets)
    + hidden_weight · MSE(G_student, G_teacher)                           (optional)

over the positions that carry a label. T > 1 flattens both distributions so the student learns
the teacher's ranking of the wrong answers too ("dark knowledge"); T² keeps the soft-target
gradients the same size as the hard-label ones when T changes.

The hidden-state term compares token-to-token similarity matrices G = Ĥ Ĥᵀ of the final hidden
states (Ĥ: rows L2-normalised), which exist at any width, so a narrower student needs no learned
projection (the relation-based transfer of MiniLM / similarity-preserving KD).

Training is zenlm's own Trainer (schedules, bf16, checkpoints, resume, DDP): ``DistillTrainer``
only swaps the loss. Evaluation stays plain cross-entropy, so validation perplexities of student
and teacher compare directly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PRESETS, TransformerConfig
from .model import IGNORE_INDEX, LMOutput
from .train import TrainConfig, Trainer

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the soft-target term; 1 - alpha goes to the hard labels
    hidden_weight: float = 0.0  # weight of the hidden-state relation term; 0 = off

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight!r}")


def _label_mask(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits aligned with the positions that carry a label, and that mask."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels != IGNORE_INDEX


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) at temperature T, averaged over the masked positions."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * t * t


def relation_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between the students' and teacher's token-similarity matrices (width-independent)."""
    gs = F.normalize(student_hidden.float(), dim=-1)
    gt = F.normalize(teacher_hidden.float(), dim=-1)
    gs, gt = gs @ gs.transpose(1, 2), gt @ gt.transpose(1, 2)
    diff = (gs - gt) ** 2
    if attention_mask is not None:
        m = attention_mask.to(diff.dtype)
        pair = m[:, :, None] * m[:, None, :]
        return (diff * pair).sum() / pair.sum().clamp(min=1)
    return diff.mean()


class DistillationObjective(nn.Module):
    """Wraps the student's forward: in training mode the loss is the distillation loss above,
    in eval mode it is the student's own cross-entropy (so validation is comparable)."""

    def __init__(self, student_forward, student: nn.Module, teacher: nn.Module, config: DistillConfig):
        super().__init__()
        self.student_forward, self.student, self.config = student_forward, student, config
        self.teacher = [teacher]  # a list keeps it out of this module's parameters and state dict

    def forward(self, **batch) -> LMOutput:
        out = self.student_forward(**batch)
        if not self.student.training:
            return out
        c = self.config
        with torch.no_grad():
            teacher_out = self.teacher[0](**batch)
        causal = self.student.config.family == "decoder-only"
        s_logits, mask = _label_mask(out.logits, batch["labels"], causal)
        t_logits, _ = _label_mask(teacher_out.logits, batch["labels"], causal)
        loss = c.alpha * soft_target_loss(s_logits, t_logits, mask, c.temperature)
        if c.alpha < 1:
            loss = loss + (1 - c.alpha) * out.loss
        if c.hidden_weight:
            if self.student.config.is_encoder_decoder:  # decoder positions: one per target token
                mask = batch.get("decoder_attention_mask", batch["labels"] != IGNORE_INDEX)
            else:
                mask = batch.get("attention_mask")
            loss = loss + c.hidden_weight * relation_loss(out.last_hidden_state, teacher_out.last_hidden_state, mask)
        out.loss = loss
        return out


class DistillTrainer(Trainer):
    """zenlm's Trainer with a teacher: the student is built from ``config.model`` with the
    teacher's tokenizer, and trained on the distillation loss."""

    def __init__(self, config: TrainConfig, teacher: str, distill: Optional[DistillConfig] = None):
        from . import load

        self.distill = distill or DistillConfig()
        self.distill.validate()
        if not Path(teacher).is_dir():
            raise FileNotFoundError(f"no teacher model folder at {teacher}")
        self.teacher = load(teacher).float().eval().requires_grad_(False)
        self.teacher_dir = teacher
        if not config.tokenizer.path:
            config.tokenizer.path = str(teacher)
        super().__init__(config)
        self.teacher.to(self.device)
        self.forward = DistillationObjective(self.forward, self.model, self.teacher, self.distill)

    def _model_config(self) -> TransformerConfig:
        student = super()._model_config()
        teacher = self.teacher.config
        if student.family != teacher.family:
            raise ValueError(f"the student is {student.family} but the teacher is {teacher.family}; "
                             "distillation needs the same family")
        if student.vocab_size != teacher.vocab_size:
            raise ValueError(f"student vocab_size={student.vocab_size} differs from the teacher's "
                             f"{teacher.vocab_size}; both must share the teacher's tokenizer")
        n_student, n_teacher = student.num_parameters(), teacher.num_parameters()
        if n_student >= n_teacher:
            raise ValueError(f"the student has {n_student:,} parameters, not fewer than the teacher's "
                             f"{n_teacher:,}; choose a smaller student config")
        logger.info("student %s parameters = %.3f of the teacher's %s", f"{n_student:,}", n_student / n_teacher,
                    f"{n_teacher:,}")
        return student


def student_spec(student_config: str, overrides: Optional[dict] = None) -> dict:
    """``config.model`` for the Trainer from a preset name or a config.json path, plus overrides."""
    overrides = dict(overrides or {})
    if student_config in PRESETS:
        return {"preset": student_config, **overrides}
    path = Path(student_config)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        data = TransformerConfig.load(path).to_dict()
        data.pop("extra", None)
        return {**data, **overrides}
    raise ValueError(f"--student-config {student_config!r} is neither a preset ({', '.join(PRESETS)}) "
                     "nor a config.json / model folder")


def distill(teacher: str, student_config: str, data: Sequence[str], out_dir: str = "runs/distill",
            overrides: Optional[dict] = None, distill_config: Optional[DistillConfig] = None,
            train_overrides: Optional[dict] = None) -> dict:
    """``zenlm distill``: train a student from ``student_config`` on ``data`` against the teacher
    folder. Returns the Trainer's summary plus the student/teacher parameter ratio and the
    teacher's validation loss on the same split."""
    from . import load

    teacher_config = load(teacher).config
    objective = {"decoder-only": "causal", "encoder-only": "masked", "encoder-decoder": "seq2seq"}[
        teacher_config.family]
    spec = student_spec(student_config, overrides)
    spec.setdefault("max_position_embeddings", teacher_config.max_position_embeddings)
    window = spec["max_position_embeddings"] - (1 if objective == "causal" else 0)
    base = {"out_dir": out_dir, "model": spec, "tokenizer": {"path": str(teacher)},
            "data": {"train": list(data), "objective": objective, "seq_len": min(256, window),
                     "format": "pairs" if objective == "seq2seq" else "text"}}
    for key, value in (train_overrides or {}).items():  # dotted keys, e.g. data.seq_len
        node = base
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    config = TrainConfig.from_dict(base)
    trainer = DistillTrainer(config, teacher, distill_config)
    summary = trainer.train()
    # the teacher on the same validation split, through the same evaluation code
    student_model, trainer.wrapped = trainer.wrapped, trainer.teacher
    forward, trainer.forward = trainer.forward, trainer.teacher
    try:
        teacher_loss = trainer.evaluate()
    finally:
        trainer.wrapped, trainer.forward = student_model, forward
    n_s, n_t = trainer.model.num_parameters(), trainer.teacher.num_parameters()
    summary.update({"student_parameters": n_s, "teacher_parameters": n_t, "parameter_ratio": n_s / n_t,
                    "teacher_val_loss": teacher_loss, "teacher_val_ppl": math.exp(min(teacher_loss, 50)),
                    "student_val_ppl": math.exp(min(summary["best_val_loss"], 50))})
    return summary


__all__ = ["DistillConfig", "DistillationObjective", "DistillTrainer", "distill", "soft_target_loss",
           "relation_loss", "student_spec"]
