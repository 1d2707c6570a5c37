"""A run's folder on disk, written so that a kill at any moment loses nothing finished.

``<out_dir>/checkpoints/step-NNNNNNNN`` holds the model (config.json + model.safetensors +
tokenizer.json, loadable with ``zenlm.load``) and ``trainer_state.pt`` (optimizer, scheduler,
every rank's RNG states, the data position); ``<out_dir>/best`` holds the best model alone.
A folder is written under a temporary name, marked COMPLETE and renamed only then, and
``<out_dir>/latest`` is rewritten atomically after that, so a kill at any moment leaves the
previous checkpoint as the latest. Only the newest ``keep`` checkpoints are kept.
``metrics.jsonl`` and ``loss.png`` sit beside them.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint import atomic_write, replace_dir, save_weights
from ..config import TransformerConfig
from ..tokenizer import Tokenizer

STATE_NAME = "trainer_state.pt"
COMPLETE_NAME = "COMPLETE"


# --------------------------------------------------------------------------- folders
def write_dir_atomically(final: os.PathLike, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, mark it COMPLETE, then swap it into place (the old
    folder is renamed aside first and removed after), and fsync the parent."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    atomic_write(tmp / COMPLETE_NAME, lambda p: Path(p).write_text("ok\n"))
    replace_dir(tmp, final)


def write_model_folder(final: os.PathLike, model_config: TransformerConfig, tensors: dict, tokenizer: Tokenizer,
                       metadata: Optional[dict] = None, extra: Optional[Callable[[Path], None]] = None) -> None:
    """A zenlm model folder (config.json, model.safetensors, tokenizer.json), written atomically;
    ``extra(tmp)`` adds more files before the folder is marked complete."""
    def fill(tmp: Path) -> None:
        atomic_write(tmp / "config.json", lambda p: model_config.save(p))
        save_weights({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                     metadata=metadata)
        tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)

    write_dir_atomically(final, fill)


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


def save_checkpoint_folder(out_dir: os.PathLike, step: int, model_config: TransformerConfig, tensors: dict,
                           tokenizer: Tokenizer, trainer_state: dict, keep: int) -> Path:
    """Write ``checkpoints/step-N`` (complete or not at all), point ``latest`` at it, and keep
    only the newest ``keep`` checkpoints."""
    out_dir = Path(out_dir)
    name = f"step-{step:08d}"
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    write_model_folder(root / name, model_config, tensors, tokenizer,
                       extra=lambda tmp: atomic_write(tmp / STATE_NAME, lambda p: torch.save(trainer_state, p)))
    atomic_write(out_dir / "latest", lambda p: Path(p).write_text(name + "\n"))
    done = sorted((d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")), key=lambda d: d.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_trainer_state(checkpoint: os.PathLike) -> dict:
    """``trainer_state.pt`` of a checkpoint folder (tensors and plain data only: no code runs)."""
    return torch.load(Path(checkpoint) / STATE_NAME, map_location="cpu", weights_only=True)


def trim_metrics(path: os.PathLike, step: int) -> list[dict]:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (a killed run may have logged past
    its last checkpoint, and its last line may be cut); rewrites the file and returns them."""
    path = Path(path)
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if record.get("step", 0) <= step:
                kept.append(record)
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    return kept


def plot_losses(history: list[dict], path: os.PathLike, title: str) -> None:
    """Loss curve PNG (train and validation) from the run's metric records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# --------------------------------------------------------------------------- random number generators
def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states, as plain data for ``trainer_state.pt``."""
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


__all__ = ["STATE_NAME", "COMPLETE_NAME", "write_dir_atomically", "write_model_folder", "find_latest_checkpoint",
           "save_checkpoint_folder", "load_trainer_state", "trim_metrics", "plot_losses", "rng_state",
           "set_rng_state", "seed_everything"]
