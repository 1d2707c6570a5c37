"""How long, how much energy and how much money a training run will take, before running it.

    FLOPs   = training FLOPs per token × tokens
              (≈ 6·N per token for N parameters: 2 forward + 4 backward, Kaplan et al. 2020;
               plus attention scores and values, 12·layers·seq·d, from ``config.estimate_costs``)
    seconds = FLOPs / (devices × peak FLOP/s × MFU)
    energy  = seconds × devices × watts;   cost = hours × devices × price per device-hour

MFU (model FLOPs utilisation) is the one number that decides the answer. For GPUs the default
(0.40) is what well-tuned dense-transformer runs report on A100/H100 (PaLM 46%, Megatron 30-55%).
For this machine's CPU it is *measured*: ``calibrate`` runs zenlm's own Trainer on a small
model for a few seconds, and the achieved MFU and the measured matmul peak are cached in
``~/.cache/zenlm/calibration.json`` (``zenlm estimate --calibrate``), so estimates here come
from the trainer's real throughput, not a datasheet.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or the whole CPU): dense peak FLOP/s at the training precision, board
    power, and a typical on-demand cloud price per device-hour (USD; override with --price-per-hour)."""

    name: str
    peak_flops: float
    watts: float
    price_per_hour: float
    default_mfu: float


# Datasheet dense (non-sparse) BF16 tensor-core peaks; power is the board TDP (SXM parts).
# Prices: typical 2025 on-demand per-GPU rates; the CPU entry is a 2-vCPU cloud instance.
HARDWARE: dict[str, Hardware] = {
    "a100": Hardware("a100", 312e12, 400.0, 1.80, 0.40),
    "h100": Hardware("h100", 989e12, 700.0, 3.00, 0.40),
}

CALIBRATION_FILE = "calibration.json"
CPU_WATTS = 65.0  # a 2-core slice of a server CPU package (an assumption: pass --watts to override)
CPU_PRICE = 0.10


def cache_dir() -> Path:
    return Path(os.environ.get("ZENLM_CACHE", Path.home() / ".cache" / "zenlm"))


