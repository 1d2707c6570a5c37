"""The models a server offers, each loaded once from its folder, with what it can do.

A decoder-only model generates (``/v1/completions``, ``/v1/chat/completions``) through the
continuous-batching engine and can also embed; an encoder-decoder model translates
(``/v1/translations``, beam search through ``zenlm.generation``); an embedding model
(``--embeddings DIR``: a zenlm or sentence-transformers folder) serves ``/v1/embeddings``.
The model id is the folder's name unless given as ``NAME=DIR``.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data import encode_chat
from .errors import ContextLengthExceeded, InvalidRequest, ModelNotFound

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    id: str
    kind: str  # "generate" | "translate" | "embed" | "search"
    model: torch.nn.Module
    tokenizer: object
    path: str
    engine: Optional[object] = None  # BatchEngine for "generate"
    embedder: Optional[object] = None  # retrieval.Embedder for "embed"
    index: Optional[object] = None  # retrieval.Index for "search"
    lock: threading.Lock = field(default_factory=threading.Lock)  # serialises unbatched work (translation)

    @property
    def context_length(self) -> Optional[int]:
        return None if self.model is None else self.model.config.max_position_embeddings

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.model.config.eos_token_id]
        end = self.tokenizer.token_to_id("<|end|>")
        return ids + ([end] if end is not None else [])

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The chat template the trainer uses (``zenlm.data.encode_chat``), with the assistant prompt."""
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                    for m in messages]
        if self.tokenizer.token_to_id("<|assistant|>") is None:  # a tokenizer without role tokens
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode(text)
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True)[0]

    def check_ids(self, ids: Sequence[int], param: str = "prompt") -> list[int]:
        vocab = self.model.config.vocab_size
        for t in ids:
            if not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequest(f"{param} holds token id {t!r}, outside [0, {vocab})", param=param)
        return list(ids)

    def fit(self, prompt_tokens: int, max_tokens: Optional[int], param: str = "messages") -> int:
        """The max_tokens to use (the rest of the window when not given); 400 when it does not fit."""
        window = self.context_length
        if prompt_tokens < 1:
            raise InvalidRequest("the prompt is empty (0 tokens)", param=param)
        room = window - prompt_tokens
        if max_tokens is None:
            if room < 1:
                raise ContextLengthExceeded(
                    f"this model's maximum context length is {window} tokens; the prompt has {prompt_tokens} tokens, "
                    f"leaving no room for a completion", param=param)
            return room
        if prompt_tokens + max_tokens > window:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {window} tokens; you requested {prompt_tokens + max_tokens} "
                f"tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion)", param=param)
        return max_tokens


class ModelCatalog:
    def __init__(self, models: Sequence[ServedModel] = ()):
        self.models: dict[str, ServedModel] = {}
        for m in models:
            self.add(m)

    def add(self, model: ServedModel) -> None:
        if model.id in self.models:
            raise ValueError(f"two models would be served as {model.id!r}; name them with NAME=DIR")
        self.models[model.id] = model

    def get(self, model_id: str, kind: Optional[str] = None) -> ServedModel:
        m = self.models.get(model_id)
        if m is None:
            raise ModelNotFound(f"the model {model_id!r} does not exist; served: {', '.join(self.models) or 'none'}",
                                param="model")
        if kind is not None and m.kind != kind and not (kind == "embed" and m.kind == "generate"):
            routes = {"generate": "/v1/completions and /v1/chat/completions", "translate": "/v1/translations",
                      "embed": "/v1/embeddings", "search": "/v1/search"}
            raise InvalidRequest(f"the model {model_id!r} serves {routes[m.kind]}, not this route", param="model")
        return m

    def start(self) -> None:
        for m in self.models.values():
            if m.engine is not None:
                m.engine.start()

    def stop(self) -> None:
        for m in self.models.values():
            if m.engine is not None:
                m.engine.stop()


