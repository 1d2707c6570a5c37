"""The training loop: one Trainer for every objective, exact resume, DDP/FSDP under torchrun.

A run is described by a ``TrainConfig`` (YAML, see ``recipes/``). The loop is kept
lean because small models are bound by Python overhead, not arithmetic: the loss
is read back (``.item()``) only at log intervals and batches are plain tensors.

Checkpoints are folders ``<out_dir>/checkpoints/step-NNNNNNNN`` holding the model
(safetensors + config.json + tokenizer.json, loadable with ``zenlm.load``) and
``trainer_state.pt`` (optimizer, scheduler, every rank's RNG states, the data
position). A folder is written under a temporary name and renamed only when
complete, and ``<out_dir>/latest`` is rewritten atomically after that, so a kill at
any moment leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import typing
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..checkpoint import atomic_write, save_weights, unique_state_dict, load_weights, load_state
from ..config import TransformerConfig, estimate_costs
from ..cpu import PRECISIONS, cpu_info, resolve_precision
from ..data import DataConfig, Datasets, iter_texts, load_datasets
from ..model import IGNORE_INDEX, Block, TransformerLM
from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
ATTENTION_BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")
STATE_NAME = "trainer_state.pt"
COMPLETE_NAME = "COMPLETE"


# --------------------------------------------------------------------------- config
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
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no training config at {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
        for key, value in (overrides or {}).items():
            _set_dotted(data, key, value)
        return cls.from_dict(data, base_dir=path.parent)

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
        from ..config import PRESETS

        rule(preset is None or preset in PRESETS, "model.preset", f"must be one of {', '.join(PRESETS)}", preset)
        known = {f.name for f in dataclasses.fields(TransformerConfig)}
        unknown = sorted(set(model) - known)
        if unknown:
            raise ValueError(f"unknown key model.{unknown[0]}; valid: preset, {', '.join(sorted(known))}")
        self.data.validate()


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


# --------------------------------------------------------------------------- pieces
def lr_lambda(optim: OptimConfig, max_steps: int):
    """Multiplier of the peak lr at a step: linear warmup, then cosine or linear decay to min_lr."""
    decay = optim.decay_steps or max_steps
    floor = optim.min_lr / optim.lr

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant" or step >= decay:
            return 1.0 if optim.schedule == "constant" else floor
        progress = (step - optim.warmup_steps) / max(1, decay - optim.warmup_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
        return floor + shape * (1.0 - floor)

    return factor


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not biases or norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = optim.fused
    if fused is None:
        fused = device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass (memory for compute);
    the parameter names, and so the checkpoint format, stay unchanged."""
    from torch.utils.checkpoint import checkpoint

    for module in model.modules():
        if isinstance(module, Block):
            forward = module.forward
            module.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def measure_peak_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.3) -> float:
    """Best matmul FLOP/s at this precision, for MFU (nanoGPT's estimate_mfu uses a datasheet
    figure; here the machine measures itself)."""
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            return best


