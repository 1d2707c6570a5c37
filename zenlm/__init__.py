"""zenlm: build, train, run and sell your own transformer language models."""
from .config import PRESETS, TransformerConfig
from .kernels import fast_cpu
from .model import KVCache, LMOutput, TransformerLM, TransformerModel, TransformerOutput, pool
from .tokenizer import Tokenizer
from . import generate  # a module you can call: zenlm.generate(model, prompt, tokenizer=tok)

__version__ = "0.1.0"


def load(path, **kwargs) -> TransformerLM:
    """Load a model folder: a zenlm checkpoint (config.json + model.safetensors), or a local
    Hugging Face folder (config.json with a "model_type": BERT, GPT-2, BART, Marian, Llama),
    converted on the fly by ``zenlm.hf``. The tokenizer beside either comes from
    ``zenlm.load_tokenizer(path)``."""
    from .hf import is_hf_folder, load_hf

    if is_hf_folder(path):
        return load_hf(path, **kwargs)
    from .checkpoint import load_model

    return load_model(path, **kwargs)


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer.json beside a model folder (zenlm or Hugging Face). To encode exactly as
    transformers does, pass ``add_special_tokens=True`` (its default) when encoding."""
    from .hf import load_tokenizer as _load

    return _load(path)


def embed(texts, model, **options):
    """Sentence embeddings: ``zenlm.embed(["a text", ...], "model-folder")`` -> (N, dim) float32
    array (pooling, normalisation and max length from the folder; see ``zenlm.retrieval.Embedder``)."""
    from .retrieval.embed import embed as _embed

    return _embed(texts, model, **options)


__all__ = ["TransformerConfig", "TransformerModel", "TransformerLM", "TransformerOutput", "LMOutput", "KVCache",
           "Tokenizer", "PRESETS", "pool", "fast_cpu", "load", "load_tokenizer", "embed", "generate", "__version__"]