@dataclass
class Estimate:
    parameters: float
    tokens: float
    flops_per_token: float
    flops: float
    hardware: str
    devices: int
    peak_flops: float
    mfu: float
    seconds: float
    energy_kwh: float
    cost: float
    price_per_hour: float
    watts: float
    attention_included: bool
    mfu_source: str

    def summary(self) -> str:
        days = self.seconds / 86400
        when = f"{self.seconds / 3600:,.1f} h" if days < 2 else f"{days:,.1f} days ({self.seconds / 3600:,.0f} h)"
        if self.seconds < 3600:
            when = f"{self.seconds:,.1f} s" if self.seconds < 120 else f"{self.seconds / 60:,.1f} min"
        lines = [
            f"parameters        {self.parameters:,.0f}",
            f"tokens            {self.tokens:,.0f}",
            f"FLOPs per token   {self.flops_per_token:.3g}" + ("" if self.attention_included else
                                                               " (6N; attention not counted: give --preset)"),
            f"training FLOPs    {self.flops:.3g}",
            f"hardware          {self.devices} x {self.hardware}, peak {self.peak_flops / 1e12:,.3g} TFLOP/s each, "
            f"MFU {self.mfu:.1%} ({self.mfu_source})",
            f"wall time         {when}",
            f"energy            {self.energy_kwh:,.3g} kWh ({self.watts:.0f} W per device)",
            f"cost              ${self.cost:,.2f} (${self.price_per_hour:.2f} per device-hour)",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- calibration
def load_calibration() -> Optional[dict]:
    path = cache_dir() / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def calibrate(model: Optional[dict] = None, steps: int = 40, batch_size: int = 8, seq_len: int = 128,
              threads: Optional[int] = None, save: bool = True, data: Optional[str] = None) -> dict:
    """Run zenlm's Trainer for ``steps`` steps on a small decoder-only model and read back its
    measured MFU (tokens/s × FLOPs per token ÷ measured matmul peak). The first logged interval
    (warm-up) is dropped; the median of the rest is kept."""
    from .train import TrainConfig, Trainer

    model = model or {"preset": "tiny", "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
                      "num_decoder_layers": 4, "max_position_embeddings": seq_len + 1}
    data = data or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt")
    if not Path(data).exists():
        raise FileNotFoundError(f"calibration text not found at {data}; pass data=<a text file>")
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_dict({
            "out_dir": out, "model": model, "tokenizer": {"kind": "char", "vocab_size": 256},
            "data": {"train": [data], "seq_len": seq_len, "sampling": "random"},
            "max_steps": steps, "batch_size": batch_size, "eval_interval": 0, "eval_batches": 1,
            "log_interval": max(1, steps // 8), "precision": "fp32", "threads": threads, "plot": False,
            "progress": False, "checkpoint_interval": 0, "optim": {"warmup_steps": 0}})
        trainer = Trainer(config)
        cpu_start = time.process_time()
        trainer.train()
        cpu_seconds = time.process_time() - cpu_start
        records = [r for r in trainer.history if "mfu" in r][1:]
    if not records:
        raise ValueError(f"calibration needs more steps to measure throughput (got steps={steps})")
    result = {"hardware": "cpu", "machine": platform.node(), "processor": platform.processor() or platform.machine(),
              "threads": threads, "peak_flops": trainer.peak_flops,
              "mfu": statistics.median(r["mfu"] for r in records),
              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
              "flops_per_token": trainer.flops_per_token, "model": model, "batch_size": batch_size,
              # FLOPs per second of this process's CPU time: on a shared machine wall time depends on
              # what else runs, CPU time much less, so this rate predicts CPU-seconds robustly
              "flops_per_cpu_second": steps * batch_size * (seq_len + 1) * trainer.flops_per_token / cpu_seconds,
              "seq_len": seq_len, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if save:
        path = cache_dir() / CALIBRATION_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------- the estimate
def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def estimate(tokens: float, preset: Optional[str] = None, params: Optional[float] = None,
             config=None, hardware: str = "cpu", mfu: Optional[float] = None,
             price_per_hour: Optional[float] = None, peak_flops: Optional[float] = None,
             watts: Optional[float] = None, devices: int = 1, seq_len: Optional[int] = None,
             calibration: Optional[dict] = None) -> Estimate:
    """Training FLOPs, wall time, energy and cost. Give exactly one of ``preset`` (a PRESETS
    name), ``config`` (a TransformerConfig) or ``params`` (a parameter count; attention FLOPs then
    cannot be counted). ``hardware="custom"`` needs ``peak_flops``; ``"cpu"`` uses the cached
    calibration of this machine (run ``calibrate`` first) unless peak and MFU are given. Its length
    is the argument checks of those three ways in and the one formula chain (FLOPs → time → energy
    → cost), kept in one place so each number's source is visible."""
    from .config import TransformerConfig, estimate_costs

    if sum(x is not None for x in (preset, params, config)) != 1:
        raise ValueError("give exactly one of --preset or --params (or a config)")
    _positive("tokens", tokens)
    _positive("mfu", mfu, allow_none=True)
    if mfu is not None and mfu > 1:
        raise ValueError(f"mfu is a fraction of peak in (0, 1], got {mfu!r}")
    if price_per_hour is not None and (not isinstance(price_per_hour, (int, float)) or not price_per_hour >= 0
                                       or not math.isfinite(price_per_hour)):
        raise ValueError(f"price_per_hour must be a number >= 0, got {price_per_hour!r}")
    _positive("peak_flops", peak_flops, allow_none=True)
    _positive("watts", watts, allow_none=True)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    if preset is not None:
        config = TransformerConfig.from_preset(preset)
    if config is not None:
        if seq_len is not None and not 0 < seq_len <= config.max_position_embeddings:
            raise ValueError(f"seq_len must be in [1, {config.max_position_embeddings}], got {seq_len}")
        costs = estimate_costs(config, 1, seq_len)
        n, per_token, attention = costs["parameters"], costs["training_flops_per_token"], True
    else:
        _positive("params", params)
        n, per_token, attention = float(params), 6.0 * float(params), False

    if hardware in HARDWARE:
        hw = HARDWARE[hardware]
        peak, source = peak_flops or hw.peak_flops, "given" if mfu is not None else "typical for large GPU runs"
        mfu = mfu if mfu is not None else hw.default_mfu
        watts = watts if watts is not None else hw.watts
        price = price_per_hour if price_per_hour is not None else hw.price_per_hour
    elif hardware == "cpu":
        cal = calibration if calibration is not None else load_calibration()
        if (peak_flops is None or mfu is None) and cal is None:
            raise ValueError("no CPU calibration for this machine yet: run `zenlm estimate --calibrate` "
                             "(about a minute), or pass --peak-flops and --mfu")
        peak = peak_flops or cal["peak_flops"]
        source = "given" if mfu is not None else f"measured by the trainer here, {cal['measured_at']}"
        mfu = mfu if mfu is not None else cal["mfu"]
        watts = watts if watts is not None else CPU_WATTS
        price = price_per_hour if price_per_hour is not None else CPU_PRICE
    elif hardware == "custom":
        if peak_flops is None or mfu is None or price_per_hour is None:
            raise ValueError("--hardware custom needs --peak-flops, --mfu and --price-per-hour")
        peak, source = peak_flops, "given"
        watts = watts if watts is not None else 0.0
        price = price_per_hour
    else:
        raise ValueError(f"unknown hardware {hardware!r}; valid: cpu, {', '.join(HARDWARE)}, custom")

    flops = per_token * tokens
    seconds = flops / (devices * peak * mfu)
    hours = seconds / 3600
    return Estimate(parameters=n, tokens=tokens, flops_per_token=per_token, flops=flops, hardware=hardware,
                    devices=devices, peak_flops=peak, mfu=mfu, seconds=seconds,
                    energy_kwh=hours * devices * watts / 1000, cost=hours * devices * price,
                    price_per_hour=price, watts=watts, attention_included=attention, mfu_source=source)


# --------------------------------------------------------------------------- the shape's costs, as text
def human_count(n: float, unit: str = "") -> str:
    """3 significant digits with a K/M/G/T/P suffix: 1574016 -> '1.57M'."""
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def human_bytes(n: float) -> str:
    """Binary units, one decimal: 6291456 -> '6.0 MiB'."""
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {suffix}"
        n /= 1024
    return f"{n:.1f} PiB"


def cost_summary(config, batch_size: int = 8, seq_len: Optional[int] = None, bytes_per_param: int = 4,
                 name: Optional[str] = None) -> str:
    """``zenlm info``'s table: the shape, parameters, FLOPs per token and training memory at a
    batch (``config.estimate_costs``), as text. ``name`` heads the first line (default: the family)."""
    from .config import estimate_costs

    c = estimate_costs(config, batch_size, seq_len, bytes_per_param)
    parts = ("weights", "grads", "optimizer", "activations")
    lines = [
        f"{name or config.family}: {config.family}, {config.num_encoder_layers}+{config.num_decoder_layers} layers, "
        f"d={config.hidden_size}, heads={config.num_attention_heads} (kv {config.num_key_value_heads}), "
        f"ffn={config.intermediate_size}, vocab={config.vocab_size}, {config.norm}/{config.activation}/{config.position}",
        f"parameters            {c['parameters']:,} ({human_count(c['parameters'])})",
        f"forward FLOPs/token   {human_count(c['forward_flops_per_token'])}",
        f"training FLOPs/token  {human_count(c['training_flops_per_token'])}",
        f"memory at batch {c['batch_size']} x {c['seq_len']} tokens ({bytes_per_param * 8}-bit weights):",
        *(f"  {key:<12} {human_bytes(c[key + '_bytes'])}" for key in parts),
        f"  {'total':<12} {human_bytes(sum(c[k + '_bytes'] for k in parts))}",
    ]
    return "\n".join(lines)


__all__ = ["Hardware", "HARDWARE", "Estimate", "estimate", "calibrate", "load_calibration", "cost_summary",
           "human_bytes", "human_count"]
