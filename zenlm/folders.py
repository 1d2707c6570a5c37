"""Model folders: open any folder zenlm can read (its own checkpoints and local Hugging Face
folders) with the tokenizer beside it, and the folder-to-folder operations built on that.

This floor sits above checkpoint.py, hf/ and quantize.py and below everything that takes a
folder name from a user (retrieval, tasks, the server, the CLI), so none of those needs to
import the package root.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from .checkpoint import TOKENIZER_NAME, WEIGHTS_NAME, load_model, save_pretrained
from .hf import is_hf_folder, load_hf, load_tokenizer  # the tokenizer.json beside any folder
from .model import TransformerLM
from .quantize import quantize_model


def load(path, dtype=None, **kwargs) -> TransformerLM:
    """Load a model folder: a zenlm checkpoint (config.json + model.safetensors), or a local
    Hugging Face folder (config.json with a "model_type"), converted on the fly by ``zenlm.hf``.
    The folder's tokenizer.json, when there is one, comes along as ``model.tokenizer``, so
    ``zenlm.load(path).generate("text")`` works as it reads. A path ending in .gguf is read by
    ``zenlm.gguf.load_gguf`` (llama.cpp's file, its tokenizer included).

    ``dtype``: None keeps the weights in the dtype they are stored in (a bf16 Hugging Face folder
    loads as bf16, memory-mapped; zenlm's fp32 checkpoints as fp32); ``torch.float32``,
    ``torch.bfloat16``, … converts them while loading. Other keywords (``cls``) go to the loader."""
    if os.fspath(path).lower().endswith(".gguf"):
        from .gguf import load_gguf

        return load_gguf(path, dtype=dtype, **kwargs)
    loader = load_hf if is_hf_folder(path) else load_model
    model = loader(path, dtype=dtype, **kwargs)
    if os.path.isfile(os.path.join(path, TOKENIZER_NAME)):
        model.tokenizer = load_tokenizer(path)
    return model


def quantize_folder(source, out, scheme: str = "int8", group_size: Optional[int] = None,
                    embeddings: bool = True) -> dict:
    """``zenlm quantize``: read a model folder, write the quantized one (config, weights,
    tokenizer). Returns sizes on disk for the report."""
    source, out = Path(source), Path(out)
    model = load(source)
    quantized = quantize_model(model, scheme, group_size, embeddings)
    if out.resolve() == source.resolve():
        raise ValueError(f"output folder {out} is the source folder; choose another so the original is kept")
    save_pretrained(quantized, out)
    if (source / TOKENIZER_NAME).exists():
        shutil.copyfile(source / TOKENIZER_NAME, out / TOKENIZER_NAME)
    before = sum(f.stat().st_size for f in source.iterdir() if f.suffix in (".safetensors", ".bin"))
    after = (out / WEIGHTS_NAME).stat().st_size
    return {"scheme": scheme, "source_bytes": before, "quantized_bytes": after, "ratio": before / after,
            "out": str(out)}


__all__ = ["load", "load_tokenizer", "quantize_folder"]
