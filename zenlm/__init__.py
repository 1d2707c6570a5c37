"""zenlm: build, train, run and sell your own transformer language models."""
from .config import PRESETS, TransformerConfig
from .model import KVCache, LMOutput, TransformerLM, TransformerModel, TransformerOutput, pool
from .tokenizer import Tokenizer

__version__ = "0.1.0"


def load(path, **kwargs) -> TransformerLM:
    """Load a model folder: a zenlm checkpoint (config.json + model.safetensors)."""
    from .checkpoint import load_model

    return load_model(path, **kwargs)


__all__ = ["TransformerConfig", "TransformerModel", "TransformerLM", "TransformerOutput", "LMOutput", "KVCache",
           "Tokenizer", "PRESETS", "pool", "load", "__version__"]
