"""The two-line Python API: a model and its tokenizer held together.

    llm = zenlm.LLM.load("folder")      # a zenlm checkpoint or a local Hugging Face folder
    llm.generate("Once upon a time")

Every method is a thin call into the library (generate, tasks, retrieval, fine-tuning), the
same calls the CLI and the server make, so what works here works there. This is the top
floor of the library: it imports what it needs and nothing imports it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .folders import load, load_tokenizer
from .generation import Generator, generate as _generate
from .model import TransformerLM
from .tokenizer import Tokenizer

PathLike = Union[str, os.PathLike]


class LLM:
    """A language model with its tokenizer (litgpt's ``LLM``, transformers' pipeline in one object)."""

    def __init__(self, model: TransformerLM, tokenizer: Optional[Tokenizer] = None, path: Optional[PathLike] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.path = Path(path) if path is not None else None

    @classmethod
    def load(cls, path: PathLike, adapter: Optional[PathLike] = None, **kwargs) -> "LLM":
        """Open a model folder with the tokenizer beside it; ``adapter``: a LoRA adapter folder to apply."""
        if adapter is not None:
            from .lora import load_with_adapter

            model = load_with_adapter(path, adapter, **kwargs)
        else:
            model = load(path, **kwargs)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None and (Path(path) / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(path)
        return cls(model, tokenizer, path)

    def __repr__(self) -> str:
        c = self.model.config
        return (f"LLM({str(self.path) if self.path else 'in memory'}: {c.family}, {self.model.num_parameters():,} "
                f"parameters, vocab {c.vocab_size}, tokenizer {'yes' if self.tokenizer else 'none'})")

    def _text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json in its folder); pass LLM(model, tokenizer)")
        return self.tokenizer

    # ---------------------------------------------------------------- text in, text out
    def generate(self, prompt, **options):
        """A str gives a str, a list of str a list; token ids give token ids. Options as in
        ``zenlm.GenerationConfig`` (max_new_tokens, temperature, top_p, num_beams, seed, ...)."""
        return _generate(self.model, prompt, tokenizer=self.tokenizer, **options)

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Text deltas of one reply as the tokens arrive."""
        return Generator(self.model, self._text_tokenizer()).stream(prompt, **options)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 128, tools: Optional[Sequence[dict]] = None,
             template_kwargs: Optional[dict] = None, **options) -> str:
        """The assistant's reply to a conversation ``[{"role": "system"|"user"|"assistant", "content": ...}]``
        ending with the user's message, in the chat format the model was trained on: its own chat
        template when its folder has one (``tools``: JSON schemas for a template that offers them;
        ``template_kwargs``: further template variables), else zenlm's ``<|role|>`` template. The reply
        stops at any of the model's end tokens."""
        from .tasks.chat import ChatSession

        messages = list(messages)
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("messages must end with a message whose role is 'user'")
        tokenizer = self._text_tokenizer()
        system = [m["content"] for m in messages if m.get("role") == "system"]
        if len(system) > 1 or any(not isinstance(s, str) for s in system):
            system = ["\n".join(s if isinstance(s, str) else str(s) for s in system)]
        # a model's own template also renders tool calls and results; zenlm's knows users and assistants
        roles = None if tokenizer.has_chat_template else ("user", "assistant")
        history = [m for m in messages[:-1] if m.get("role") != "system" and (roles is None or m.get("role") in roles)]
        session = ChatSession(self.model, tokenizer, system=system[0] if system else None,
                              max_new_tokens=max_new_tokens, options=options, history=history,
                              tools=list(tools) if tools else None, template_kwargs=dict(template_kwargs or {}))
        return session.reply(messages[-1]["content"])

    def translate(self, texts: Union[str, Sequence[str]], **options):
        """Translations (a str for a str); options as in ``zenlm.tasks.translate.translate`` (beam, ...)."""
        from .tasks.translate import translate

        single = isinstance(texts, str)
        out = translate(self.model, self._text_tokenizer(), [texts] if single else list(texts), **options)
        return out[0] if single else out

    def embed(self, texts: Union[str, Sequence[str]], **options):
        """(N, dim) float32 sentence vectors (mean pooling, normalised by default; options as in
        ``zenlm.retrieval.Embedder``: pooling, normalize, max_length, precision, batch_size)."""
        from .retrieval.embed import Embedder

        single = isinstance(texts, str)
        vectors = Embedder(self.model, self._text_tokenizer(), **options).encode([texts] if single else list(texts))
        return vectors[0] if single else vectors

    # ---------------------------------------------------------------- adapting and keeping
    def save(self, directory: PathLike) -> Path:
        """Write config.json, model.safetensors and tokenizer.json; the folder ``LLM.load`` reads."""
        self.model.save_pretrained(directory, tokenizer=self.tokenizer)
        return Path(directory)

    def finetune(self, data: PathLike, method: str = "lora", out_dir: Optional[PathLike] = None,
                 valid: Optional[PathLike] = None, **overrides) -> "LLM":
        """Fine-tune on ``data`` (text, JSONL chat or TSV pairs; see ``zenlm finetune``) and return
        the tuned model. ``method``: lora | full; ``overrides``: TrainConfig keys (max_steps=..., lr via
        ``optim={"lr": ...}``). The run's summary is on the result as ``.summary``."""
        from .tasks.finetune import finetune

        with tempfile.TemporaryDirectory(prefix="zenlm-base-") as tmp:
            base = self.path if self.path is not None and (self.path / "config.json").is_file() \
                and (self.path / "tokenizer.json").is_file() else self.save(tmp)
            summary = finetune(base, data, method=method, overrides=overrides or None,
                               out_dir=None if out_dir is None else str(out_dir), valid=valid)
        tuned = LLM.load(summary["model"])  # best/: the merged model for LoRA too (its adapter is beside it)
        tuned.summary = summary
        return tuned


__all__ = ["LLM"]
