"""``zenlm finetune BASE DATA --method lora|full``: fine-tuning over the training engine.

Full fine-tuning is the ordinary ``Trainer`` started from the base's weights
(``init_from``). LoRA wraps the chosen Linears after the base loads and freezes
the rest, so only the adapters reach the optimizer; checkpoints keep base and
adapter tensors together (a killed run resumes exactly), and at each new best the
run writes the adapter alone to ``<out_dir>/adapter`` and the merged model, a
plain zenlm model folder, to ``<out_dir>/best``.

The base may be a Hugging Face folder (Llama, GPT-2, …, as ``zenlm.load`` reads them): it is
converted once into ``<out_dir>/base`` and its HF side files (tokenizer_config.json with the chat
template, generation_config.json) travel into ``best``, so ``zenlm convert to-hf`` of ``best``
gives back a folder transformers loads. ``adapter_format: peft`` (a config key, ``--adapter_format
peft`` on the command line, or ``finetune(adapter_format="peft")``) writes ``<out_dir>/adapter`` as
a PEFT folder that ``peft.PeftModel.from_pretrained`` loads onto the transformers base instead of
zenlm's own adapter files; ``zenlm.lora.load_adapter`` reads both.

The data format and objective follow from the file when no config says otherwise:
``.tsv`` → sentence pairs (seq2seq), ``.jsonl`` whose records hold ``messages`` →
chat, other ``.jsonl`` → causal LM on a ``text`` field, anything else → plain text.
A config file may hold every ``zenlm train`` key plus a ``lora:`` section
(rank, alpha, dropout, target_modules) and ``adapter_format`` (zenlm | peft).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..checkpoint import unique_state_dict
from ..lora import (
    ADAPTER_FORMATS,
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


# files of a Hugging Face base that zenlm's model folder does not hold but an HF export should keep
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


class LoRATrainer(Trainer):
    """The Trainer with LoRA adapters put on the base model before the optimizer is built.

    ``adapter_format`` is the format of ``<out_dir>/adapter`` (see ``zenlm.lora.save_adapter``);
    ``base_model_name_or_path`` goes into a PEFT adapter's config (the HF base it belongs to)."""

    def __init__(self, config: TrainConfig, lora: LoRAConfig, adapter_format: str = "zenlm",
                 base_model_name_or_path: Optional[str] = None):
        if adapter_format not in ADAPTER_FORMATS:
            raise ValueError(f"adapter_format must be one of {', '.join(ADAPTER_FORMATS)}, got {adapter_format!r}")
        self.lora = lora
        self.adapter_format = adapter_format
        self.base_model_name_or_path = base_model_name_or_path
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
        save_adapter(self.model, self.out_dir / "adapter", format=self.adapter_format,
                     base_model_name_or_path=self.base_model_name_or_path)
        plain = merge_and_unload(copy.deepcopy(self.model).cpu())
        write_model_folder(self.out_dir / "best", self.model_config, unique_state_dict(plain), self.tokenizer,
                           metadata=self.best_metadata(), extra=self._copy_side_files)

    def _copy_side_files(self, folder: Path) -> None:
        source = Path(self.config.init_from) if self.config.init_from else None
        for name in HF_SIDE_FILES if source is not None else ():
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)


def build_config(base: os.PathLike, data: os.PathLike, method: str = "lora", config_path: os.PathLike | None = None,
                 overrides: dict | None = None, out_dir: str | None = None,
                 valid: os.PathLike | None = None) -> tuple[TrainConfig, LoRAConfig | None]:
    """The TrainConfig (and LoRA settings) of a fine-tuning run; errors name the key."""
    return _build(base, data, method, config_path, overrides, out_dir, valid)[:2]


