"""Text ↔ ids over Hugging Face ``tokenizers`` (Rust): byte-level BPE, unigram or characters.

Byte-level BPE is the default because it covers any UTF-8 text (Chinese, emoji,
code) with no unknown token. The same ``tokenizer.json`` format is what
transformers writes, so imported tokenizers load here unchanged.

Chat templates: a tokenizer read from a Hugging Face folder carries the folder's Jinja chat
template (``chat_template`` in tokenizer_config.json, chat_template.jinja, additional_chat_templates/)
and its named special tokens; ``Tokenizer.apply_chat_template`` renders it exactly as transformers'
method of the same name does (same sandbox, globals and filters). ``chat_spans`` finds the assistant
turns of a rendered conversation for any template, by rendering its prefixes; ``stop_token_ids``
names every token a reply ends on. The rendering itself lives in ``zenlm.chat_template``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _RustTokenizer

from .chat_template import ChatTemplateError, chat_spans, render_chat_template  # noqa: F401  (re-exported)

PAD, BOS, EOS, UNK, MASK = "<pad>", "<s>", "</s>", "<unk>", "<mask>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK) + ROLE_TOKENS  # ids 0..8 in every tokenizer zenlm trains
KINDS = ("bpe", "unigram", "char")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' names for a folder's templates
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# the named special tokens a chat template sees as variables (transformers' SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokens that end a turn in the templates of open models; one that a template writes is a stop token
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|end_of_text|>",
                      "<|endoftext|>", "</s>", "<|END_OF_TURN_TOKEN|>", "<|return|>", "<|call|>")
# zenlm's own template (``zenlm.data.chat_segments``) written in Jinja, for apply_chat_template on a
# tokenizer with the role tokens and no template of its own
ZENLM_CHAT_TEMPLATE = ("{% for message in messages %}"
                       "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class Tokenizer:
    """A thin, typed wrapper: encode/decode, batches as tensors with masks, save/load."""

    def __init__(self, backend: _RustTokenizer, pad_token: Optional[str] = None,
                 chat_template: Union[str, dict, None] = None, special_tokens: Optional[dict] = None,
                 eos_token_ids: Sequence[int] = ()):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.pad_token = pad_token or next((t for t in (PAD, "[PAD]", "<|endoftext|>") if t in vocab), None)
        # the folder's Jinja template: one string, or {name: template} ("default", "tool_use", ...)
        self.chat_template = chat_template
        # bos_token, eos_token, ... as tokenizer_config.json names them: the template's variables
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        # end tokens named elsewhere in the folder (generation_config.json eos_token_id lists)
        self.eos_token_ids = [int(i) for i in eos_token_ids]

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

    # ------------------------------------------------------------------ chat templates
    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a model's own template (zenlm's ``<|role|>`` format otherwise)."""
        return bool(self.chat_template)

    def get_chat_template(self, chat_template: Optional[str] = None, tools: Optional[Sequence] = None) -> str:
        """The template text to render, chosen as transformers chooses: ``chat_template`` is a template
        or the name of one of the folder's templates; by default "tool_use" when tools are given and the
        folder has it, else "default". A tokenizer without a template of its own but with zenlm's role
        tokens uses zenlm's ``<|role|>`` template."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError("This model has multiple chat templates with no default specified! Please either "
                                 "pass a chat template or the name of the template you wish to use to the "
                                 f"`chat_template` argument. Available template names are {sorted(templates)}.")
        elif chat_template is None:
            if templates:
                return templates
            if all(self.token_to_id(t) is not None for t in ROLE_TOKENS):
                return ZENLM_CHAT_TEMPLATE
            raise ValueError("this tokenizer has no chat template (no chat_template in tokenizer_config.json, no "
                             "chat_template.jinja, no zenlm role tokens); pass chat_template=TEXT")
        return chat_template

    def template_variables(self) -> dict:
        """The special tokens a template sees (bos_token, eos_token, ...), as transformers passes them."""
        return {k: self.special_tokens[k] for k in SPECIAL_TOKEN_KEYS if self.special_tokens.get(k) is not None}

    def render_chat(self, messages: Sequence, tools: Optional[Sequence] = None, add_generation_prompt: bool = False,
                    chat_template: Optional[str] = None, **kwargs) -> str:
        """One conversation rendered to text (``apply_chat_template(..., tokenize=False)``)."""
        template = self.get_chat_template(chat_template, tools)
        return render_chat_template(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    **{**self.template_variables(), **kwargs})[0]

    def apply_chat_template(self, conversation, tools: Optional[Sequence] = None,
                            documents: Optional[Sequence] = None, chat_template: Optional[str] = None,
                            add_generation_prompt: bool = False, continue_final_message: Union[bool, str] = False,
                            tokenize: bool = True, padding: bool = False, truncation: bool = False,
                            max_length: Optional[int] = None, return_tensors: Optional[str] = None,
                            return_dict: bool = True, return_assistant_tokens_mask: bool = False,
                            tokenizer_kwargs: Optional[dict] = None, **kwargs):
        """transformers' ``apply_chat_template``: the same arguments, the same results (as of transformers
        5: ``tokenize=True`` gives ``{"input_ids", "attention_mask"}`` unless ``return_dict=False``, which
        gives the ids). ``conversation``: a list of messages or a list of conversations (a batch).
        ``return_assistant_tokens_mask`` marks the template's ``{% generation %}`` blocks, as
        transformers does; for a mask that works with every template see ``zenlm.data.encode_chat``.
        Extra keyword arguments are template variables. A template's ``raise_exception`` is a
        ``ChatTemplateError`` (a ValueError) carrying its message."""
        if not tokenize:
            return_dict = False
        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise ValueError("`return_assistant_tokens_mask=True` requires `return_dict=True` and `tokenize=True`")
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt' (torch), got {return_tensors!r}")
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        conversations = list(conversation) if batched else [conversation]
        variables = {**self.template_variables(), **kwargs}
        texts, spans = [], []
        for chat in conversations:
            text, found = render_chat_template(template, chat, tools=tools, documents=documents,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message,
                                               track_generation=return_assistant_tokens_mask, **variables)
            texts.append(text)
            spans.append(found)
        if not tokenize:
            return texts if batched else texts[0]
        return self._encode_rendered(texts, spans, batched, padding=padding, truncation=truncation,
                                     max_length=max_length, return_tensors=return_tensors, return_dict=return_dict,
                                     assistant_mask=return_assistant_tokens_mask)

    def _encode_rendered(self, texts: list[str], spans: list[list[tuple[int, int]]], batched: bool, padding,
                         truncation: bool, max_length: Optional[int], return_tensors: Optional[str],
                         return_dict: bool, assistant_mask: bool):
        """The tokenizing half of ``apply_chat_template``: rendered texts to ids, attention masks and
        (from the ``{% generation %}`` spans) assistant masks, truncated, padded and shaped as
        transformers returns them."""
        encodings = [self.backend.encode(t, add_special_tokens=False) for t in texts]
        rows = [e.ids for e in encodings]
        masks = []
        for enc, found in zip(encodings, spans):
            mask = [0] * len(enc.ids)
            if assistant_mask:
                for t, (a, b) in enumerate(enc.offsets):
                    mask[t] = int(any(b > s and a < e for s, e in found))
            masks.append(mask)
        if max_length is not None and truncation:
            rows, masks = [r[:max_length] for r in rows], [m[:max_length] for m in masks]
        elif max_length is not None and any(len(r) > max_length for r in rows):
            raise ValueError(f"the conversation is {max(map(len, rows))} tokens, longer than max_length={max_length} "
                             "(pass truncation=True to cut it)")
        attention = [[1] * len(r) for r in rows]
        if padding or (return_tensors and batched):
            width = max(map(len, rows)) if padding != "max_length" or max_length is None else max_length
            if return_tensors and not padding and len({len(r) for r in rows}) > 1:
                raise ValueError("conversations have different lengths; pass padding=True to return tensors")
            pad = self.pad_id if self.pad_id is not None else 0
            rows = [r + [pad] * (width - len(r)) for r in rows]
            masks = [m + [0] * (width - len(m)) for m in masks]
            attention = [a + [0] * (width - len(a)) for a in attention]
        if not return_dict:
            if return_tensors:
                return torch.tensor(rows if batched else rows[:1], dtype=torch.long)
            return rows if batched else rows[0]
        out = {"input_ids": rows, "attention_mask": attention}
        if assistant_mask:
            out["assistant_masks"] = masks
        if return_tensors:
            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        return out if batched else {k: v[0] for k, v in out.items()}

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token a reply may end on: the folder's ``eos_token_id`` list (generation_config.json), its
        eos token, and the end-of-turn tokens its chat template writes after an assistant reply
        (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ...). zenlm's own template ends at ``<|end|>``."""
        ids: list[int] = list(self.eos_token_ids)
        eos = self.special_tokens.get("eos_token")
        names = [eos] if eos else []
        if not self.has_chat_template:
            names.append(ROLE_TOKENS[3])
        else:
            names += self._template_end_tokens()
        for name in names:
            i = self.token_to_id(name)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def _template_end_tokens(self) -> list[str]:
        """Special tokens the template writes right after an assistant's reply, plus the known
        end-of-turn tokens its text names."""
        templates = self.chat_template.values() if isinstance(self.chat_template, dict) else [self.chat_template]
        added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        names = []
        for template in templates:
            names += [t for t in END_OF_TURN_TOKENS if t in template and t in added]
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "zenlm-probe-reply"}]
            try:
                text, _ = render_chat_template(template, probe, **self.template_variables())
            except ValueError:
                continue
            tail = text[text.rfind("zenlm-probe-reply") + len("zenlm-probe-reply"):]
            enc = self.backend.encode(tail, add_special_tokens=False)
            names += [tok for tok in enc.tokens if tok in added][:1]  # the first special token after the reply
        return list(dict.fromkeys(names))

    def chat_options(self) -> dict:
        """What the chat template needs besides tokenizer.json (for worker processes and caches)."""
        return {"chat_template": self.chat_template, "special_tokens": dict(self.special_tokens),
                "eos_token_ids": list(self.eos_token_ids)}

    def with_chat_options(self, options: Optional[dict]) -> "Tokenizer":
        if options:
            self.chat_template = options.get("chat_template")
            self.special_tokens = dict(options.get("special_tokens") or {})
            self.eos_token_ids = list(options.get("eos_token_ids") or [])
        return self

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Save to ``path`` (a folder gets ``tokenizer.json`` inside)."""
        from .checkpoint import atomic_write

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / TOKENIZER_FILE
        atomic_write(path, lambda tmp: self.backend.save(tmp))
        if path.name == TOKENIZER_FILE and (self.chat_template or self.special_tokens):
            self._save_chat_files(path.parent)
        return path

    def _save_chat_files(self, directory: Path) -> None:
        """The template as transformers writes it (chat_template.jinja, named ones in
        additional_chat_templates/) and the special tokens in tokenizer_config.json (merged into one
        already there), so the folder renders the same here and in transformers."""
        from .checkpoint import atomic_write

        templates = self.chat_template if isinstance(self.chat_template, dict) else \
            ({"default": self.chat_template} if self.chat_template else {})
        for name, text in templates.items():
            if name == "default":
                target = directory / CHAT_TEMPLATE_FILE
            else:
                if not name or "/" in name or "\\" in name or name.startswith("."):
                    raise ValueError(f"invalid chat template name {name!r}")
                (directory / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
                target = directory / CHAT_TEMPLATE_DIR / f"{name}.jinja"
            atomic_write(target, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                config = {}
        config.pop("chat_template", None)  # the .jinja files carry it
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key, value in self.special_tokens.items():
            config.setdefault(key, value)
        atomic_write(config_path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, ensure_ascii=False)
                                                                   + "\n", encoding="utf-8"))

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
        return cls(backend, **read_chat_files(path.parent))

    def __len__(self) -> int:
        return self.vocab_size


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):  # an AddedToken as transformers serialises it
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def read_chat_files(directory: Union[str, os.PathLike]) -> dict:
    """A folder's chat template, named special tokens and end tokens, read as transformers reads them:
    chat_template.jinja and additional_chat_templates/*.jinja first, else ``chat_template`` in
    tokenizer_config.json (a string, or a list of ``{"name", "template"}``), else chat_template.json;
    special tokens from tokenizer_config.json over special_tokens_map.json; ``eos_token_id`` (an id or a
    list) from generation_config.json and config.json. Returns Tokenizer keyword arguments."""
    directory = Path(directory)
    config = _read_json(directory / TOKENIZER_CONFIG_FILE) if (directory / TOKENIZER_CONFIG_FILE).is_file() else {}
    special_map = directory / "special_tokens_map.json"
    special_map = _read_json(special_map) if special_map.is_file() else {}
    special = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = _token_text(config.get(key)) if config.get(key) is not None else _token_text(special_map.get(key))
        if value is not None:
            special[key] = value
    templates: dict = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    template: Union[str, dict, None]
    if templates:
        template = templates["default"] if list(templates) == ["default"] else templates
    else:
        template = config.get("chat_template")
        if template is None and (directory / "chat_template.json").is_file():  # processors' older file
            template = _read_json(directory / "chat_template.json").get("chat_template")
        if isinstance(template, (list, tuple)):
            template = {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
        if not isinstance(template, (str, dict)) or not template:
            template = None
    eos: list[int] = []
    for name in ("generation_config.json", "config.json"):
        if (directory / name).is_file():
            try:
                value = _read_json(directory / name).get("eos_token_id")
            except ValueError:  # a broken model config is the model loader's error to report, not ours
                continue
            for i in (value if isinstance(value, list) else [value]):
                if isinstance(i, int) and not isinstance(i, bool) and i not in eos:
                    eos.append(i)
    return {"chat_template": template, "special_tokens": special, "eos_token_ids": eos}


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
