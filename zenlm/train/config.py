"""What a training run is: ``TrainConfig`` and its sections, read from YAML (see ``recipes/``)
with ``--key.sub VALUE`` overrides on top.

Every value is type-checked as it is read and every error names the dotted key, so a typo in
a recipe fails at once with the key and the allowed values, not an hour into a run.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import PRESETS, TransformerConfig
from ..cpu import PRECISIONS
from ..data import DataConfig

SCHEDULES = ("cosine", "linear", "constant")
ATTENTION_BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")


@dataclass
class TokenizerSpec:
    """An existing tokenizer (``path``), or one trained on the training files."""

    path: Optional[str] = None
    kind: str = "bpe"
    vocab_size: int = 8000


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    decay_steps: Optional[int] = None  # steps from 0 to min_lr; default max_steps
    grad_clip: float = 1.0  # 0 = off
    fused: Optional[bool] = None  # None = fused AdamW where torch offers it


@dataclass
class TrainConfig:
    """Everything a run needs. Paths in ``data`` and ``tokenizer.path`` are relative to the
    YAML file; ``out_dir`` is relative to the working directory."""

    out_dir: str = "runs/train"
    model: dict = field(default_factory=lambda: {"preset": "tiny"})  # preset + TransformerConfig fields
    init_from: Optional[str] = None  # a zenlm model folder to fine-tune
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 1000
    batch_size: int = 8  # per device and micro-step; global batch = batch_size * grad_accum * world size
    grad_accum: int = 1
    eval_interval: int = 250  # 0 = only at the end
    eval_batches: Optional[int] = None  # None = the whole validation split
    eval_batch_size: Optional[int] = None
    log_interval: int = 10
    checkpoint_interval: Optional[int] = None  # default eval_interval; 0 = only at the end
    keep_checkpoints: int = 2
    early_stopping_patience: Optional[int] = None  # evaluations without improvement before stopping
    early_stopping_min_delta: float = 0.0  # an improvement smaller than this does not count
    target_loss: Optional[float] = None  # stop once the validation loss reaches this (time-to-quality runs)
    label_smoothing: float = 0.0  # training loss only; validation loss and perplexity stay plain cross-entropy
    # mixture-of-experts models: this multiple of the experts' load-balancing loss joins the training loss (not the
    # validation loss); 0.001 is transformers' default for Mixtral and Qwen-MoE, 0 = off
    router_aux_loss_coef: float = 0.001
    precision: str = "auto"  # auto = bf16 autocast where the device multiplies bf16 natively, else fp32
    strict_precision: bool = False  # bf16 asked for on a device without native bf16: fail instead of fp32
    compile: bool = False
    # scaled-dot-product attention kernel: auto = torch's choice. On CPU under bf16 autocast with
    # short contexts "math" (matmul + softmax) trains ~25% faster than the flash kernel, whose
    # backward pass dominates a small model's step (profile in benchmarks/RESULTS.md, issue 4).
    attention_backend: str = "auto"
    fast_cpu: bool = False  # route fp32 Linear layers through oneDNN on CPU (zenlm.fast_cpu)
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # ddp | fsdp, used when launched by torchrun
    device: str = "auto"
    threads: Optional[int] = None
    seed: int = 1337
    resume: str = "auto"  # auto (latest checkpoint in out_dir if any) | never | a checkpoint folder
    peak_flops: Optional[float] = None  # for MFU; None = measure a matmul at start
    plot: bool = True
    progress: bool = True

    # ------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict, base_dir: Optional[os.PathLike] = None) -> "TrainConfig":
        config = _build(cls, data, "")
        if base_dir is not None:
            base = Path(base_dir)
            rel = lambda p: p if os.path.isabs(p) else str((base / p).resolve())
            config.data.train = [rel(p) for p in config.data.train]
            config.data.valid = [rel(p) for p in config.data.valid]
            if config.tokenizer.path:
                config.tokenizer.path = rel(config.tokenizer.path)
            if config.init_from:
                config.init_from = rel(config.init_from)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: os.PathLike, overrides: Optional[dict] = None) -> "TrainConfig":
        data = apply_overrides(load_yaml(path, what="training config"), overrides)
        return cls.from_dict(data, base_dir=Path(path).parent)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def rule(ok: bool, key: str, message: str, value: Any) -> None:
            if not ok:
                raise ValueError(f"{key} {message}, got {value!r}")

        for key in ("max_steps", "batch_size", "grad_accum", "log_interval", "keep_checkpoints"):
            v = getattr(self, key)
            rule(v > 0, key, "must be > 0", v)
        for key in ("eval_interval", "checkpoint_interval", "eval_batches", "eval_batch_size",
                    "early_stopping_patience", "threads"):
            v = getattr(self, key)
            rule(v is None or v >= 0, key, "must be >= 0", v)
        rule(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)", self.label_smoothing)
        rule(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0", self.router_aux_loss_coef)
        rule(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}", self.precision)
        rule(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
             f"must be one of {', '.join(ATTENTION_BACKENDS)}", self.attention_backend)
        rule(self.distributed in ("ddp", "fsdp"), "distributed", "must be ddp or fsdp", self.distributed)
        rule(self.resume in ("auto", "never") or Path(self.resume).is_dir(), "resume",
             "must be auto, never or an existing checkpoint folder", self.resume)
        o = self.optim
        rule(o.lr > 0, "optim.lr", "must be > 0", o.lr)
        rule(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}]", o.min_lr)
        rule(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)",
             o.betas)
        rule(o.eps > 0, "optim.eps", "must be > 0", o.eps)
        rule(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
        rule(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
        rule(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {', '.join(SCHEDULES)}", o.schedule)
        rule(o.decay_steps is None or o.decay_steps > 0, "optim.decay_steps", "must be > 0", o.decay_steps)
        rule(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0", o.grad_clip)
        rule(self.tokenizer.kind in ("bpe", "unigram", "char"), "tokenizer.kind", "must be bpe, unigram or char",
             self.tokenizer.kind)
        rule(self.tokenizer.vocab_size > 0, "tokenizer.vocab_size", "must be > 0", self.tokenizer.vocab_size)
        model = dict(self.model)
        preset = model.pop("preset", None)
        rule(preset is None or preset in PRESETS, "model.preset", f"must be one of {', '.join(PRESETS)}", preset)
        known = {f.name for f in dataclasses.fields(TransformerConfig)}
        unknown = sorted(set(model) - known)
        if unknown:
            raise ValueError(f"unknown key model.{unknown[0]}; valid: preset, {', '.join(sorted(known))}")
        self.data.validate()


def load_yaml(path: os.PathLike, what: str = "config") -> dict:
    """The mapping of keys a YAML file holds (an empty file holds none); errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: Optional[dict]) -> dict:
    """Set each dotted key (``{"optim.lr": 1e-3}``) in the nested ``data``, creating sections
    as needed; returns ``data``, changed in place."""
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return data


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.setdefault(part, {}), dict):
            raise ValueError(f"override --{key}: {part} is not a section")
        node = node[part]
    node[parts[-1]] = value


def _build(cls, data: Any, prefix: str):
    """Dataclass from a dict, type-checking each value; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]}; valid keys in {prefix.rstrip('.') or 'the config'}: "
                         f"{', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected is list and isinstance(value, (str, tuple)):
        value = [value] if isinstance(value, str) else list(value)
    if expected in (int, float) and isinstance(value, bool) or not isinstance(value, expected):
        raise ValueError(f"{key} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def parse_overrides(items: list[str]) -> dict:
    """``--optim.lr 1e-3 --data.seq_len=128`` → {"optim.lr": 0.001, "data.seq_len": 128} (values parsed as YAML)."""
    import yaml

    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) < 3:
            raise ValueError(f"override {item!r} must look like --key.sub VALUE or --key.sub=VALUE")
        if "=" in item:
            key, raw = item[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"override {item} has no value")
            key, raw = item[2:], items[i + 1]
            i += 2
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


__all__ = ["SCHEDULES", "ATTENTION_BACKENDS", "TokenizerSpec", "OptimConfig", "TrainConfig", "load_yaml",
           "apply_overrides", "parse_overrides"]
