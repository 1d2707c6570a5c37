"""Sentence embeddings: text → one vector per text, from any zenlm encoder (or decoder).

The ``Embedder`` wraps ``TransformerModel.embed`` with what a retrieval system needs
around it: its own copy of the tokenizer (padding off, truncation at ``max_length``
that keeps the closing special token, as transformers does), batches sorted by token
length so that little compute goes to padding, and three precisions: fp32, bf16
(Linear weights and matrix multiplies in bf16, which this CPU multiplies several times
faster; embeddings, LayerNorm, the residual stream and pooling stay fp32, which keeps
retrieval metrics within ~0.001 of fp32) and int8 (dynamic quantisation of every Linear layer). Texts longer than ``max_length`` are cut — the
model has no positions beyond it — and the count is logged, never silently.

A model folder written by sentence-transformers (``modules.json``, ``1_Pooling/``,
``sentence_bert_config.json``) carries its pooling, normalisation and maximum
length; a zenlm folder may carry them in ``embedder.json``. Both are honoured.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..cpu import resolve_precision
from ..model import POOLINGS, TransformerModel, pool
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
EMBEDDER_FILE = "embedder.json"


@dataclass
class EmbedderConfig:
    """How vectors are made from hidden states; saved beside the weights as embedder.json."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: Optional[int] = None  # None: the model's max_position_embeddings (at most 512)

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; valid: {', '.join(POOLINGS)}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")


