"""The models a server offers, each loaded once from its folder, with what it can do.

A decoder-only model generates (``/v1/completions``, ``/v1/chat/completions``) through the
continuous-batching engine and can also embed; an encoder-decoder model translates
(``/v1/translations``, beam search through ``zenlm.generation``); an embedding model
(``--embeddings DIR``: a zenlm or sentence-transformers folder) serves ``/v1/embeddings``.
The model id is the folder's name unless given as ``NAME=DIR``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from functools import lru_cache
from typing import Optional, Sequence

import torch

from ..data import encode_chat
from ..tasks.chat import chat_prompt, stop_token_ids
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
    upstream: Optional[object] = None  # upstream.Upstream: served by other servers (the gateway)
    lock: threading.Lock = field(default_factory=threading.Lock)  # serialises unbatched work (translation)
    _stop_ids: Optional[list[int]] = field(default=None, repr=False)

    @property
    def context_length(self) -> Optional[int]:
        return None if self.model is None else self.model.config.max_position_embeddings

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token a reply ends on (``zenlm.tasks.chat.stop_token_ids``): the model's eos ids, the
        folder's generation_config ``eos_token_id`` list, and its template's end-of-turn token
        (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>`` ...; zenlm's ``<|end|>`` without a template)."""
        if self._stop_ids is None:
            self._stop_ids = stop_token_ids(self.tokenizer, self.model)
        return self._stop_ids

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The prompt ids for a conversation, with the assistant prompt appended.

        A folder with its own chat template (an imported Llama 3, Qwen, Gemma ... instruct model)
        gets it, rendered as transformers renders it (``zenlm.tasks.chat.chat_prompt``), with every
        field of the messages (``name``, ``tool_calls``, ``tool_call_id``; list content kept for a
        template that reads parts, joined for one that reads a string); a template that refuses the
        conversation (``raise_exception``) is a 400 carrying its message. Otherwise zenlm's own
        ``<|role|>`` template the trainer uses (``zenlm.data.encode_chat``), or plain ``role:
        content`` lines for a tokenizer without role tokens. ``developer`` is read as ``system``."""
        messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        if self.tokenizer.has_chat_template:
            parts = _reads_content_parts(self.tokenizer.get_chat_template())
            messages = [_for_template(m, parts) for m in messages]
            try:
                return chat_prompt(self.tokenizer, messages)
            except ValueError as e:  # ChatTemplateError: the template's raise_exception(...) or a failed render
                raise InvalidRequest(f"the chat template of {self.id!r} refused these messages: {e}",
                                     param="messages") from None
        plain = []
        for i, m in enumerate(messages):
            if m["role"] == "tool" or m.get("tool_calls"):
                raise InvalidRequest(f"messages.{i}: {self.id!r} has no chat template of its own (zenlm's <|role|> "
                                     f"template), which has no place for tool calls or tool results",
                                     param=f"messages.{i}")
            plain.append({"role": m["role"], "content": _text(m.get("content"))})
        if self.tokenizer.token_to_id("<|assistant|>") is None:  # a tokenizer without role tokens
            text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
            return self.encode(text)
        return encode_chat(self.tokenizer, plain, add_generation_prompt=True)[0]

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


def _text(content) -> str:
    """Message content as one string: text parts joined in order (null: empty)."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


# a template that loops over a message's content reads it as parts (``{% for part in message['content'] %}``);
# any other reads a string, as vLLM decides between its "openai" and "string" content formats
_PARTS_LOOP = re.compile(r"""for\s+\w+\s+in\s+[\w.]*(?:\.content\b|\[\s*['"]content['"]\s*\])""")


@lru_cache(maxsize=32)
def _reads_content_parts(template: str) -> bool:
    return bool(_PARTS_LOOP.search(template))


def _for_template(message: dict, parts: bool) -> dict:
    """A wire message as a chat template reads it: list content kept for a template that loops over
    parts, joined for one that reads a string; an assistant's tool-call arguments given as JSON text
    become the object they encode (templates write them with ``tojson``, as transformers expects)."""
    out = dict(message)
    if isinstance(out.get("content"), list) and not parts:
        out["content"] = _text(out["content"])
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            call = {**call, "function": dict(call["function"])}
            arguments = call["function"].get("arguments")
            if isinstance(arguments, str):
                try:
                    call["function"]["arguments"] = json.loads(arguments)
                except ValueError:
                    pass  # not JSON: the template gets the text as sent
            calls.append(call)
        out["tool_calls"] = calls
    return out


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

    def add_upstream(self, up) -> None:
        """A model served by other OpenAI-compatible servers (``upstream.Upstream``): listed in
        /v1/models; its requests never reach the local routes (``upstream.UpstreamDispatch``)."""
        self.add(ServedModel(up.name, "generate", None, up.tokenizer, ",".join(r.url for r in up.replicas),
                             upstream=up))

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
