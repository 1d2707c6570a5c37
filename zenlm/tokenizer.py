"""Text ↔ ids over Hugging Face ``tokenizers`` (Rust): byte-level BPE, unigram or characters.

Byte-level BPE is the default because it covers any UTF-8 text (Chinese, emoji,
code) with no unknown token. The same ``tokenizer.json`` format is what
transformers writes, so imported tokenizers load here unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _RustTokenizer

PAD, BOS, EOS, UNK, MASK = "<pad>", "<s>", "</s>", "<unk>", "<mask>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK) + ROLE_TOKENS  # ids 0..8 in every tokenizer zenlm trains
KINDS = ("bpe", "unigram", "char")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A thin, typed wrapper: encode/decode, batches as tensors with masks, save/load."""

    def __init__(self, backend: _RustTokenizer, pad_token: Optional[str] = None):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.pad_token = pad_token or next((t for t in (PAD, "[PAD]", "<|endoftext|>") if t in vocab), None)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, files_or_texts: Union[Sequence[str], Iterable[str]], vocab_size: int = 16000, kind: str = "bpe",
              min_frequency: int = 2, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              show_progress: bool = False) -> "Tokenizer":
        """Train on file paths (each an existing file) or on an iterator of texts."""
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; valid: {', '.join(KINDS)}")
        if not isinstance(vocab_size, int) or vocab_size < len(special_tokens) + 1:
            raise ValueError(f"vocab_size must be an integer > {len(special_tokens)} (the special tokens), got {vocab_size!r}")
        special = list(special_tokens)
        if kind == "bpe":
            tok = _RustTokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          show_progress=show_progress)
        elif kind == "unigram":
            tok = _RustTokenizer(models.Unigram())
            tok.normalizer = normalizers.NFKC()
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token=UNK,
                                              show_progress=show_progress)
        else:  # char: every character one token, unseen characters map to <unk>
            tok = _RustTokenizer(models.WordLevel(unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            tok.decoder = decoders.Fuse()
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=special,
                                                show_progress=show_progress)
        if isinstance(files_or_texts, (list, tuple)) and all(isinstance(f, (str, os.PathLike)) and os.path.isfile(f)
                                                            for f in files_or_texts) and files_or_texts:
            tok.train([os.fspath(f) for f in files_or_texts], trainer)
        else:
            tok.train_from_iterator(iter(files_or_texts), trainer)
        return cls(tok)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self.backend.id_to_token(idx)

    @property
    def pad_id(self) -> Optional[int]:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def bos_id(self) -> Optional[int]:
        return next((i for i in map(self.token_to_id, (BOS, "[CLS]", "<|endoftext|>")) if i is not None), None)

    @property
    def eos_id(self) -> Optional[int]:
        return next((i for i in map(self.token_to_id, (EOS, "[SEP]", "<|endoftext|>")) if i is not None), None)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Union[Sequence[int], torch.Tensor], skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: Sequence[str], padding: bool = True, truncation: bool = False,
                     max_length: Optional[int] = None, add_special_tokens: bool = False,
                     padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Encode many texts at once; returns input_ids and attention_mask as (B, T) tensors.

        Without ``truncation`` a text longer than ``max_length`` is an error, never cut silently."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        rows = [e.ids for e in encodings]
        if max_length is not None:
            too_long = [i for i, r in enumerate(rows) if len(r) > max_length]
            if too_long and not truncation:
                i = too_long[0]
                raise ValueError(f"text {i} is {len(rows[i])} tokens, longer than max_length={max_length} "
                                 f"(pass truncation=True to cut it)")
            rows = [r[:max_length] for r in rows]
        width = max((len(r) for r in rows), default=0)
        if not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("texts have different lengths; pass padding=True")
        pad = self.pad_id if self.pad_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if not r:
                continue
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Save to ``path`` (a folder gets ``tokenizer.json`` inside)."""
        from .checkpoint import atomic_write

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / TOKENIZER_FILE
        atomic_write(path, lambda tmp: self.backend.save(tmp))
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            backend = _RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        # files written by transformers may carry fixed padding/truncation (MiniLM's pads and cuts
        # every text at 128); like transformers, pad and truncate only when encode_batch is asked to
        backend.no_padding()
        backend.no_truncation()
        return cls(backend)

    def __len__(self) -> int:
        return self.vocab_size


class StreamDecoder:
    """Turns a growing list of ids into text deltas, holding back bytes until they form
    whole characters, so a stream never shows half of a Chinese character or an emoji."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_ids: Union[int, Sequence[int]]) -> str:
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta
