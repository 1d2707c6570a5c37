"""zenlm: build, train, run and sell your own transformer language models."""
from .config import PRESETS, TransformerConfig
from .kernels import fast_cpu
from .model import KVCache, LMOutput, TransformerLM, TransformerModel, TransformerOutput, pool
from .tokenizer import Tokenizer
from .generation import GenerationConfig, Generator, generate
from . import model as _model
from .checkpoint import load_model as _load_model, save_pretrained as _save_pretrained
from .api import LLM
from .folders import load, load_tokenizer
from .hf import load_hf as _load_hf

# model.py is the ground floor: the conveniences on the model come from the floors above
_model.provide(generate=generate, save_pretrained=_save_pretrained, load_model=_load_model, load_hf=_load_hf)

__version__ = "0.1.0"


def __getattr__(name: str):
    """``zenlm.embed`` (sentence embeddings: ``zenlm.embed(["a text"], "model-folder")``) is
    ``zenlm.retrieval.embed.embed``, imported on first use so ``import zenlm`` stays light."""
    if name == "embed":
        from .retrieval.embed import embed

        return embed
    raise AttributeError(f"module 'zenlm' has no attribute {name!r}")


__all__ = ["LLM", "GenerationConfig", "Generator", "TransformerConfig", "TransformerModel", "TransformerLM", "TransformerOutput", "LMOutput", "KVCache",
           "Tokenizer", "PRESETS", "pool", "fast_cpu", "load", "load_tokenizer", "embed", "generate", "__version__"]
