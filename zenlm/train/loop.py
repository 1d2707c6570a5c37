"""The training loop: one Trainer for every objective, exact resume, DDP/FSDP under torchrun.

A run is described by a ``TrainConfig`` (``zenlm.train.config``). The loop is kept lean
because small models are bound by Python overhead, not arithmetic: the loss is read back
(``.item()``) only at log intervals and batches are plain tensors. ``Trainer.train`` reads
as its steps: an optimizer step, a log line, an evaluation, a checkpoint
(``zenlm.train.state``); what differs under torchrun lives in ``zenlm.train.distributed``.

Subclasses change one piece by overriding its method: ``_tokenizer``, ``_model_config``,
``_model``, ``_datasets``, ``_window``, ``_tokens_in``, ``compute_loss``, ``_loss_weight``,
``evaluate``, ``_save_best``, ``_bar`` (LoRA, distillation, contrastive embedding training
and the demo do).
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import load_weights, unique_state_dict
from ..config import TransformerConfig, estimate_costs
from ..cpu import cpu_info, resolve_precision
from ..data import DataConfig, Datasets, iter_texts, load_datasets
from ..model import IGNORE_INDEX, Block, TransformerLM
from ..tokenizer import Tokenizer
from .config import OptimConfig, TokenizerSpec, TrainConfig
from .distributed import (barrier, full_state_dicts, gather_objects, init_device, load_full_state, mean_across_ranks,
                          shutdown, sum_across_ranks, wrap_model)
from .state import (find_latest_checkpoint, load_trainer_state, plot_losses, rng_state, save_checkpoint_folder,
                    seed_everything, set_rng_state, trim_metrics, write_model_folder)

logger = logging.getLogger(__name__)


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


def positions_needed(data: DataConfig, family: str) -> int:
    """Positions one training sample takes. Supervised pairs never read data.seq_len: their
    length is bounded by max_source_len and max_target_len."""
    if data.objective == "seq2seq":
        if family == "decoder-only":
            return data.max_source_len + data.max_target_len
        return max(data.max_source_len, data.max_target_len)
    return data.seq_len + (1 if data.objective == "causal" else 0)


@dataclass
class _Progress:
    """What one ``Trainer.train`` call carries from step to step: the progress bar, the open
    metrics log, and the loss and tokens summed since the last log line."""

    bar: Any
    log: Any  # the metrics.jsonl handle; None on ranks other than 0
    loss_sum: torch.Tensor
    last_step: int
    tokens: int = 0
    last_time: float = field(default_factory=time.perf_counter)
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """Builds tokenizer, data, model and optimizer from a TrainConfig and runs the loop."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.dist, self.device = init_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.fast_cpu and self.device.type == "cpu":
            from ..kernels import fast_cpu

            fast_cpu(True)
        self.main = self.dist.main
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)  # the same initial weights on every rank (FSDP shards them as they are)

        self.tokenizer = self._tokenizer()
        self.model_config = self._model_config()
        self.model = self._model()
        self.data: Datasets = self._datasets()
        if config.data.group_by_length:
            self.data.train.group_by_length(config.batch_size)
        window = self._window()
        self.precision, self.amp_dtype = self._precision()
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.fsdp = self.dist.enabled and config.distributed == "fsdp"
        self.wrapped = wrap_model(self.model, config.distributed, self.dist, self.device)
        self.optimizer = make_optimizer(self.model if config.distributed != "fsdp" else self.wrapped, config.optim,
                                        self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config.optim, config.max_steps))
        self.forward = torch.compile(self.wrapped) if config.compile else self.wrapped
        seed_everything(config.seed + self.dist.rank)  # dropout differs across ranks

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
    def _precision(self) -> tuple[str, Optional[torch.dtype]]:
        """bf16 only where the device multiplies it natively: emulated bf16 on a CPU without
        AVX512_BF16/AMX is ~100x slower than fp32, so an explicit bf16 falls back, saying why."""
        config = self.config
        precision = resolve_precision(config.precision, self.device, strict=config.strict_precision)
        if self.main:
            logger.info("precision %s (asked: %s; %s)", precision, config.precision, cpu_info().describe()
                        if self.device.type == "cpu" else self.device.type)
        return precision, torch.bfloat16 if precision == "bf16" else None

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
            if self.main:
                self._train_tokenizer(spec).save(saved)
            barrier(self.dist)
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

            # weights train in fp32 (autocast does the bf16 part), whatever dtype the folder stores
            model = load_model(self.config.init_from, dtype=torch.float32).train()
        else:
            model = TransformerLM(self.model_config)
        return model.to(self.device)

    def _datasets(self) -> Datasets:
        """Train and validation batches; checks that the objective suits the model."""
        config = self.config
        if not self.main:  # rank 0 tokenizes; the others wait and reuse its shards
            barrier(self.dist)
        data = load_datasets(config.data, self.tokenizer, self.model_config.family, config.seed,
                             progress=config.progress and self.main)
        if self.main:
            barrier(self.dist)
        d, family = config.data, self.model_config.family
        allowed = {"causal": ("decoder-only",), "masked": ("encoder-only",), "denoise": ("encoder-decoder",),
                   "seq2seq": ("encoder-decoder", "decoder-only"), "chat": ("encoder-decoder", "decoder-only")}
        if family not in allowed[d.objective]:
            raise ValueError(f"data.objective={d.objective!r} needs a model that is {' or '.join(allowed[d.objective])}; "
                             f"the model is {family} (num_encoder_layers={self.model_config.num_encoder_layers}, "
                             f"num_decoder_layers={self.model_config.num_decoder_layers})")
        need = positions_needed(d, family)
        if need > self.model_config.max_position_embeddings:
            raise ValueError(f"data needs {need} positions (data.seq_len / max_source_len / max_target_len) but "
                             f"model.max_position_embeddings is {self.model_config.max_position_embeddings}")
        return data

    def _window(self) -> int:
        """Tokens per training sample, for the FLOP (MFU) estimate."""
        return positions_needed(self.config.data, self.model_config.family)

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
        training = self.wrapped.training
        options = {}
        if training and self.config.label_smoothing:
            options["label_smoothing"] = self.config.label_smoothing
        if training and self.config.router_aux_loss_coef and self.model_config.num_experts:
            options["router_aux_loss_coef"] = self.config.router_aux_loss_coef
        return self.forward(**batch, **options).loss

    def _loss_weight(self, batch: dict) -> torch.Tensor:
        """How many items ``compute_loss`` averaged over: the batch's weight in the validation mean."""
        labels = batch["labels"][:, 1:] if self.model_config.family == "decoder-only" else batch["labels"]
        return (labels != IGNORE_INDEX).sum()


    # ------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run until max_steps, early stopping or target_loss; returns the final metrics."""
        c = self.config
        eval_every = c.eval_interval or c.max_steps
        ckpt_every = c.checkpoint_interval if c.checkpoint_interval is not None else c.eval_interval
        ckpt_every = ckpt_every or c.max_steps
        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = self._bar()
        log = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") if self.main else None
        progress = _Progress(bar, log, torch.zeros((), device=self.device), self.step)
        stop = None
        self.wrapped.train()
        try:
            while self.step < c.max_steps and stop is None:  # c.max_steps is read live: a subclass may end early
                self._optimizer_step(params, progress)
                progress.bar.update(1)
                done = self.step >= c.max_steps
                if self.step % c.log_interval == 0 or done:
                    self._log_training(progress)
                if self.step % eval_every == 0 or done:
                    stop = self._validate(progress)
                self.wrapped.train()
                if self.step % ckpt_every == 0 or done or stop:
                    self.save_checkpoint()
        finally:
            progress.bar.close()
            if log:
                log.close()
        return self._summary(stop or "max_steps", progress.start)

    def _optimizer_step(self, params: list, progress: _Progress) -> None:
        """One step of the global batch: grad_accum micro-batches (gradients synchronised across
        ranks on the last one only), clipping, AdamW, the schedule."""
        c, model = self.config, self.wrapped
        for micro in range(c.grad_accum):
            batch = self._to_device(self.data.train.batch(self._indices(self.step, micro)))
            progress.tokens += self._tokens_in(batch)
            sync = nullcontext()
            if self.dist.enabled and micro < c.grad_accum - 1 and hasattr(model, "no_sync"):
                sync = model.no_sync()
            with sync:
                with self._autocast():
                    loss = self.compute_loss(batch)
                if c.grad_accum > 1:
                    loss = loss / c.grad_accum
                loss.backward()
            progress.loss_sum += loss.detach()
        if c.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, c.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _log_training(self, progress: _Progress) -> None:
        """Mean loss, tokens/s and MFU since the last log line: the only read-back of the loss."""
        p = progress
        loss_value = mean_across_ranks(p.loss_sum, self.dist) / (self.step - p.last_step)
        now = time.perf_counter()
        tps = p.tokens * self.dist.world / (now - p.last_time)
        mfu = tps * self.flops_per_token / (self.peak_flops * self.dist.world)
        record = {"step": self.step, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": round(tps, 1), "mfu": round(mfu, 5), "elapsed_s": round(now - p.start, 3)}
        self._log(p.log, record)
        p.bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}", refresh=False)
        p.loss_sum.zero_()
        p.last_time, p.last_step, p.tokens = now, self.step, 0

    def _validate(self, progress: _Progress) -> Optional[str]:
        """Evaluate, log, keep the best model; returns why to stop now (target_loss,
        early_stopping), or None to go on."""
        c = self.config
        val = self.evaluate()
        record = {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50)),
                  "elapsed_s": round(time.perf_counter() - progress.start, 3)}
        self._log(progress.log, record)
        if self.main:
            message = f"step {self.step}: val loss {val:.4f}, ppl {record['val_ppl']:.2f}"
            progress.bar.write(message) if c.progress else logger.info(message)
        if val < self.best_loss - c.early_stopping_min_delta:
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        if val < self.best_loss:
            self.best_loss = val
            self._save_best()
        self._plot()
        if c.target_loss is not None and val <= c.target_loss:
            return "target_loss"
        if c.early_stopping_patience and self.bad_evals >= c.early_stopping_patience:
            return "early_stopping"
        return None

    def _summary(self, stop_reason: str, start: float) -> dict:
        wall = time.perf_counter() - start
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
        sum_across_ranks(total, self.dist)
        return float(total[0] / total[1].clamp(min=1))

    # ------------------------------------------------------------ saving
    def save_checkpoint(self) -> Optional[Path]:
        """Write ``checkpoints/step-N`` (complete or not at all), point ``latest`` at it, prune old ones."""
        model_state, optim_state = full_state_dicts(self.model, self.wrapped, self.optimizer, self.fsdp)
        rng = gather_objects(rng_state(), self.dist)
        if not self.main:
            barrier(self.dist)
            return None
        state = {"step": self.step, "samples_seen": self.step * self.global_batch, "world_size": self.dist.world,
                 "optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": rng,
                 "best_loss": self.best_loss, "bad_evals": self.bad_evals,
                 "train_config": json.dumps(self.config.to_dict())}
        path = save_checkpoint_folder(self.out_dir, self.step, self.model_config, model_state, self.tokenizer, state,
                                      keep=self.config.keep_checkpoints)
        barrier(self.dist)
        return path

    def _save_best(self) -> None:
        """``<out_dir>/best``: the model of the best validation loss so far, a plain zenlm folder."""
        model_state = full_state_dicts(self.model, self.wrapped, self.optimizer, self.fsdp)[0] if self.fsdp \
            else unique_state_dict(self.model)
        if not self.main:
            return
        write_model_folder(self.out_dir / "best", self.model_config, model_state, self.tokenizer,
                           metadata=self.best_metadata())

    def best_metadata(self) -> dict:
        """safetensors metadata of a best model: the step and validation loss it was saved at."""
        return {"format": "pt", "step": str(self.step), "val_loss": repr(self.best_loss)}

    def _plot(self) -> None:
        """Loss curve PNG (train and validation) next to metrics.jsonl."""
        if self.main and self.config.plot:
            plot_losses(self.history, self.out_dir / "loss.png",
                        f"{self.model_config.family}, {self.config.data.objective}")

    # ------------------------------------------------------------ resume
    def _resume(self) -> None:
        """Continue from ``resume`` (auto: the latest complete checkpoint in out_dir, if any):
        weights, optimizer, schedule, RNG streams and the metrics up to that step."""
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
        state = load_trainer_state(path)
        weights = path / "model.safetensors"
        load_full_state(self.model, self.wrapped, self.optimizer, load_weights(weights), state["optimizer"], weights,
                        self.fsdp)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.best_loss, self.bad_evals = state["best_loss"], state["bad_evals"]
        if state["world_size"] == self.dist.world:
            set_rng_state(state["rng"][self.dist.rank])
        else:
            logger.warning("resuming with %d processes from a %d-process checkpoint: RNG streams restart",
                           self.dist.world, state["world_size"])
        if self.main:  # keep the metrics up to the checkpoint; a killed run may have logged past it
            self.history = trim_metrics(self.out_dir / "metrics.jsonl", self.step)
            logger.info("resumed from %s at step %d", path, self.step)


def run_trainer(trainer: Trainer) -> dict:
    """Run ``trainer`` to the end and leave the process group; under torchrun every process calls this."""
    try:
        return trainer.train()
    finally:
        shutdown(trainer.dist)


def train(config: TrainConfig) -> dict:
    """Train as the config says; under torchrun every process calls this."""
    return run_trainer(Trainer(config))


__all__ = ["Trainer", "train", "run_trainer", "lr_lambda", "make_optimizer", "measure_peak_flops",
           "enable_activation_checkpointing", "positions_needed"]