def _name_and_path(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or os.path.isdir(spec):
        name, path = Path(spec).resolve().name, spec
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    return name, Path(path)


def load_generator(spec: str, max_batch_size: int = 32, max_queue: int = 256, on_step=None) -> ServedModel:
    """A generating (decoder-only) or translating (encoder-decoder) model from ``DIR`` or ``NAME=DIR``."""
    from .. import load, load_tokenizer
    from .engine import BatchEngine

    name, path = _name_and_path(spec)
    model = load(path).eval()
    tokenizer = load_tokenizer(path)
    family = model.config.family
    if family == "decoder-only":
        engine = BatchEngine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, on_step=on_step)
        return ServedModel(name, "generate", model, tokenizer, str(path), engine=engine)
    if family == "encoder-decoder":  # greedy translations batch continuously; beam search runs alone
        engine = BatchEngine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, on_step=on_step)
        return ServedModel(name, "translate", model, tokenizer, str(path), engine=engine)
    raise ValueError(f"{path} holds an encoder-only model; serve it with --embeddings")


def load_embedder(spec: str) -> ServedModel:
    """An embedding model from ``DIR`` or ``NAME=DIR`` (``zenlm.retrieval.Embedder``)."""
    from ..retrieval.embed import Embedder

    name, path = _name_and_path(spec)
    embedder = Embedder.load(path, name=name)
    return ServedModel(name, "embed", embedder.model, embedder.tokenizer, str(path), embedder=embedder)


def load_index(spec: str) -> ServedModel:
    """A search index (``zenlm index build``) from ``DIR`` or ``NAME=DIR``; dense search loads the
    embedding model the index records."""
    from ..retrieval.index import Index

    name, path = _name_and_path(spec)
    return ServedModel(name, "search", None, None, str(path), index=Index.open(path))


def tokenize_inputs(served: ServedModel, inputs: Sequence) -> list[list[int]]:
    """Token ids for strings or token-id lists to embed; an over-long input is a 400, never cut."""
    if served.embedder is not None:
        tokenizer, limit = served.embedder.tokenizer, served.embedder.config.max_length
    else:
        tokenizer, limit = served.tokenizer, served.context_length
    rows = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            enc = tokenizer.backend.encode(item, add_special_tokens=True)
            ids = enc.ids
            if enc.overflowing:
                raise ContextLengthExceeded(f"input {i} is longer than this model's maximum of {limit} tokens",
                                            param="input")
        else:
            ids = served.check_ids(item, param="input")
        if len(ids) > limit:
            raise ContextLengthExceeded(f"input {i} has {len(ids)} tokens; this model takes at most {limit}",
                                        param="input")
        if not ids:
            raise InvalidRequest(f"input {i} is empty after tokenization", param="input")
        rows.append(ids)
    return rows


def embed_rows(served: ServedModel, rows: list[list[int]], dimensions: Optional[int] = None) -> torch.Tensor:
    """(N, dim) vectors, pooled and normalised as the embedding model was trained; ``dimensions``
    keeps the first d components and normalises again (OpenAI's shortened embeddings)."""
    if served.embedder is not None:
        cfg, model, tokenizer = served.embedder.config, served.embedder.model, served.embedder.tokenizer
        pooling, normalize = cfg.pooling, cfg.normalize
    else:
        pooling, normalize, model, tokenizer = "mean", True, served.model, served.tokenizer
    hidden = served.model.config.hidden_size
    if dimensions is not None and dimensions > hidden:
        raise InvalidRequest(f"dimensions={dimensions} exceeds the model's {hidden}", param="dimensions")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out = torch.zeros(len(rows), hidden)
    with torch.inference_mode():
        for start in range(0, len(rows), 32):
            chunk = rows[start:start + 32]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[j, :len(r)] = 1
            out[start:start + len(chunk)] = model.embed(ids, mask, pooling, normalize).float()
    if dimensions is not None:
        out = torch.nn.functional.normalize(out[:, :dimensions], dim=-1)
    return out
