"""LoRA adapters (Hu et al., 2021): train a low-rank update ``W + (alpha/r)·B·A`` per chosen Linear.

Only the adapter matrices train; the base weights stay frozen and keep their
state-dict names, so a LoRA-wrapped model still reads and writes its base
checkpoint. An adapter is saved alone (``adapter.safetensors`` + ``adapter.json``
holding its settings and a fingerprint of the base's tensor shapes), a few hundred
kilobytes instead of the whole model, and is checked against the base before it
loads onto it. ``merge`` folds the update into the base weights for inference at
no extra cost; ``unmerge`` takes it out again.

Adapters also travel in the ecosystem's format: ``save_adapter(model, dir, format="peft")``
writes a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, named after the
Hugging Face modules of the model's family) that ``peft.PeftModel.from_pretrained`` loads onto
the transformers model, and ``load_adapter`` reads PEFT folders (LoRA with ``bias: none``;
``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` honoured; ``lora_dropout`` acts only in
training). zenlm's fused q|k|v and gate|up Linears are converted exactly both ways; the
comment above ``PEFT_CONFIG`` gives the argument.

Targets are chosen by name pattern over the model's Linear modules: a pattern
matches a module whose name equals it, ends with ``.pattern``, or matches it as a
glob (``decoder.layers.*.attn.qkv``). zenlm's Linear names are ``attn.qkv``,
``attn.out``, ``cross_attn.q``, ``cross_attn.kv``, ``cross_attn.out``,
``mlp.fc_in`` and ``mlp.fc_out``.

Why it is one long module: zenlm's own adapter files and PEFT folders are two encodings of the same
adapter, sharing the target patterns, the base fingerprint check and the name maps to Hugging Face.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
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

    def __init__(self, base: nn.Linear, config: LoRAConfig, rank: int | None = None, scale: float | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        # a layer may have its own rank and scale (a PEFT adapter loaded onto a fused layer, see load_adapter)
        self.rank = config.rank if rank is None else rank
        self.scale = config.scale if scale is None else scale
        self.peft_blocks = None  # see _load_peft: which columns of B belong to which HF projection
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **factory))
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
    _install(model, config, {name: (None, None) for name in names})
    return names


def _install(model: nn.Module, config: LoRAConfig, layers: dict[str, tuple[int | None, float | None]]) -> None:
    """Freeze the model and wrap each named Linear, with its own (rank, scale) where not None."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (rank, scale) in layers.items():
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, config, rank, scale).train(base.training))
    model.lora_config = config
    model.lora_modules = list(layers)


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


