"""LoRA adapters (Hu et al., 2021): train a low-rank update ``W + (alpha/r)·B·A`` per chosen Linear.

Only the adapter matrices train; the base weights stay frozen and keep their
state-dict names, so a LoRA-wrapped model still reads and writes its base
checkpoint. An adapter is saved alone (``adapter.safetensors`` + ``adapter.json``
holding its settings and a fingerprint of the base's tensor shapes), a few hundred
kilobytes instead of the whole model, and is checked against the base before it
loads onto it. ``merge`` folds the update into the base weights for inference at
no extra cost; ``unmerge`` takes it out again.

Targets are chosen by name pattern over the model's Linear modules: a pattern
matches a module whose name equals it, ends with ``.pattern``, or matches it as a
glob (``decoder.layers.*.attn.qkv``). zenlm's Linear names are ``attn.qkv``,
``attn.out``, ``cross_attn.q``, ``cross_attn.kv``, ``cross_attn.out``,
``mlp.fc_in`` and ``mlp.fc_out``.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write, load_weights, save_weights

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
DEFAULT_TARGETS = ("attn.qkv", "attn.out", "cross_attn.q", "cross_attn.kv", "cross_attn.out")


@dataclass
class LoRAConfig:
    """Rank, scale (``alpha / rank``), dropout on the adapter's input, and which Linears get one."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"lora target_modules must be a non-empty list of name patterns, got "
                             f"{self.target_modules!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, data: dict) -> LoRAConfig:
        known = {"rank", "alpha", "dropout", "target_modules"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown lora keys {unknown}; valid: {sorted(known)}")
        return cls(**data)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` that shares its base's weight and bias (same names in the state dict)
    and adds ``lora_A`` (rank × in) and ``lora_B`` (out × rank). B starts at zero, so a fresh
    adapter leaves the model's outputs unchanged."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scale = config.rank, config.scale
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, and as the LoRA paper's code
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False

    def delta(self) -> torch.Tensor:
        """The update the adapter adds to the base weight: scale · B · A."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


# --------------------------------------------------------------------------- applying
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, **options) -> list[str]:
    """Wrap every Linear whose name matches ``config.target_modules`` and freeze everything
    else. Returns the wrapped module names; a pattern that matches nothing is an error
    (a typo would otherwise train nothing at all), except ``cross_attn.*`` patterns on a
    model without cross-attention, so the default targets suit every family."""
    config = config or LoRAConfig(**options)
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA adapters; merge_and_unload() it first")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, config.target_modules)]
    has_cross = any(n.endswith(".cross_attn") for n, _ in model.named_modules())
    unused = [p for p in config.target_modules if not any(_matches(n, [p]) for n in names)
              and (has_cross or not p.startswith("cross_attn."))]  # defaults serve decoder-only models too
    if unused or not names:
        unused = unused or list(config.target_modules)
        linears = sorted({n.split(".", 3)[-1] if n.count(".") >= 3 else n
                          for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora target pattern {unused[0]!r} matches no Linear module of this model; "
                         f"its Linear names include: {', '.join(linears[:12])}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, config).train(base.training))
    model.lora_config = config
    model.lora_modules = names
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``<module>.lora_A`` / ``.lora_B``)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().contiguous()
        out[f"{name}.lora_B"] = layer.lora_B.detach().contiguous()
    return out


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (outputs unchanged, no adapter cost at inference)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Take merged adapters out of the base weights again."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace each LoRALinear by a plain Linear: a normal model to save or serve."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight, plain.bias = layer.weight, layer.bias
        _set_module(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora_config = None
    model.lora_modules = []
    return model


# --------------------------------------------------------------------------- files
def base_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Shapes of the base model's tensors (adapter tensors left out), by state-dict name."""
    return {n: list(t.shape) for n, t in model.state_dict().items() if ".lora_" not in n}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` (settings, targets, base fingerprint)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save; apply_lora() first")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("adapters are merged into the base weights; unmerge() before saving them")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"lora": asdict(config), "modules": list(model.lora_modules), "base": base_fingerprint(model)}
    base_config = getattr(model, "config", None)
    if base_config is not None and hasattr(base_config, "family"):
        info["base_family"] = base_config.family
    tensors = {k: v.cpu() for k, v in lora_state_dict(model).items()}
    save_weights(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt", "kind": "zenlm-lora"})
    text = json.dumps(info, indent=1, sort_keys=True) + "\n"
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


def read_adapter_info(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {directory} (missing {ADAPTER_CONFIG})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or not {"lora", "modules", "base"} <= set(info):
        raise ValueError(f"{path} is not a zenlm adapter description (needs lora, modules, base)")
    return info


def check_base(model: nn.Module, info: dict, source: str | os.PathLike = "adapter") -> None:
    """Refuse a base whose tensors differ from the one the adapter was trained on, naming the
    first tensor that differs and both shapes."""
    have = base_fingerprint(model)
    targeted = [f"{m}.weight" for m in info["modules"] if f"{m}.weight" in info["base"]]
    for name in targeted + [n for n in info["base"] if n not in targeted]:  # the adapted weights first
        shape = info["base"][name]
        if name not in have:
            raise ValueError(f"{source} was trained on a base with tensor {name!r} {tuple(shape)}, "
                             f"which this model does not have")
        if list(have[name]) != list(shape):
            raise ValueError(f"{source} does not fit this base: tensor {name!r} has shape {tuple(have[name])} here, "
                             f"the adapter's base had {tuple(shape)}")
    extra = [n for n in have if n not in info["base"]]
    if extra:
        raise ValueError(f"{source} does not fit this base: tensor {extra[0]!r} is not in the adapter's base")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Check the base, wrap the same modules and load the adapter tensors. Nothing in the
    model changes unless everything checks out."""
    directory = Path(directory)
    info = read_adapter_info(directory)
    config = LoRAConfig.from_dict(info["lora"])
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA adapters; merge_and_unload() it first")
    check_base(model, info, directory)
    tensors = load_weights(directory / ADAPTER_WEIGHTS)
    modules = list(info["modules"])
    for name in modules:
        linear = model.get_submodule(name)
        for part, shape in (("lora_A", (config.rank, linear.in_features)),
                            ("lora_B", (linear.out_features, config.rank))):
            key = f"{name}.{part}"
            if key not in tensors:
                raise ValueError(f"{directory / ADAPTER_WEIGHTS}: missing tensor {key!r}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{directory / ADAPTER_WEIGHTS}: tensor {key!r} has shape "
                                 f"{tuple(tensors[key].shape)}, this base needs {shape}")
    unexpected = sorted(set(tensors) - {f"{n}.{p}" for n in modules for p in ("lora_A", "lora_B")})
    if unexpected:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: unexpected tensor {unexpected[0]!r}")
    config.target_modules = modules  # exact names: wrap exactly what was trained
    apply_lora(model, config)
    layers = lora_layers(model)
    with torch.no_grad():
        for name in modules:
            layers[name].lora_A.copy_(tensors[f"{name}.lora_A"])
            layers[name].lora_B.copy_(tensors[f"{name}.lora_B"])
    return modules


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def load_with_adapter(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None,
                      merged: bool = True) -> nn.Module:
    """A model folder, with a LoRA adapter loaded onto it (checked against the base) and, by
    default, merged so that inference costs nothing extra."""
    from .folders import load

    model = load(model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
        if merged:
            merge_and_unload(model)
        model.eval()
    return model


__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "base_fingerprint",
    "check_base",
    "load_adapter",
    "load_with_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge",
    "merge_and_unload",
    "read_adapter_info",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