def _build(base: os.PathLike, data: os.PathLike, method: str = "lora", config_path: os.PathLike | None = None,
           overrides: dict | None = None, out_dir: str | None = None, valid: os.PathLike | None = None,
           adapter_format: str | None = None) -> tuple[TrainConfig, LoRAConfig | None, str]:
    """``build_config`` plus the adapter format (``adapter_format`` argument, else the config's key)."""
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
    configured = merged.pop("adapter_format", None)
    adapter_format = adapter_format or configured or "zenlm"
    if adapter_format not in ADAPTER_FORMATS:
        raise ValueError(f"adapter_format must be one of {', '.join(ADAPTER_FORMATS)}, got {adapter_format!r}")
    if method == "full" and (adapter_format != "zenlm"):
        raise ValueError(f"adapter_format={adapter_format!r} applies to --method lora; a full fine-tune has no adapter")
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
    return config, lora, adapter_format


def _zenlm_base(base: Path, out_dir: Path) -> Path:
    """A Hugging Face base converted into ``<out_dir>/base`` (a zenlm folder, HF side files kept);
    a zenlm base as it is."""
    from ..hf import convert_from_hf, is_hf_folder

    if not is_hf_folder(base):
        return base
    if not (base / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{base} has no tokenizer.json; fine-tuning needs the base's tokenizer")
    converted = out_dir / "base"
    if converted.exists():
        shutil.rmtree(converted)
    out_dir.mkdir(parents=True, exist_ok=True)
    convert_from_hf(base, converted)
    if (base / "chat_template.jinja").is_file():
        shutil.copyfile(base / "chat_template.jinja", converted / "chat_template.jinja")
    return converted


def finetune(base: os.PathLike, data: os.PathLike, method: str = "lora", config_path: os.PathLike | None = None,
             overrides: dict | None = None, out_dir: str | None = None,
             valid: os.PathLike | None = None, adapter_format: str | None = None) -> dict:
    """Run the fine-tuning; returns the trainer's summary plus where the results are.

    ``base`` is a zenlm or a Hugging Face model folder; ``adapter_format`` (zenlm | peft, default
    the config's ``adapter_format`` key, else zenlm) is the format of ``<out_dir>/adapter``."""
    from ..hf import is_hf_folder

    base = Path(base)
    hf_base = is_hf_folder(base)
    if method not in METHODS:  # the cheap checks before a base is converted
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if adapter_format is not None and adapter_format not in ADAPTER_FORMATS:
        raise ValueError(f"adapter_format must be one of {', '.join(ADAPTER_FORMATS)}, got {adapter_format!r}")
    infer_data(data)
    if hf_base:  # where the run goes, worked out as build_config does, to hold the converted base
        target = Path(out_dir) if out_dir is not None else None
        if target is None:
            raw = load_yaml(config_path) if config_path is not None else {}
            apply_overrides(raw, overrides)
            target = Path(raw.get("out_dir") or f"runs/finetune-{base.name}-{method}")
        base_path = _zenlm_base(base, target)
        out_dir = str(target)
    else:
        base_path = base
    config, lora, fmt = _build(base_path, data, method, config_path, overrides, out_dir, valid, adapter_format)
    if lora is not None and fmt == "peft":  # fail before training, not at the first save
        from ..config import TransformerConfig
        from ..hf import family_for

        try:
            family_for(TransformerConfig.load(base_path))
        except ValueError as e:
            raise ValueError(f"adapter_format=peft needs a base of a Hugging Face family: {e}") from None
    trainer = LoRATrainer(config, lora, fmt, str(base.resolve()) if hf_base else None) if lora is not None \
        else Trainer(config)
    summary = run_trainer(trainer)
    out = Path(config.out_dir)
    summary["model"] = str(out / "best")
    if hf_base:
        summary["base"] = str(base_path)
    if lora is not None:
        summary["adapter"] = str(out / "adapter")
        summary["adapter_format"] = fmt
    trainable, total = trainable_parameters(trainer.model)
    summary.update({"method": method, "trainable_parameters": trainable, "parameters": total})
    return summary


__all__ = ["METHODS", "LoRATrainer", "build_config", "finetune", "infer_data"]
