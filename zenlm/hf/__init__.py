"""Hugging Face checkpoints in and out: BERT (MiniLM), GPT-2, BART, MarianMT, Llama (1-3.x),
Qwen2/2.5/3, Mistral, Phi-3/Phi-4-mini, Gemma 2 and Gemma 3 (text).

The entry points live here: ``load_hf`` (an HF folder -> a zenlm model), ``save_hf`` (a model ->
an HF folder transformers loads), ``convert_from_hf``/``convert_to_hf`` (folder -> folder),
``read_hf_config``, ``is_hf_folder`` and ``load_tokenizer``. The rest of the package:

* ``families/``: one file per family (``bert``, ``gpt2``, ``bart`` for BART and Marian,
  ``llama``, ``qwen`` for Qwen2 and Qwen3, ``mistral``, ``phi3``, ``gemma`` for Gemma 2 and 3), each
  a ``Family`` record of config and weight-name maps as data, registered in
  ``families.FAMILIES`` by ``model_type``; ``family.py`` defines the record;
* ``configs.py``: config.json <-> ``TransformerConfig``, and which family a config exports as;
* ``weights.py``: the weight maps run both ways (fused q|k|v, transposes, renames);
* ``files.py``: safetensors, shards and legacy ``.bin`` read safely (``.bin`` only through
  ``torch.load(weights_only=True)``); every error names the file and the tensor;
* ``generation.py``: generation_config.json <-> ``config.extra["generation"]``.

transformers is never imported here, and nothing touches the network. Every public name of the
former single-module ``zenlm.hf`` is importable from here as before.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..checkpoint import CONFIG_NAME, TOKENIZER_NAME, PathLike, atomic_write, read_json, save_weights
from ..config import TransformerConfig
from .configs import TRAINING_ONLY, config_from_hf, config_to_hf, family_for
from .families import FAMILIES, family_of
from .families.bart import BART, MARIAN
from .families.bert import BERT, POOLER, POOLER_FILE, attach_pooler, pooler_output
from .families.gpt2 import GPT2
from .families.llama import LLAMA
from .family import ACT_FROM_HF, ACT_TO_HF, REQUIRED, Family, Source
from .files import TensorFiles
from .generation import GENERATION_NAME, HF_GENERATION, generation_from_hf, generation_to_hf
from .weights import HEAD_PARAMS, state_from_hf, state_to_hf

__all__ = [
    "load_hf", "save_hf", "convert_from_hf", "convert_to_hf", "read_hf_config", "is_hf_folder", "load_tokenizer",
    "pooler_output", "config_from_hf", "config_to_hf", "family_of", "family_for", "generation_from_hf",
    "generation_to_hf", "state_from_hf", "state_to_hf", "TensorFiles", "Family", "Source", "REQUIRED", "FAMILIES",
    "BERT", "GPT2", "BART", "MARIAN", "LLAMA", "ACT_FROM_HF", "ACT_TO_HF", "TRAINING_ONLY", "HEAD_PARAMS",
    "GENERATION_NAME", "HF_GENERATION", "HF_SIDE_FILES", "POOLER", "POOLER_FILE",
]

log = logging.getLogger(__name__)

HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", GENERATION_NAME)


# --------------------------------------------------------------------------- import
_INIT_LOCK = threading.Lock()
_SKIPPING = threading.local()


@contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without random initialisation: every weight is replaced by the
    checkpoint's right after (transformers' from_pretrained does the same); for a
    BART-base-sized model this is most of the load time. Only this thread skips:
    a model built meanwhile on another thread is initialised as usual."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_", "constant_")

    def skipping(original):
        def init(tensor, *args, **kwargs):
            return tensor if getattr(_SKIPPING, "on", False) else original(tensor, *args, **kwargs)
        return init

    with _INIT_LOCK:
        saved = {n: getattr(torch.nn.init, n) for n in names}
        try:
            for n in names:
                setattr(torch.nn.init, n, skipping(saved[n]))
            _SKIPPING.on = True
            yield
        finally:
            _SKIPPING.on = False
            for n, fn in saved.items():
                setattr(torch.nn.init, n, fn)


def is_hf_folder(path: PathLike) -> bool:
    """A Hugging Face model folder: config.json with a ``model_type``."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(directory: PathLike) -> TransformerConfig:
    """The zenlm config of an HF folder without building the model (for ``zenlm info``): config.json,
    generation_config.json and, for BERT's MLM head, the tensor names (a folder without weights
    is read from its config alone)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model folder")
    hf_config = read_json(directory / CONFIG_NAME)
    family_of(hf_config, directory / CONFIG_NAME)
    try:
        names = set(TensorFiles(directory).where)
    except FileNotFoundError:
        names = set()
    generation = directory / GENERATION_NAME
    return config_from_hf(hf_config, names, directory / CONFIG_NAME,
                          read_json(generation) if generation.is_file() else None)


def load_hf(directory: PathLike, cls=None, dtype: Optional[torch.dtype] = None):
    """Build a zenlm model (``TransformerLM`` by default) from a local Hugging Face folder.

    ``dtype`` None keeps the dtype the folder's weights are stored in (a bf16 or fp16 folder stays
    bf16/fp16, an fp32 one fp32); ``torch.float32`` (or another) converts while reading. Weights
    are memory-mapped: a tensor already in the target dtype is a view of the file, fused and
    converted ones are read into their one destination part by part, so loading holds about one
    copy of the weights in the target dtype. Head tensors are dropped when ``cls`` is the bare
    ``TransformerModel``. Every error names the file and the tensor."""
    from ..model import TransformerLM

    cls = cls or TransformerLM
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model folder at {directory}")
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model folder")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...) or None, "
                         f"got {dtype!r}")
    hf_config = read_json(directory / CONFIG_NAME)
    family = family_of(hf_config, directory / CONFIG_NAME)
    files = TensorFiles(directory)
    generation = directory / GENERATION_NAME
    config = config_from_hf(hf_config, set(files.where), directory / CONFIG_NAME,
                            read_json(generation) if generation.is_file() else None)
    with _skip_init():  # parameters allocated, never written: no resident memory until replaced
        model = cls(config)
    expected = {n: t.shape for n, t in model.state_dict(keep_vars=True).items()}
    threads = torch.get_num_threads()
    try:  # one thread per copy, as many copies at once as torch has threads
        torch.set_num_threads(1)
        state = state_from_hf(files, family, config, expected, dtype, workers=threads)
    finally:
        torch.set_num_threads(threads)
        files.close()
    target = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if family is BERT:
        attach_pooler(model, files, target)
    if target != torch.float32:
        model = model.to(target)  # buffers (sinusoid tables) follow; the parameters already are
        _warn_slow_dtype(target, directory)
    return model.eval()


def _warn_slow_dtype(dtype: torch.dtype, directory: Path) -> None:
    """A half-precision model on a CPU that emulates it runs ~100x slower than in fp32: say so."""
    from ..cpu import native_bf16

    if dtype in (torch.bfloat16, torch.float16) and not native_bf16():
        log.warning("%s: weights kept in %s, which this CPU does not multiply natively (slow); pass "
                    "dtype=torch.float32 to convert them while loading", directory, str(dtype).removeprefix("torch."))


# --------------------------------------------------------------------------- export
def save_hf(model: torch.nn.Module, directory: PathLike, tokenizer=None, side_files_from: Optional[PathLike] = None
            ) -> Path:
    """Write ``model`` as a Hugging Face folder (config.json, model.safetensors, tokenizer files)
    that transformers' ``AutoModel…from_pretrained`` loads with the same outputs."""
    from ..model import TransformerLM

    family = family_for(model.config)
    # a BERT without its MLM head (MiniLM) is a bare BertModel; any bare backbone likewise
    head = isinstance(model, TransformerLM) and (family is not BERT or model.config.mlm_transform)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_to_hf(model, family, head)
    pooler = getattr(model, "hf_pooler", None)
    if family is BERT and not head and pooler:  # BertModel has the pooler; BertForMaskedLM does not
        tensors.update({name: pooler[name].contiguous() for name in POOLER})
    hf_config = config_to_hf(model.config, family, head)
    hf_config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n"))
    save_weights(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    copied = _copy_side_files(side_files_from, directory)
    if GENERATION_NAME not in copied and model.config.extra.get("generation"):
        settings = generation_to_hf(model.config)
        atomic_write(directory / GENERATION_NAME, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save(directory)
        if "tokenizer_config.json" not in copied:
            _write_tokenizer_config(tokenizer, model.config, directory)
    return directory


def _copy_side_files(source: Optional[PathLike], directory: Path) -> list[str]:
    copied = []
    if source is not None and Path(source).resolve() != directory.resolve():
        for name in HF_SIDE_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, directory / name)
                copied.append(name)
    return copied


def _write_tokenizer_config(tokenizer, config: TransformerConfig, directory: Path) -> None:
    """Enough for AutoTokenizer to load tokenizer.json with the right special tokens."""
    special = {}
    for key, idx in (("pad_token", config.pad_token_id), ("bos_token", config.bos_token_id),
                     ("eos_token", config.eos_token_id)):
        token = tokenizer.id_to_token(idx)
        if token is not None:
            special[key] = token
    for key, token in (("unk_token", "<unk>"), ("mask_token", "<mask>")):
        if tokenizer.token_to_id(token) is not None:
            special[key] = token
    data = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings, **special}
    atomic_write(directory / "tokenizer_config.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


# --------------------------------------------------------------------------- tokenizers and folders
def load_tokenizer(directory: PathLike):
    """The tokenizer beside a model folder (zenlm or Hugging Face), from its tokenizer.json.

    The folder's chat template (tokenizer_config.json, chat_template.jinja, additional_chat_templates/),
    its named special tokens and its end tokens (generation_config.json) come along
    (``zenlm.tokenizer.read_chat_files``), so ``apply_chat_template`` renders as transformers does.
    The pad token named in an HF folder's tokenizer_config.json is honoured. transformers adds
    special tokens by default; to encode exactly as it does, pass ``add_special_tokens=True``
    (BERT's [CLS] … [SEP]) to ``encode``/``encode_batch``."""
    from ..tokenizer import Tokenizer

    directory = Path(directory)
    if not (directory / TOKENIZER_NAME).exists():
        raise FileNotFoundError(f"{directory} has no tokenizer.json (folders with only vocab.txt or *.spm files "
                                "need `AutoTokenizer.from_pretrained(...).save_pretrained(...)` once to create it)")
    tokenizer = Tokenizer.load(directory)
    pad = _special_token(directory, "pad_token")
    if pad is not None and tokenizer.token_to_id(pad) is not None:
        tokenizer.pad_token = pad
    return tokenizer


def _special_token(directory: Path, key: str) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            value = read_json(path).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def convert_from_hf(source: PathLike, out: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """HF folder → zenlm checkpoint folder (config.json, model.safetensors, tokenizer.json).

    The weights are written in fp32 unless ``dtype`` is given (whatever the folder stores: the
    converted checkpoint is a starting point for training). The HF tokenizer_config/
    special_tokens_map/generation_config files ride along so that ``convert_to_hf`` gives them
    back unchanged."""
    from ..checkpoint import save_pretrained

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError(f"source and output are the same folder ({source}); pick a new output folder")
    model = load_hf(source, dtype=dtype or torch.float32)
    tokenizer = load_tokenizer(source) if (source / TOKENIZER_NAME).exists() else None
    if tokenizer is None:
        log.warning("%s has no tokenizer.json; the converted checkpoint has no tokenizer", source)
    save_pretrained(model, out, tokenizer)
    if getattr(model, "hf_pooler", None):
        save_weights(model.hf_pooler, out / POOLER_FILE, metadata={"format": "pt"})
    _copy_side_files(source, out)
    return out


def convert_to_hf(source: PathLike, out: PathLike) -> Path:
    """zenlm checkpoint folder → HF folder that transformers loads."""
    from ..checkpoint import load_model

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError(f"source and output are the same folder ({source}); pick a new output folder")
    if is_hf_folder(source):
        raise ValueError(f"{source} is already a Hugging Face folder (its config.json has a model_type)")
    model = load_model(source)
    if (source / POOLER_FILE).is_file():
        from ..checkpoint import load_weights

        model.hf_pooler = load_weights(source / POOLER_FILE)
    tokenizer = load_tokenizer(source) if (source / TOKENIZER_NAME).exists() else None
    return save_hf(model, out, tokenizer, side_files_from=source)