def save_adapter(model: nn.Module, directory: str | os.PathLike, format: str = "zenlm",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter alone.

    ``format="zenlm"``: ``adapter.safetensors`` and ``adapter.json`` (settings, targets, base
    fingerprint). ``format="peft"``: a PEFT folder (``adapter_config.json`` and
    ``adapter_model.safetensors``) in the Hugging Face module names of the model's family, which
    ``peft.PeftModel.from_pretrained`` loads onto the transformers model (see ``_save_peft`` for
    how a fused zenlm layer becomes one adapter per HF projection, exactly).
    ``base_model_name_or_path`` is written into a PEFT config (where transformers' base is)."""
    if format not in ADAPTER_FORMATS:
        raise ValueError(f"adapter format must be one of {', '.join(ADAPTER_FORMATS)}, got {format!r}")
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save; apply_lora() first")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("adapters are merged into the base weights; unmerge() before saving them")
    directory = Path(directory)
    if format == "peft":
        return _save_peft(model, directory, base_model_name_or_path)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"lora": asdict(config), "modules": list(model.lora_modules), "base": base_fingerprint(model)}
    own = {name: {"rank": layer.rank, "scale": layer.scale} for name, layer in lora_layers(model).items()
           if layer.rank != config.rank or layer.scale != config.scale}
    if own:  # layers with their own rank or scale (a PEFT adapter loaded onto fused layers)
        info["layers"] = own
    base_config = getattr(model, "config", None)
    if base_config is not None and hasattr(base_config, "family"):
        info["base_family"] = base_config.family
    tensors = {k: v.cpu() for k, v in lora_state_dict(model).items()}
    save_weights(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt", "kind": "zenlm-lora"})
    text = json.dumps(info, indent=1, sort_keys=True) + "\n"
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_adapter_info(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {directory} (missing {ADAPTER_CONFIG})")
    info = _read_json(path)
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


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """A PEFT adapter folder (``adapter_config.json``) rather than a zenlm one (``adapter.json``)."""
    directory = Path(directory)
    return (directory / PEFT_CONFIG).is_file() and not (directory / ADAPTER_CONFIG).is_file()


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Check the base, wrap the same modules and load the adapter tensors. Nothing in the
    model changes unless everything checks out.

    A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) loads too, onto a
    model of a Hugging Face family zenlm maps (see ``_load_peft``)."""
    directory = Path(directory)
    if is_peft_folder(directory):
        return _load_peft(model, directory)
    info = read_adapter_info(directory)
    config = LoRAConfig.from_dict(info["lora"])
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA adapters; merge_and_unload() it first")
    check_base(model, info, directory)
    tensors = load_weights(directory / ADAPTER_WEIGHTS)
    modules = list(info["modules"])
    own = info.get("layers") or {}
    layers = {name: (own[name]["rank"], float(own[name]["scale"])) if name in own else (None, None)
              for name in modules}
    for name in modules:
        linear = model.get_submodule(name)
        rank = layers[name][0] or config.rank
        for part, shape in (("lora_A", (rank, linear.in_features)),
                            ("lora_B", (linear.out_features, rank))):
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
    _install(model, config, layers)
    found = lora_layers(model)
    with torch.no_grad():
        for name in modules:
            found[name].lora_A.copy_(tensors[f"{name}.lora_A"])
            found[name].lora_B.copy_(tensors[f"{name}.lora_B"])
    return modules


# --------------------------------------------------------------------------- PEFT folders
# How a fused zenlm Linear meets PEFT. zenlm keeps q|k|v in one Linear ``attn.qkv`` (rows: q, then
# k, then v) and gate|up in one ``mlp.fc_in``; Hugging Face models (and so PEFT) have one Linear per
# projection, and PEFT one (A, B) pair per Linear.
#
# zenlm -> PEFT. The fused update is s·B·A with A (r × in) and B (rows × r). Split B by output rows
# into B_q, B_k, B_v: then the q rows of the update are s·B_q·A, and so on. PEFT's q_proj gets
# (A, B_q), k_proj (A, B_k), v_proj (A, B_v), with the same r and alpha: every projection's output
# is W_x·x + s·B_x·(A·x), the very rows the fused layer computes. A is written once per projection
# (3 copies), nothing is approximated; the only difference is floating-point summation order.
#
# PEFT -> zenlm. PEFT's A_q, A_k, A_v are in general different (and ranks may differ), so no rank-r
# pair on the fused layer can hold them. The exact representation is block-structured:
# A = [A_q; A_k; A_v] (r_q + r_k + r_v rows) and B block-diagonal, B_q in the q rows and the first
# r_q columns, B_k in the k rows and the next r_k columns, and so on, zeros elsewhere; then
# B·A = [B_q·A_q; B_k·A_k; B_v·A_v], row for row PEFT's three updates. A projection without an
# adapter (PEFT's common ``q_proj, v_proj``) contributes no columns and its rows of B stay zero.
# When the A's are identical and the scales equal (a folder zenlm wrote), the rank-r form with the
# shared A is used instead, so zenlm -> PEFT -> zenlm gives back the same tensors. Different
# per-projection scales (``alpha_pattern``) are folded into B's blocks. The layer remembers which
# columns came from which projection (``peft_blocks``) so that, while the blocks outside stay zero,
# saving as PEFT again writes the original per-projection pairs rather than 3 copies of A.
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_FORMATS = ("zenlm", "peft")
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight")
# PEFT settings that change what the adapter computes and that zenlm's LoRA cannot represent
_PEFT_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "a trained bias in lora_B", "modules_to_save": "modules_to_save",
                     "trainable_token_indices": "trainable tokens", "target_parameters": "LoRA on parameters",
                     "layer_replication": "layer replication", "alora_invocation_tokens": "aLoRA"}


def _hf_side(model: nn.Module):
    """The Hugging Face family this model exports as, and whether its HF names carry the head
    model's prefix (as ``zenlm.hf.save_hf`` writes it)."""
    from .hf import BERT, family_for
    from .model import TransformerLM

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("PEFT adapters need a zenlm model (one with a config) of a Hugging Face family")
    try:
        family = family_for(config)
    except ValueError as e:
        raise ValueError(f"PEFT adapters are named after the Hugging Face model; {e}") from None
    head = isinstance(model, TransformerLM) and (family is not BERT or bool(config.mlm_transform))
    return family, head


def _part_sizes(parts: int, rows: int, config) -> list[int]:
    """Rows of each HF projection in a fused Linear: q|k|v by the head counts, else equal parts."""
    if parts == 3:
        kv = config.num_key_value_heads * config.head_dim
        return [rows - 2 * kv, kv, kv]
    return [rows // parts] * parts


def _hf_parts(model: nn.Module, family, head: bool, name: str) -> list[tuple[str, int, int]] | None:
    """The HF Linear modules behind our Linear ``name``, each with the rows of our weight it holds
    (one entry for a plain rename, several for a fused layer); None if the family has none."""
    from .hf.weights import hf_names

    try:
        names = hf_names(family, [f"{name}.weight"], head, model.config)
    except ValueError:
        return None
    rows = model.get_submodule(name).out_features
    out, start = [], 0
    for hf, size in zip(names, _part_sizes(len(names), rows, model.config) if len(names) > 1 else [rows]):
        out.append((hf.removesuffix(".weight"), start, start + size))
        start += size
    return out


def _blocks_hold(layer: LoRALinear, parts: list[tuple[str, int, int]]) -> bool:
    """Whether B is still zero outside the per-projection blocks ``layer.peft_blocks``."""
    blocks = layer.peft_blocks
    if blocks is None or len(blocks) != len(parts):
        return False
    mask = torch.ones_like(layer.lora_B, dtype=torch.bool)
    for (_, lo, hi), cols in zip(parts, blocks):
        if cols is not None:
            mask[lo:hi, cols[0]:cols[1]] = False
    return not layer.lora_B.detach()[mask].any()


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _save_peft(model: nn.Module, directory: Path, base_model_name_or_path: str | None) -> Path:
    """The PEFT folder of this model's adapters (see the comment above ``PEFT_CONFIG``)."""
    from .hf.weights import layer_template

    config = model.lora_config
    family, head = _hf_side(model)
    tensors: dict[str, torch.Tensor] = {}
    targets, ranks, alphas, transposed = [], {}, {}, []
    for name, layer in lora_layers(model).items():
        parts = _hf_parts(model, family, head, name)
        if parts is None:
            raise ValueError(f"LoRA module {name!r} has no {family.model_type} counterpart, so no PEFT name")
        A, B = layer.lora_A.detach().cpu(), layer.lora_B.detach().cpu()
        blocks = layer.peft_blocks if _blocks_hold(layer, parts) else [(0, layer.rank)] * len(parts)
        for (hf, lo, hi), cols in zip(parts, blocks):
            if cols is None:  # a projection the loaded PEFT adapter did not target, still without an update
                continue
            a, b = A[cols[0]:cols[1]], B[lo:hi, cols[0]:cols[1]]
            tensors[f"base_model.model.{hf}.lora_A.weight"] = a.clone().contiguous()
            tensors[f"base_model.model.{hf}.lora_B.weight"] = b.clone().contiguous()
            targets.append(hf)
            rank, alpha = a.shape[0], layer.scale * a.shape[0]
            if rank != config.rank:
                ranks[re.escape(hf)] = rank
            if not math.isclose(alpha, config.alpha, rel_tol=1e-12):
                alphas[re.escape(hf)] = _number(alpha)
            transposed.append(layer_template(f"{name}.weight")[0] in family.transposed)
    # short names ("q_proj") when they select exactly the adapted modules, the full names otherwise
    everything = [hf for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  for hf, _, _ in (_hf_parts(model, family, head, n) or [])]
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    compact = {hf for hf in everything if hf.rsplit(".", 1)[-1] in leaves} == set(targets)
    task = ("SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM") if head else None
    peft_config = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": config.rank, "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout, "use_rslora": False, "bias": "none",
        "target_modules": leaves if compact else sorted(targets), "rank_pattern": ranks, "alpha_pattern": alphas,
        "fan_in_fan_out": bool(transposed) and all(transposed), "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "use_dora": False,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, directory / PEFT_WEIGHTS, metadata={"format": "pt"})
    text = json.dumps(peft_config, indent=2) + "\n"
    atomic_write(directory / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


def read_peft_config(directory: str | os.PathLike) -> dict:
    """A PEFT ``adapter_config.json``, checked for what zenlm's LoRA represents exactly: LoRA,
    ``bias: none``, no DoRA or extra trained modules. ``lora_dropout`` only acts in training."""
    path = Path(directory) / PEFT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no PEFT adapter at {directory} (missing {PEFT_CONFIG})")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a PEFT adapter config (a JSON object)")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; zenlm loads LoRA adapters "
                         "(peft_type 'LORA')")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r} is not supported; zenlm's LoRA trains no biases "
                         "(needs bias 'none')")
    for key, what in _PEFT_UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported ({what}); zenlm loads plain LoRA")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{path}: r must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{path}: lora_alpha must be > 0, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"{path}: {key} must be an object, got {cfg[key]!r}")
    return cfg


