"""Checkpoints: config.json + model.safetensors (+ tokenizer.json), written atomically.

safetensors holds only tensors, so loading a file a user hands us can never run
code (unlike pickle). Every failure names the file and the tensor.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import TransformerConfig

PathLike = Union[str, os.PathLike]
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` to a temp file in the same folder, fsync, then rename,
    so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_dir(ready: PathLike, final: PathLike) -> None:
    """Swap the finished folder ``ready`` into place as ``final``: the old one is renamed aside first and
    removed after, so a reader sees the old folder or the new one, never a mix; then fsync the parent."""
    ready, final = Path(ready), Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(ready, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(ready, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared (tied) tensors stored once and every tensor contiguous."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_weights(tensors: dict[str, torch.Tensor], path: PathLike, metadata: Optional[dict] = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def load_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt file raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def save_pretrained(model: torch.nn.Module, directory: PathLike, tokenizer=None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / CONFIG_NAME, lambda tmp: model.config.save(tmp))
    save_weights(unique_state_dict(model), directory / WEIGHTS_NAME)
    if tokenizer is not None:
        tokenizer.save(directory)


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: PathLike,
               strict: bool = True) -> None:
    """Copy tensors into the model, checking names and shapes first so that the
    error names the file and the tensor instead of a torch traceback."""
    expected = model.state_dict()
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [n for n in tensors if n not in expected]
    if unexpected and strict:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} does not belong to this model")
    for name, tensor in expected.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
    model.load_state_dict({n: tensors[n] for n in expected}, strict=True)


def stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating-point dtype holding most of the elements of ``tensors`` (float32 if none is
    floating-point): what a model loaded without ``dtype=`` is kept in."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def load_model(directory: PathLike, cls=None, dtype: Optional[torch.dtype] = None, strict: Optional[bool] = None):
    """Build a model from a zenlm checkpoint folder. Loading a full LM checkpoint into the bare
    ``TransformerModel`` drops the head tensors; any other mismatch is an error.

    ``dtype`` None keeps the dtype the weights are stored in (zenlm's own checkpoints are fp32,
    and load as fp32; one saved from a bf16 model loads as bf16); ``torch.float32`` or another
    converts them."""
    from .model import TransformerLM, TransformerModel

    cls = cls or TransformerLM
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {directory}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...) or None, "
                         f"got {dtype!r}")
    config = TransformerConfig.load(directory / CONFIG_NAME)
    tensors = load_weights(directory / WEIGHTS_NAME)
    quantized = config.extra.get("quantization")
    model = cls(config)
    if quantized:  # integer weights: build the quantized layout first (zenlm.quantize); its scales keep their dtype
        from .quantize import prepare_quantized

        model = prepare_quantized(model, quantized)
    if strict is None:
        strict = cls is not TransformerModel
    target = dtype or (None if quantized else stored_dtype(tensors))
    if not quantized and target != torch.float32:
        model = model.to(target)  # before the copy, so that no fp32 copy of the weights is made
    load_state(model, tensors, directory / WEIGHTS_NAME, strict=strict)
    if quantized and dtype is not None:
        model = model.to(dtype)
    return model.eval()


def average_checkpoints(folders: list, out: PathLike) -> dict:
    """Average the weights of several checkpoints of one run into a new model folder.

    The last checkpoints of a run sit at different points around one minimum; their mean
    usually scores better than any of them (Vaswani et al. 2017 average the last 5 or 20;
    fairseq's average_checkpoints.py). Configs must match; the config and tokenizer of the
    last folder are kept. Sums run in float64 so the order of folders does not matter."""
    import shutil

    if len(folders) < 2:
        raise ValueError(f"averaging needs at least 2 checkpoint folders, got {len(folders)}")
    folders = [Path(f) for f in folders]
    for f in folders:
        if not (f / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {f}")
    configs = [read_json(f / CONFIG_NAME) for f in folders]
    for f, c in zip(folders[1:], configs[1:]):
        if c != configs[0]:
            key = next(k for k in sorted(set(c) | set(configs[0])) if c.get(k) != configs[0].get(k))
            raise ValueError(f"{f}/{CONFIG_NAME} differs from {folders[0]}/{CONFIG_NAME} at {key!r}: "
                             f"{c.get(key)!r} vs {configs[0].get(key)!r}; only checkpoints of one model average")
    first = load_weights(folders[0] / WEIGHTS_NAME)
    sums = {n: t.double() for n, t in first.items()}
    for f in folders[1:]:
        tensors = load_weights(f / WEIGHTS_NAME)
        if set(tensors) != set(sums):
            name = sorted(set(tensors) ^ set(sums))[0]
            raise ValueError(f"{f / WEIGHTS_NAME}: tensor {name!r} is not in every checkpoint")
        for n, t in tensors.items():
            if t.shape != sums[n].shape:
                raise ValueError(f"{f / WEIGHTS_NAME}: tensor {n!r} has shape {tuple(t.shape)}, "
                                 f"{folders[0] / WEIGHTS_NAME} has {tuple(sums[n].shape)}")
            sums[n] += t.double()
    averaged = {n: (t / len(folders)).to(first[n].dtype) if first[n].is_floating_point() else first[n]
                for n, t in sums.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / CONFIG_NAME, lambda tmp: shutil.copyfile(folders[-1] / CONFIG_NAME, tmp))
    if (folders[-1] / TOKENIZER_NAME).exists():
        atomic_write(out / TOKENIZER_NAME, lambda tmp: shutil.copyfile(folders[-1] / TOKENIZER_NAME, tmp))
    save_weights(averaged, out / WEIGHTS_NAME, {"format": "pt", "averaged": ",".join(str(f) for f in folders)})
    return {"out": str(out), "averaged": len(folders), "tensors": len(averaged)}


def read_json(path: PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
