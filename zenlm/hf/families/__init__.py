"""The Hugging Face families zenlm reads and writes: one file each, registered in one table.

Each file (bert.py, gpt2.py, bart.py for BART and Marian, llama.py, qwen.py for Qwen2 and
Qwen3, mistral.py, phi3.py, gemma.py for Gemma 2 and Gemma 3, the mixtures of experts
mixtral.py, qwen2_moe.py, qwen3_moe.py, and the encoder-decoders t5.py and m2m100.py (M2M100 and
NLLB-200)) holds a ``Family`` record (see ``..family``): config map and weight-name map as data,
plus the few hooks and layout changes that are not renames. To add a family: write ``<name>.py``
with its ``Family``, list it in ``FAMILIES`` below, and add its parity test in tests/hf/. Loading,
saving, converting and ``zenlm info`` find it here by ``model_type``; no other code changes.
"""
from __future__ import annotations

from ...checkpoint import PathLike
from ..family import Family
from .bart import BART, MARIAN
from .bert import BERT
from .gemma import GEMMA2, GEMMA3
from .gpt2 import GPT2
from .llama import LLAMA
from .m2m100 import M2M100
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .phi3 import PHI3
from .qwen import QWEN2, QWEN3
from .qwen2_moe import QWEN2_MOE
from .qwen3_moe import QWEN3_MOE
from .t5 import T5

# model_type -> family; ``family_for`` tries them in this order on a config that names none
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    BERT,
    GPT2,
    BART, MARIAN,
    LLAMA,
    QWEN2, QWEN3,
    MISTRAL,
    PHI3,
    GEMMA2, GEMMA3,
    MIXTRAL, QWEN2_MOE, QWEN3_MOE,
    T5, M2M100,
)}


def family_of(hf_config: dict, source: PathLike = "config.json") -> Family:
    """The family of an HF config.json dict, by its ``model_type``; the error lists those supported."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: unsupported architecture model_type={model_type!r} "
                         f"({', '.join(hf_config.get('architectures') or [])}); supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
