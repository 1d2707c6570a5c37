"""Reading the weight files of a Hugging Face folder, whichever way they are stored, safely.

safetensors (one ``model.safetensors``, or shards listed in ``model.safetensors.index.json``) are
memory-mapped (``get``: a view of the file, no copy), or read with ``pread`` straight into a tensor
the caller allocated (``copy_into``: a fused or converted tensor is built without a second copy of
it, and without the file's pages staying resident in this process); a legacy ``pytorch_model.bin``
(or its shards) is read only through ``torch.load(weights_only=True)``, which refuses anything but
tensors. Every error names the file and the tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..checkpoint import PathLike, read_json

# safetensors' dtype names (the header's "dtype")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
                           if hasattr(torch, "float8_e4m3fn") else {}),
}
_CHUNK_BYTES = 8 << 20  # a converted or transposed tensor is read this much at a time


def _pread_into(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    """Fill ``view`` from the file at ``offset`` (a read returns at most ~2 GiB: loop)."""
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"{path}: tensor {name!r} ends past the end of the file (truncated file?)")
        done += n


class TensorFiles:
    """The tensors of an HF folder, whichever files hold them, read lazily and safely.

    Knows which file holds each name, so every error names the file and the tensor."""

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        # safetensors, from the header: name -> (first byte, end byte, dtype name, shape) in its file
        self._spans: dict[str, tuple[int, int, str, tuple[int, ...]]] = {}
        self._fds: dict[Path, int] = {}
        self._local = threading.local()
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
        try:  # the byte spans, for pread (safe_open has already checked the header)
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            spans = {}
            for name, entry in header.items():
                if name != "__metadata__":
                    start, end = entry["data_offsets"]
                    spans[name] = (8 + size + start, 8 + size + end, str(entry["dtype"]), tuple(entry["shape"]))
            self._spans.update(spans)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass  # a header only safe_open understands: tensors are then read through it (copy_into)

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
        if name in self._spans:  # from the header: no call into safe_open (the reading threads use this)
            return self._spans[name][3]
        path = self.where[name]
        if path in self._bins:
            return tuple(self._bins[path][name].shape)
        return tuple(self._open[path].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        path = self.where[name]
        if path in self._bins:
            return self._bins[path][name].dtype
        kind = self._spans[name][2] if name in self._spans else self._open[path].get_slice(name).get_dtype()
        if kind not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {kind}, which zenlm does not read")
        return SAFETENSORS_DTYPES[kind]

    def main_dtype(self, names: Optional[Iterable[str]] = None) -> torch.dtype:
        """The floating-point dtype holding most of the weights ``names`` (all by default): the
        dtype a model keeps when none is asked for; float32 when none is floating-point."""
        counts: dict[torch.dtype, int] = {}
        for name in self.where if names is None else names:
            kind = self.dtype(name)
            if kind.is_floating_point:
                counts[kind] = counts.get(kind, 0) + math.prod(self.shape(name))
        return max(counts, key=counts.get) if counts else torch.float32

    def copy_into(self, name: str, dest: torch.Tensor, transposed: bool = False) -> None:
        """Write tensor ``name`` into ``dest`` (allocated by the caller, any dtype), transposed
        (2-D) if asked. Same dtype, not transposed: one ``pread`` straight into ``dest``. Otherwise
        the file is read ~8 MiB at a time into a scratch buffer and converted piece by piece, so
        no second full copy of the tensor exists at any point."""
        path = self.where[name]
        shape = self.shape(name)
        numel = math.prod(shape)
        if numel != dest.numel():
            raise ValueError(f"{path}: tensor {name!r} has shape {shape}, cannot fill {tuple(dest.shape)}")
        if path in self._bins or name not in self._spans:  # a mapped .bin (torch.load mmap) or an odd header
            source = self.get(name)
            dest.copy_(source.t() if transposed else source.reshape(dest.shape))
            return
        kind = self.dtype(name)
        start, end = self._spans[name][:2]
        if end - start != numel * kind.itemsize:
            raise ValueError(f"{path}: tensor {name!r} spans {end - start} bytes, its shape and dtype "
                             f"need {numel * kind.itemsize}")
        fd = self._fd(path)
        try:
            if kind == dest.dtype and not transposed and dest.is_contiguous():
                if numel:
                    _pread_into(fd, memoryview(dest.view(-1).view(torch.uint8).numpy()), start, path, name)
                return
            rows = shape[0] if shape else 1
            width = numel // rows if rows else 0
            target = dest if transposed else dest.view(rows, width) if dest.is_contiguous() \
                else dest.reshape(rows, width)
            step = max(1, _CHUNK_BYTES // max(1, width * kind.itemsize))
            scratch = self._scratch(min(step, rows) * width * kind.itemsize).view(kind)
            for a in range(0, rows, step):
                b = min(rows, a + step)
                chunk = scratch[:(b - a) * width]
                _pread_into(fd, memoryview(chunk.view(torch.uint8).numpy()), start + a * width * kind.itemsize,
                            path, name)
                chunk = chunk.view(b - a, width)
                if transposed:
                    target[:, a:b].copy_(chunk.t())
                else:
                    target[a:b].copy_(chunk)
            if not transposed and not dest.is_contiguous():
                dest.copy_(target.view(dest.shape))
        except OSError as e:
            raise ValueError(f"{path}: cannot read tensor {name!r}: {e}") from None

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """This thread's reusable read buffer: allocated once, not per tensor (freed scratch
        buffers of varying sizes would leave resident holes in the heap)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.buf = torch.empty(max(nbytes, _CHUNK_BYTES), dtype=torch.uint8)
        return buf[:nbytes]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self._fds[path]

    def close(self) -> None:
        """Close the descriptors ``copy_into`` opened (memory-mapped views stay valid)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._local = threading.local()  # the read buffers go too

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def get(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if path in self._bins:
            return self._bins[path][name]
        try:
            return self._open[path].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {name!r} (truncated file?): {e}") from None