def _peft_pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_peft_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    if (directory / PEFT_WEIGHTS).is_file():
        return load_weights(directory / PEFT_WEIGHTS), directory / PEFT_WEIGHTS
    if (directory / PEFT_WEIGHTS_BIN).is_file():
        try:
            return torch.load(directory / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True), \
                directory / PEFT_WEIGHTS_BIN
        except Exception as e:  # noqa: BLE001 (pickle errors of every kind): name the file
            raise ValueError(f"{directory / PEFT_WEIGHTS_BIN} is not a readable tensor file: {e}") from None
    raise FileNotFoundError(f"no PEFT adapter weights at {directory} (missing {PEFT_WEIGHTS})")


def _load_peft(model: nn.Module, directory: Path) -> list[str]:
    """Load a PEFT LoRA folder onto ``model`` (see the comment above ``PEFT_CONFIG``). Long because
    it is one check per way a PEFT folder can fail to fit the model (unknown tensor, unknown module,
    missing half, wrong shape), each with its own error, before anything is attached."""
    cfg = read_peft_config(directory)
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA adapters; merge_and_unload() it first")
    tensors, source = _read_peft_tensors(directory)
    family, head = _hf_side(model)
    index: dict[str, tuple[str, int]] = {}  # HF module (with and without the head prefix) -> (ours, part)
    fused: dict[str, list[tuple[str, int, int]]] = {}
    for name, module in model.named_modules():
        parts = _hf_parts(model, family, head, name) if isinstance(module, nn.Linear) else None
        for i, (hf, _, _) in enumerate(parts or []):
            fused[name] = parts
            for alias in (hf, hf.removeprefix(family.prefix), family.prefix + hf):
                index.setdefault(alias, (name, i))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{source}: tensor {key!r} is not the lora_A/lora_B of a Linear layer; zenlm loads "
                             "plain LoRA (no LoRA on embeddings, DoRA magnitudes or saved modules)")
        pairs.setdefault(m["module"], {})[m["part"]] = tensor
    if not pairs:
        raise ValueError(f"{source} holds no LoRA tensors")
    rslora = bool(cfg.get("use_rslora"))
    grouped: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for hf, ab in sorted(pairs.items()):
        if hf not in index:
            known = sorted({h.rsplit(".", 1)[-1] for h in index})
            raise ValueError(f"{source}: module {hf!r} has no counterpart in zenlm's {family.model_type} model "
                             f"(its Linear layers are named {', '.join(known)})")
        for part in "AB":
            if part not in ab:
                raise ValueError(f"{source}: missing tensor for {hf!r}.lora_{part}")
        name, i = index[hf]
        linear, (_, lo, hi) = model.get_submodule(name), fused[name][i]
        a, b = ab["A"], ab["B"]
        rank = _peft_pattern(cfg.get("rank_pattern"), hf, cfg.get("r", 8))
        for what, tensor, shape in (("lora_A", a, (rank, linear.in_features)), ("lora_B", b, (hi - lo, rank))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{source}: {hf}.{what} has shape {tuple(tensor.shape)}, this base with rank "
                                 f"{rank} needs {shape}")
        alpha = _peft_pattern(cfg.get("alpha_pattern"), hf, cfg.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        grouped.setdefault(name, {})[i] = (a.to(linear.weight.dtype), b.to(linear.weight.dtype), scale)
    # one (A, B, scale, blocks) per zenlm Linear: shared A when possible, else block-diagonal (exact either way)
    built = {}
    for name, got in grouped.items():
        linear, parts = model.get_submodule(name), fused[name]
        first = got[min(got)]
        shared = all(torch.equal(a, first[0]) and s == first[2] for a, _, s in got.values())
        if shared:
            A, rank = first[0], first[0].shape[0]
            blocks = [(0, rank) if i in got else None for i in range(len(parts))]
        else:
            A, blocks, start = torch.cat([got[i][0] for i in sorted(got)]), [None] * len(parts), 0
            for i in sorted(got):
                blocks[i] = (start, start + got[i][0].shape[0])
                start = blocks[i][1]
            rank = start
        B = torch.zeros(linear.out_features, rank, dtype=linear.weight.dtype)
        for i, (_, b, s) in got.items():
            (_, lo, hi), cols = parts[i], blocks[i]
            B[lo:hi, cols[0]:cols[1]] = b if s == first[2] else b * (s / first[2])
        built[name] = (A, B, first[2], blocks)
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    default_scale = alpha / (math.sqrt(r) if rslora else r)
    dropout = cfg.get("lora_dropout") or 0.0  # acts only in training
    config = LoRAConfig(rank=r, alpha=default_scale * r, dropout=float(dropout) if 0 <= dropout < 1 else 0.0,
                        target_modules=list(built))
    _install(model, config, {name: (A.shape[0], scale) for name, (A, _, scale, _) in built.items()})
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (A, B, _, blocks) in built.items():
            layers[name].lora_A.copy_(A)
            layers[name].lora_B.copy_(B)
            layers[name].peft_blocks = blocks
    return list(built)


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
    "ADAPTER_FORMATS",
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "base_fingerprint",
    "check_base",
    "is_peft_folder",
    "load_adapter",
    "load_with_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge",
    "merge_and_unload",
    "read_adapter_info",
    "read_peft_config",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