# --------------------------------------------------------------------------- checkpoints
def find_latest_checkpoint(out_dir: os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint: ``latest`` if it points at a complete folder, else the
    highest-numbered folder carrying the COMPLETE marker. Temporary folders never count."""
    root = Path(out_dir) / "checkpoints"
    pointer = Path(out_dir) / "latest"
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if (target / COMPLETE_NAME).is_file():
            return target
    if not root.is_dir():
        return None
    done = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()
            and (d / COMPLETE_NAME).is_file()]
    return max(done, key=lambda d: int(d.name[5:]), default=None)


def _write_dir_atomically(final: Path, fill) -> None:
    """Fill a temporary sibling folder, fsync it, then rename it into place."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    atomic_write(tmp / COMPLETE_NAME, lambda p: Path(p).write_text("ok\n"))
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Builds tokenizer, data, model and optimizer from a TrainConfig and runs the loop."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        self.out_dir = Path(config.out_dir)
        wanted = config.device
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        self.dist = init_distributed(torch.device(wanted).type)
        if wanted == "cuda":
            wanted = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(wanted)
        self.device = torch.device(wanted)
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.fast_cpu and self.device.type == "cpu":
            from ..kernels import fast_cpu

            fast_cpu(True)
        self.main = self.dist.main
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._seed_everything(config.seed)  # the same initial weights on every rank (FSDP shards them as they are)

        self.tokenizer = self._tokenizer()
        self.model_config = self._model_config()
        self.model = self._model()
        self.data: Datasets = self._datasets()
        if config.data.group_by_length:
            self.data.train.group_by_length(config.batch_size)
        window = self._window()

        # bf16 only where the device multiplies it natively: emulated bf16 on a CPU without
        # AVX512_BF16/AMX is ~100x slower than fp32, so an explicit bf16 falls back, saying why
        self.precision = resolve_precision(config.precision, self.device, strict=config.strict_precision)
        self.amp_dtype = torch.bfloat16 if self.precision == "bf16" else None
        if self.main:
            logger.info("precision %s (asked: %s; %s)", self.precision, config.precision, cpu_info().describe()
                        if self.device.type == "cpu" else self.device.type)
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.wrapped = self._wrap(self.model)
        self.optimizer = make_optimizer(self.model if config.distributed != "fsdp" else self.wrapped, config.optim,
                                        self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config.optim, config.max_steps))
        self.forward = torch.compile(self.wrapped) if config.compile else self.wrapped
        self._seed_everything(config.seed + self.dist.rank)  # dropout differs across ranks

        self.step = 0
        self.best_loss = math.inf
        self.bad_evals = 0
        self.history: list[dict] = []
        self.global_batch = config.batch_size * config.grad_accum * self.dist.world
        costs = estimate_costs(self.model_config, 1, min(window, self.model_config.max_position_embeddings))
        self.flops_per_token = costs["training_flops_per_token"]
        self.peak_flops = config.peak_flops or measure_peak_flops(self.amp_dtype or torch.float32, self.device)
        self._resume()

    # ------------------------------------------------------------ set-up
    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _tokenizer(self) -> Tokenizer:
        spec = self.config.tokenizer
        if spec.path:
            return Tokenizer.load(spec.path)
        if self.config.resume not in ("auto", "never") and (Path(self.config.resume) / "tokenizer.json").exists():
            return Tokenizer.load(self.config.resume)
        if self.config.init_from and (Path(self.config.init_from) / "tokenizer.json").exists():
            return Tokenizer.load(self.config.init_from)
        saved = self.out_dir / "tokenizer.json"
        resuming = self.config.resume == "auto" and find_latest_checkpoint(self.out_dir) is not None
        if resuming and saved.exists():  # a resumed run keeps the tokenizer its weights were trained with
            return Tokenizer.load(saved)
        if self.dist.enabled:
            import torch.distributed as dist

            if self.main:
                self._train_tokenizer(spec).save(saved)
            dist.barrier()
            return Tokenizer.load(saved)
        tok = self._train_tokenizer(spec)
        tok.save(saved)
        return tok

    def _train_tokenizer(self, spec: TokenizerSpec) -> Tokenizer:
        logger.info("training a %s tokenizer (vocab %d) on the training files", spec.kind, spec.vocab_size)
        if self.config.data.format == "text":
            from ..data import list_files

            return Tokenizer.train([str(f) for f in list_files(self.config.data.train)], vocab_size=spec.vocab_size,
                                   kind=spec.kind)
        return Tokenizer.train(iter_texts(self.config.data), vocab_size=spec.vocab_size, kind=spec.kind)

    def _model_config(self) -> TransformerConfig:
        if self.config.init_from:
            config = TransformerConfig.load(self.config.init_from)
            if config.vocab_size < self.tokenizer.vocab_size:
                raise ValueError(f"init_from model has vocab_size={config.vocab_size}, fewer than the tokenizer's "
                                 f"{self.tokenizer.vocab_size} tokens")
            return config
        spec = dict(self.config.model)
        preset = spec.pop("preset", None)
        base = TransformerConfig.from_preset(preset).to_dict() if preset else {}
        tok = self.tokenizer
        defaults = {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id if tok.pad_id is not None else 0}
        if tok.bos_id is not None:
            defaults["bos_token_id"] = tok.bos_id
        if tok.eos_id is not None:
            defaults["eos_token_id"] = tok.eos_id
        merged = {**base, **defaults, **spec}
        try:
            config = TransformerConfig.from_dict(merged)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        if config.vocab_size < tok.vocab_size:
            raise ValueError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's "
                             f"{tok.vocab_size} tokens")
        return config

    def _model(self) -> TransformerLM:
        if self.config.init_from:
            from ..checkpoint import load_model

            model = load_model(self.config.init_from).train()
        else:
            model = TransformerLM(self.model_config)
        return model.to(self.device)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.dist.enabled:
            return model
        if self.config.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for module in model.modules():
                if isinstance(module, Block):
                    fully_shard(module)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _datasets(self) -> Datasets:
        """Train and validation batches; checks that the objective suits the model."""
        config = self.config
        if not self.main:  # rank 0 tokenizes; the others wait and reuse its shards
            self._barrier()
        data = load_datasets(config.data, self.tokenizer, self.model_config.family, config.seed,
                             progress=config.progress and self.main)
        if self.main:
            self._barrier()
        d, family = config.data, self.model_config.family
        allowed = {"causal": ("decoder-only",), "masked": ("encoder-only",), "denoise": ("encoder-decoder",),
                   "seq2seq": ("encoder-decoder", "decoder-only"), "chat": ("encoder-decoder", "decoder-only")}
        if family not in allowed[d.objective]:
            raise ValueError(f"data.objective={d.objective!r} needs a model that is {' or '.join(allowed[d.objective])}; "
                             f"the model is {family} (num_encoder_layers={self.model_config.num_encoder_layers}, "
                             f"num_decoder_layers={self.model_config.num_decoder_layers})")
        window = d.seq_len + (1 if d.objective == "causal" else 0)
        if d.objective == "seq2seq":
            need = d.max_source_len + d.max_target_len if family == "decoder-only" else \
                max(d.max_source_len, d.max_target_len)
        else:
            need = window
        if need > self.model_config.max_position_embeddings:
            raise ValueError(f"data needs {need} positions (data.seq_len / max_source_len / max_target_len) but "
                             f"model.max_position_embeddings is {self.model_config.max_position_embeddings}")
        return data

    def _window(self) -> int:
        """Tokens per training sample, for the FLOP (MFU) estimate. Supervised pairs never read
        data.seq_len: their length is bounded by max_source_len and max_target_len."""
        d = self.config.data
        if d.objective == "seq2seq":
            if self.model_config.family == "decoder-only":
                return d.max_source_len + d.max_target_len
            return max(d.max_source_len, d.max_target_len)
        return d.seq_len + (1 if d.objective == "causal" else 0)

    # ------------------------------------------------------------ data position
    def _indices(self, step: int, micro: int) -> range:
        """Global sample indices of one rank's micro-batch: a pure function of the step, so
        resume and any world size see the same global batch."""
        c = self.config
        base = ((step * c.grad_accum + micro) * self.dist.world + self.dist.rank) * c.batch_size
        return range(base, base + c.batch_size)

    def _to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        """Precision and attention kernel for a forward pass (the backward follows the forward's choices)."""
        stack = ExitStack()
        if self.amp_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.amp_dtype))
        if self.config.attention_backend != "auto":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                       "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
            stack.enter_context(sdpa_kernel(backend[self.config.attention_backend]))
        return stack

    def _tokens_in(self, batch: dict) -> int:
        n = batch["input_ids"].numel()
        if self.model_config.is_encoder_decoder:
            n += batch["labels"].numel()
        return n

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """The objective on one micro-batch, a mean over its items. The LM objectives live in the
        model's forward; a subclass with another objective overrides this and ``_loss_weight``
        (zenlm.retrieval.finetune: contrastive sentence-embedding training)."""
        smoothing = self.config.label_smoothing if self.wrapped.training else 0.0
        if smoothing:
            return self.forward(**batch, label_smoothing=smoothing).loss
        return self.forward(**batch).loss

    def _loss_weight(self, batch: dict) -> torch.Tensor:
        """How many items ``compute_loss`` averaged over: the batch's weight in the validation mean."""
        labels = batch["labels"][:, 1:] if self.model_config.family == "decoder-only" else batch["labels"]
        return (labels != IGNORE_INDEX).sum()

    # ------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run until max_steps, early stopping or target_loss; returns the final metrics."""
        c = self.config
        metrics_path = self.out_dir / "metrics.jsonl"
        bar = self._bar()
        eval_every = c.eval_interval or c.max_steps
        ckpt_every = c.checkpoint_interval if c.checkpoint_interval is not None else c.eval_interval
        ckpt_every = ckpt_every or c.max_steps
        model, optimizer, scheduler = self.wrapped, self.optimizer, self.scheduler
        params = [p for p in self.model.parameters() if p.requires_grad]
        stop_reason = "max_steps"
        last_log_time, last_log_step, tokens_since = time.perf_counter(), self.step, 0
        loss_sum = torch.zeros((), device=self.device)
        log = open(metrics_path, "a", encoding="utf-8") if self.main else None
        start_time = time.perf_counter()
        model.train()
        try:
            while self.step < c.max_steps:
                for micro in range(c.grad_accum):
                    batch = self._to_device(self.data.train.batch(self._indices(self.step, micro)))
                    tokens_since += self._tokens_in(batch)
                    sync = nullcontext()
                    if self.dist.enabled and micro < c.grad_accum - 1 and hasattr(model, "no_sync"):
                        sync = model.no_sync()
                    with sync:
                        with self._autocast():
                            loss = self.compute_loss(batch)
                        if c.grad_accum > 1:
                            loss = loss / c.grad_accum
                        loss.backward()
                    loss_sum += loss.detach()
                if c.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, c.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)

                if self.step % c.log_interval == 0 or self.step == c.max_steps:
                    loss_value = self._mean_across_ranks(loss_sum) / (self.step - last_log_step)
                    now = time.perf_counter()
                    tps = tokens_since * self.dist.world / (now - last_log_time)
                    mfu = tps * self.flops_per_token / (self.peak_flops * self.dist.world)
                    record = {"step": self.step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                              "tokens_per_s": round(tps, 1), "mfu": round(mfu, 5),
                              "elapsed_s": round(now - start_time, 3)}
                    self._log(log, record)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
                    loss_sum.zero_()
                    last_log_time, last_log_step, tokens_since = now, self.step, 0

                done = self.step >= c.max_steps
                if self.step % eval_every == 0 or done:
                    val = self.evaluate()
                    record = {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50)),
                              "elapsed_s": round(time.perf_counter() - start_time, 3)}
                    self._log(log, record)
                    if self.main:
                        message = f"step {self.step}: val loss {val:.4f}, ppl {record['val_ppl']:.2f}"
                        bar.write(message) if c.progress else logger.info(message)
                    if val < self.best_loss - c.early_stopping_min_delta:
                        self.bad_evals = 0
                    else:
                        self.bad_evals += 1
                    if val < self.best_loss:
                        self.best_loss = val
                        self._save_best()
                    self._plot()
                    if c.target_loss is not None and val <= c.target_loss:
                        stop_reason = "target_loss"
                    elif c.early_stopping_patience and self.bad_evals >= c.early_stopping_patience:
                        stop_reason = "early_stopping"
                model.train()
                if self.step % ckpt_every == 0 or done or stop_reason != "max_steps":
                    self.save_checkpoint()
                if stop_reason != "max_steps":
                    break
        finally:
            bar.close()
            if log:
                log.close()
        wall = time.perf_counter() - start_time
        summary = {"step": self.step, "best_val_loss": self.best_loss, "stop": stop_reason, "wall_s": round(wall, 2)}
        if self.main:
            logger.info("training stopped (%s) at step %d after %.1fs; best val loss %.4f", stop_reason, self.step,
                        wall, self.best_loss)
        return summary

    def _bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.config.max_steps, initial=self.step, disable=not (self.main and self.config.progress),
                    desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)

    def _log(self, handle, record: dict) -> None:
        self.history.append(record)
        if handle is not None:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def _mean_across_ranks(self, value: torch.Tensor) -> float:
        if self.dist.enabled:
            import torch.distributed as dist

            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.dist.world
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the validation split (each rank takes every world-th batch)."""
        c, valid = self.config, self.data.valid
        self.wrapped.eval()
        size = c.eval_batch_size or c.batch_size
        batches = math.ceil(len(valid) / size)
        if c.eval_batches:
            batches = min(batches, c.eval_batches)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        # a compiled forward would recompile for the evaluation's batch shapes and no-grad mode
        # (tens of seconds on a CPU, more than the pass itself): evaluate the eager model
        compiled, self.forward = self.forward, self.wrapped
        try:
            for b in range(self.dist.rank, batches, self.dist.world):
                indices = range(b * size, min((b + 1) * size, len(valid)))
                batch = self._to_device(valid.batch(indices))
                with self._autocast():
                    loss = self.compute_loss(batch)
                count = self._loss_weight(batch)
                total += torch.stack([loss.double() * count, count.double()])
        finally:
            self.forward = compiled
        if self.dist.enabled:
            import torch.distributed as dist

            dist.all_reduce(total)
        return float(total[0] / total[1].clamp(min=1))

    # ------------------------------------------------------------ saving
    def _full_state(self) -> tuple[dict, dict]:
        """Model and optimizer state as full (unsharded) dicts; every rank must call this under FSDP."""
        if self.dist.enabled and self.config.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.wrapped, options=options)
            return model_state, get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        return unique_state_dict(self.model), self.optimizer.state_dict()

    def _gather_rng(self) -> list:
        state = _rng_state()
        if not self.dist.enabled:
            return [state]
        import torch.distributed as dist

        states: list = [None] * self.dist.world
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint(self) -> Optional[Path]:
        """Write ``checkpoints/step-N`` (complete or not at all), point ``latest`` at it, prune old ones."""
        model_state, optim_state = self._full_state()
        rng = self._gather_rng()
        if not self.main:
            self._barrier()
            return None
        name = f"step-{self.step:08d}"
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "samples_seen": self.step * self.global_batch, "world_size": self.dist.world,
                 "optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": rng,
                 "best_loss": self.best_loss, "bad_evals": self.bad_evals,
                 "train_config": json.dumps(self.config.to_dict())}

        def fill(tmp: Path) -> None:
            atomic_write(tmp / "config.json", lambda p: self.model_config.save(p))
            save_weights({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
            self.tokenizer.save(tmp)
            atomic_write(tmp / STATE_NAME, lambda p: torch.save(state, p))

        _write_dir_atomically(root / name, fill)
        atomic_write(self.out_dir / "latest", lambda p: Path(p).write_text(name + "\n"))
        done = sorted((d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")),
                      key=lambda d: d.name)
        for old in done[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return root / name

    def _save_best(self) -> None:
        model_state, _ = self._full_state() if self.config.distributed == "fsdp" and self.dist.enabled \
            else (unique_state_dict(self.model), None)
        if not self.main:
            return

        def fill(tmp: Path) -> None:
            atomic_write(tmp / "config.json", lambda p: self.model_config.save(p))
            save_weights({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors",
                         metadata={"format": "pt", "step": str(self.step), "val_loss": repr(self.best_loss)})
            self.tokenizer.save(tmp)

        _write_dir_atomically(self.out_dir / "best", fill)

    def _barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _plot(self) -> None:
        """Loss curve PNG (train and validation) next to metrics.jsonl."""
        if not (self.main and self.config.plot):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.model_config.family}, {self.config.data.objective}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.out_dir / "loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)

    # ------------------------------------------------------------ resume
    def _resume(self) -> None:
        c = self.config
        if c.resume == "never":
            path = None
        elif c.resume == "auto":
            path = find_latest_checkpoint(self.out_dir)
        else:
            path = Path(c.resume)
        if path is None:  # a fresh run starts a fresh metrics log
            if self.main:
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            return
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        tensors = load_weights(path / "model.safetensors")
        if self.dist.enabled and c.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            full = {k: tensors.get(k, tensors.get("embed_tokens.weight")) for k in self.model.state_dict()}
            set_model_state_dict(self.wrapped, full, options=options)
            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"], options=options)
        else:
            load_state(self.model, tensors, path / "model.safetensors", strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.best_loss, self.bad_evals = state["best_loss"], state["bad_evals"]
        if state["world_size"] == self.dist.world:
            _set_rng_state(state["rng"][self.dist.rank])
        else:
            logger.warning("resuming with %d processes from a %d-process checkpoint: RNG streams restart",
                           self.dist.world, state["world_size"])
        if self.main:  # keep the metrics up to the checkpoint; a killed run may have logged past it
            metrics = self.out_dir / "metrics.jsonl"
            kept = []
            if metrics.exists():
                for line in metrics.read_text(encoding="utf-8").splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the kill
                    if record.get("step", 0) <= self.step:
                        kept.append(record)
            self.history = kept
            atomic_write(metrics, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in kept)))
            logger.info("resumed from %s at step %d", path, self.step)


def train(config: TrainConfig) -> dict:
    """Train as the config says; under torchrun every process calls this."""
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        if trainer.dist.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


__all__ = ["TrainConfig", "OptimConfig", "TokenizerSpec", "Trainer", "train", "parse_overrides", "lr_lambda",
           "make_optimizer", "find_latest_checkpoint", "measure_peak_flops", "enable_activation_checkpointing"]