def read_embedder_config(directory: Union[str, os.PathLike]) -> EmbedderConfig:
    """Pooling, normalisation and max length from embedder.json or sentence-transformers' files."""
    directory = Path(directory)
    if (directory / EMBEDDER_FILE).is_file():
        data = json.loads((directory / EMBEDDER_FILE).read_text(encoding="utf-8"))
        return EmbedderConfig(**{k: data[k] for k in ("pooling", "normalize", "max_length") if k in data})
    config = EmbedderConfig()
    pooling_file = directory / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        p = json.loads(pooling_file.read_text(encoding="utf-8"))
        if p.get("pooling_mode_cls_token"):
            config.pooling = "cls"
        elif p.get("pooling_mode_lasttoken"):
            config.pooling = "last"
        elif p.get("pooling_mode_mean_tokens"):
            config.pooling = "mean"
        else:
            modes = [k for k, v in p.items() if k.startswith("pooling_mode") and v]
            raise ValueError(f"{pooling_file}: pooling {modes} is not supported; valid: {', '.join(POOLINGS)}")
    modules = directory / "modules.json"
    if modules.is_file():
        kinds = [m.get("type", "") for m in json.loads(modules.read_text(encoding="utf-8"))]
        config.normalize = any(k.endswith("Normalize") for k in kinds)
    sbert = directory / "sentence_bert_config.json"
    if sbert.is_file():
        config.max_length = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
    return config


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: the identity an index records, so that searching it
    with a different model is caught even when two folders share a name."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class _BF16Linear(torch.nn.Module):
    """A frozen Linear holding bf16 weights: fp32 or bf16 in, bf16 out (inference only)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias)


class Embedder:
    """``Embedder.load("folder").encode(["a text", ...])`` → (N, dim) float32 array."""

    def __init__(self, model: TransformerModel, tokenizer: Tokenizer, pooling: str = "mean",
                 normalize: bool = True, max_length: Optional[int] = None, precision: str = "fp32",
                 batch_size: int = 32, name: Optional[str] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        limit = model.config.max_position_embeddings
        self.config = EmbedderConfig(pooling, normalize, max_length if max_length is not None else min(limit, 512))
        self.config.validate()
        if self.config.max_length > limit:
            raise ValueError(f"max_length={self.config.max_length} exceeds the model's "
                             f"max_position_embeddings={limit}")
        if precision == "bf16":  # emulated bf16 (no AVX512_BF16/AMX) is ~100x slower: fp32, said once
            precision = resolve_precision("bf16", next(model.parameters()).device, what="embeddings")
        self.precision, self.batch_size = precision, batch_size
        self.name = name or "unnamed"
        self.fingerprint = fingerprint(model)  # of the fp32 weights: precision does not change identity
        self.base_model = model.eval()  # full precision; what fine-tuning and save() use
        self.model = self._cast(self.base_model, precision)
        # a private tokenizer: the model's file may pin padding/truncation (MiniLM's pads to 128)
        backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
        backend.no_padding()
        backend.enable_truncation(self.config.max_length)
        self.tokenizer = Tokenizer(backend, pad_token=tokenizer.pad_token)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    @staticmethod
    def _cast(model: TransformerModel, precision: str) -> TransformerModel:
        if precision == "fp32":
            return model
        if precision == "bf16":
            import copy

            mixed = copy.deepcopy(model).eval()
            # bf16 only where the time goes: the matrix multiplies (and the attention they feed).
            # Embeddings, LayerNorm and the residual stream stay fp32 — a whole-model bf16 cast
            # rounds the residual sum at every layer and moved Cranfield's Recall@100 by 0.003
            for parent in list(mixed.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, _BF16Linear(child))
            return mixed
        import copy
        import warnings

        model = copy.deepcopy(model)
        # torch's dynamic quantisation swaps only modules whose type is exactly nn.Linear;
        # zenlm's Linear subclass (same parameters, a faster forward) is turned back into one
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and type(child) is not torch.nn.Linear:
                    plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    plain.weight, plain.bias = child.weight, child.bias
                    setattr(parent, name, plain)
        with warnings.catch_warnings():  # torch marks its eager quantisation API deprecated; it still works
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            # per-channel weight scales: per-tensor ones cost MiniLM several points of cosine
            return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                    inplace=True).eval()

    @classmethod
    def load(cls, path: Union[str, os.PathLike], precision: str = "fp32", batch_size: int = 32,
             pooling: Optional[str] = None, normalize: Optional[bool] = None, max_length: Optional[int] = None,
             name: Optional[str] = None) -> "Embedder":
        """From a zenlm checkpoint or a Hugging Face / sentence-transformers folder."""
        from ..folders import load, load_tokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no model folder at {path}")
        saved = read_embedder_config(path)
        model = load(path, cls=TransformerModel, dtype=torch.float32)  # `precision` decides what runs reduced
        return cls(model, load_tokenizer(path), pooling or saved.pooling,
                   saved.normalize if normalize is None else normalize,
                   max_length if max_length is not None else saved.max_length, precision, batch_size,
                   name or str(path))

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Weights (fp32), tokenizer and embedder.json, loadable with ``Embedder.load``."""
        from ..checkpoint import atomic_write

        directory = Path(directory)
        self.base_model.save_pretrained(directory, tokenizer=self.tokenizer)
        atomic_write(directory / EMBEDDER_FILE,
                     lambda tmp: Path(tmp).write_text(json.dumps(asdict(self.config), indent=2) + "\n"))
        return directory

    @property
    def dim(self) -> int:
        return self.base_model.config.hidden_size

    def identity(self) -> dict:
        """What an index records about the model that filled it."""
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim, **asdict(self.config)}

    # ------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, with the model's special tokens, cut at max_length (logged)."""
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, not one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"text {i} is a {type(t).__name__}, not a str")
        encodings = self.tokenizer.backend.encode_batch(list(texts), add_special_tokens=True)
        cut = sum(1 for e in encodings if e.overflowing)
        if cut:
            log.warning("%d of %d texts were longer than max_length=%d tokens and were truncated",
                        cut, len(texts), self.config.max_length)
        return [e.ids for e in encodings]

    def batches(self, rows: list[list[int]], batch_size: int):
        """(positions, input_ids, attention_mask) in order of decreasing length."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            width = max(1, max(len(rows[i]) for i in index))
            ids = torch.full((len(index), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(index), width), dtype=torch.long)
            for j, i in enumerate(index):
                n = len(rows[i])
                if n:
                    ids[j, :n] = torch.tensor(rows[i], dtype=torch.long)
                    mask[j, :n] = 1
                else:  # an empty text with a tokenizer that adds nothing: one pad token, attended
                    mask[j, 0] = 1
            yield index, ids, mask

    def encode(self, texts: Sequence[str], batch_size: Optional[int] = None, show_progress: bool = False
               ) -> np.ndarray:
        """(len(texts), dim) float32 vectors in the order given."""
        return self._encode(self.model, self.precision == "fp32", texts, batch_size, show_progress)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Query vectors, always at full precision. Queries are few and short, so fp32 costs little
        at search time, while a bf16/int8 query vector can swap two documents whose cosines differ by
        less than its rounding (seen on Cranfield: one swapped pair moved MRR@10 by 0.003). Documents
        keep the bulk speed-up of the reduced precision."""
        return self._encode(self.base_model, True, queries)

    @torch.inference_mode()
    def _encode(self, model: TransformerModel, full_precision: bool, texts: Sequence[str],
                batch_size: Optional[int] = None, show_progress: bool = False) -> np.ndarray:
        batch_size = batch_size or self.batch_size
        rows = self.tokenize(texts)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc="embedding", unit="text")
        for index, ids, mask in self.batches(rows, batch_size):
            if full_precision:
                vectors = model.embed(ids, mask, self.config.pooling, self.config.normalize)
            else:  # pool and normalise in fp32: a bf16 sum over 256 tokens and a bf16 norm lose ~1e-3
                vectors = self._pooled(model, ids, mask)
            out[index] = vectors.float().numpy()
            if bar is not None:
                bar.update(len(index))
        if bar is not None:
            bar.close()
        return out

    def _pooled(self, model: TransformerModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if model.config.family == "decoder-only":
            hidden = model.decode(ids, attention_mask=mask, name="input_ids")[0]
        else:
            hidden = model.encode(ids, mask)[0]
        return pool(hidden.float(), mask, self.config.pooling, self.config.normalize)

    def embed_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Differentiable vectors from the full-precision model (for fine-tuning)."""
        return self._pooled(self.base_model, ids, mask)


def embed(texts: Sequence[str], model: Union[str, os.PathLike, Embedder], **options) -> np.ndarray:
    """``zenlm.embed(texts, "model-folder")`` → (N, dim) float32 array. ``options`` go to
    ``Embedder.load`` (precision, pooling, normalize, max_length, batch_size)."""
    embedder = model if isinstance(model, Embedder) else Embedder.load(model, **options)
    return embedder.encode(texts)
