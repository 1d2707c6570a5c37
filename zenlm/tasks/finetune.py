"""``zenlm finetune BASE DATA --method lora|full``: fine-tuning over the training engine.

Full fine-tuning is the ordinary ``Trainer`` started from the base's weights
(``init_from``). LoRA wraps the chosen Linears after the base loads and freezes
the rest, so only the adapters reach the optimizer; checkpoints keep base and
adapter tensors together (a killed run resumes exactly), and at each new best the
run writes the adapter alone to ``<out_dir>/adapter`` and the merged model, a
plain zenlm model folder, to ``<out_dir>/best``.

The data format and objective follow from the file when no config says otherwise:
``.tsv`` → sentence pairs (seq2seq), ``.jsonl`` whose records hold ``messages`` →
chat, other ``.jsonl`` → causal LM on a ``text`` field, anything else → plain text.
A config file may hold every ``zenlm train`` key plus a ``lora:`` section
(rank, alpha, dropout, target_modules).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from ..checkpoint import unique_state_dict
from ..lora import (
    LoRAConfig,
    apply_lora,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
)
from ..train import TrainConfig, Trainer, apply_overrides, load_yaml, run_trainer, write_model_folder

METHODS = ("lora", "full")
DEFAULTS = {  # a short, gentle schedule; LoRA takes a larger learning rate than full fine-tuning
    "lora": {"optim": {"lr": 1e-3, "warmup_steps": 20, "weight_decay": 0.0}},
    "full": {"optim": {"lr": 1e-4, "warmup_steps": 20}},
}


def infer_data(path: os.PathLike) -> dict:
    """data.format / data.objective for a training file or folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no training data at {path}")
    sample = path if path.is_file() else next((p for p in sorted(path.rglob("*")) if p.is_file()), None)
    if sample is None:
        raise ValueError(f"{path} is an empty folder")
    if sample.suffix == ".tsv":
        return {"format": "pairs", "objective": "seq2seq"}
    if sample.suffix in (".jsonl", ".json"):
        with open(sample, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            record = json.loads(first) if first else {}
        except json.JSONDecodeError:
            raise ValueError(f"{sample}: the first record is not valid JSON") from None
        if isinstance(record, dict) and "messages" in record:
            return {"format": "chat", "objective": "chat"}
        if isinstance(record, dict) and "source" in record and "target" in record:
            return {"format": "pairs", "objective": "seq2seq"}
        return {"format": "jsonl", "objective": "causal"}
    return {"format": "text", "objective": "causal"}


class LoRATrainer(Trainer):
    """The Trainer with LoRA adapters put on the base model before the optimizer is built."""

    def __init__(self, config: TrainConfig, lora: LoRAConfig):
        self.lora = lora
        super().__init__(config)

    def _model(self):
        model = super()._model()
        apply_lora(model, self.lora)
        trainable, total = trainable_parameters(model)
        if self.dist.main:
            import logging

            logging.getLogger(__name__).info("LoRA rank %d on %d modules: %s of %s parameters train (%.2f%%)",
                                             self.lora.rank, len(model.lora_modules), f"{trainable:,}",
                                             f"{total:,}", 100 * trainable / total)
        return model

    def _save_best(self) -> None:
        if not self.main:
            return
        save_adapter(self.model, self.out_dir / "adapter")
        plain = merge_and_unload(copy.deepcopy(self.model).cpu())
        write_model_folder(self.out_dir / "best", self.model_config, unique_state_dict(plain), self.tokenizer,
                           metadata=self.best_metadata())


def build_config(base: os.PathLike, data: os.PathLike, method: str = "lora", config_path: os.PathLike | None = None,
                 overrides: dict | None = None, out_dir: str | None = None,
                 valid: os.PathLike | None = None) -> tuple[TrainConfig, LoRAConfig | None]:
    """The TrainConfig (and LoRA settings) of a fine-tuning run; errors name the key."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"no model folder at {base} (needs config.json, model.safetensors, tokenizer.json)")
    if not (base / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{base} has no tokenizer.json; fine-tuning needs the base's tokenizer")
    raw: dict = {}
    base_dir = Path.cwd()
    if config_path is not None:
        raw = load_yaml(config_path)
        base_dir = Path(config_path).parent
    merged = copy.deepcopy(DEFAULTS[method])
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    apply_overrides(merged, overrides)
    lora_raw = merged.pop("lora", {}) or {}
    if method == "full" and lora_raw:
        raise ValueError("the config has a lora: section but --method is full")
    try:
        lora = LoRAConfig.from_dict(lora_raw) if method == "lora" else None
    except TypeError as e:
        raise ValueError(f"lora: {e}") from None
    data_section = merged.setdefault("data", {})
    data_section["train"] = [str(Path(data).resolve())]
    if valid is not None:
        data_section["valid"] = [str(Path(valid).resolve())]
    for key, value in infer_data(data).items():
        data_section.setdefault(key, value)
    # lengths default to what the base's context window holds (a causal window carries one extra token)
    from ..config import TransformerConfig

    window = TransformerConfig.load(base).max_position_embeddings
    causal = data_section.get("objective") in ("causal", "masked", "denoise")
    data_section.setdefault("seq_len", window - 1 if causal else window)
    data_section.setdefault("max_source_len", window)
    data_section.setdefault("max_target_len", window)
    merged["init_from"] = str(base.resolve())
    merged.pop("model", None)  # the shape is the base's
    if out_dir is not None:
        merged["out_dir"] = out_dir
    merged.setdefault("out_dir", f"runs/finetune-{base.name}-{method}")
    config = TrainConfig.from_dict(merged, base_dir=base_dir)
    return config, lora


def finetune(base: os.PathLike, data: os.PathLike, method: str = "lora", config_path: os.PathLike | None = None,
             overrides: dict | None = None, out_dir: str | None = None,
             valid: os.PathLike | None = None) -> dict:
    """Run the fine-tuning; returns the trainer's summary plus where the results are."""
    config, lora = build_config(base, data, method, config_path, overrides, out_dir, valid)
    trainer = LoRATrainer(config, lora) if lora is not None else Trainer(config)
    summary = run_trainer(trainer)
    out = Path(config.out_dir)
    summary["model"] = str(out / "best")
    if lora is not None:
        summary["adapter"] = str(out / "adapter")
    trainable, total = trainable_parameters(trainer.model)
    summary.update({"method": method, "trainable_parameters": trainable, "parameters": total})
    return summary


__all__ = ["METHODS", "LoRATrainer", "build_config", "finetune", "infer_data"]
