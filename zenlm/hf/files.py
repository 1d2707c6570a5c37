"""Reading the weight files of a Hugging Face folder, whichever way they are stored, safely.

safetensors (one ``model.safetensors``, or shards listed in ``model.safetensors.index.json``) are
memory-mapped; a legacy ``pytorch_model.bin`` (or its shards) is read only through
``torch.load(weights_only=True)``, which refuses anything but tensors. Every error names the file
and the tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import PathLike, read_json


class TensorFiles:
    """The tensors of an HF folder, whichever files hold them, read lazily and safely.

    Knows which file holds each name, so every error names the file and the tensor."""

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        d = self.directory
        self.source = d  # the file a missing tensor should have been in: the weights file or the shard index
        if (d / "model.safetensors").exists():
            self.source = d / "model.safetensors"
            self._add_safetensors(self.source)
        elif (d / "model.safetensors.index.json").exists():
            self.source = d / "model.safetensors.index.json"
            for shard in self._shards(self.source):
                self._add_safetensors(shard)
        elif (d / "pytorch_model.bin").exists():
            self.source = d / "pytorch_model.bin"
            self._add_bin(self.source)
        elif (d / "pytorch_model.bin.index.json").exists():
            self.source = d / "pytorch_model.bin.index.json"
            for shard in self._shards(self.source):
                self._add_bin(shard)
        else:
            raise FileNotFoundError(f"{d} has no weights: expected model.safetensors, model.safetensors.index.json, "
                                    "pytorch_model.bin or pytorch_model.bin.index.json")

    def _shards(self, index: Path) -> list[Path]:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or Path(name).name != name:  # shards live beside the index, nowhere else
                raise ValueError(f"{index}: shard {name!r} is not a file name in {self.directory}")
            if not (self.directory / name).exists():
                raise FileNotFoundError(f"{index} lists shard {name} but {self.directory / name} does not exist")
            shards.append(self.directory / name)
        return shards

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        self._open[path] = handle
        for name in handle.keys():
            self.where[name] = path

    def _add_bin(self, path: Path) -> None:
        try:  # weights_only: the unpickler builds tensors and plain containers, never arbitrary objects
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise ValueError(f"{path} is not a readable PyTorch weights file: {e}") from None
            state = self._load_bin_unmapped(path)  # pre-zip legacy format cannot be memory-mapped
        except Exception as e:  # UnpicklingError for anything that is not plain tensors
            raise ValueError(f"{path}: refused to load (only plain tensors are read from .bin files, "
                             f"with torch.load(weights_only=True)): {str(e).splitlines()[0]}") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{path} does not hold a flat name -> tensor state dict")
        self._bins[path] = state
        for name in state:
            self.where[name] = path

    @staticmethod
    def _load_bin_unmapped(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: refused to load (only plain tensors are read from .bin files, "
                             f"with torch.load(weights_only=True)): {str(e).splitlines()[0]}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.where[name]
        if path in self._bins:
            return tuple(self._bins[path][name].shape)
        return tuple(self._open[path].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if path in self._bins:
            return self._bins[path][name]
        try:
            return self._open[path].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {name!r} (truncated file?): {e}") from None
