"""TransformerConfig: one dataclass that describes every model zenlm builds.

The flags are wide enough that BERT, GPT-2, BART, Marian and Llama are the same
model with different settings (see ``PRESETS``), so there is one attention
implementation to trust, test and speed up.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh")
GATED = ("swiglu", "geglu", "geglu_tanh")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rotary", "relative", "none")
POOLINGS = ("mean", "cls", "last")
LAYER_TYPES = ("full_attention", "sliding_attention")
# rotary scalings (``rope_scaling["rope_type"]``) and the keys each reads: (required, optional)
ROPE_SCALINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
}


@dataclass
class TransformerConfig:
    """Shape and flavour of a transformer.

    Family is decided by the layer counts: both > 0 is encoder-decoder,
    ``num_encoder_layers == 0`` is decoder-only, ``num_decoder_layers == 0`` is
    encoder-only.
    """

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_key_value_heads: Optional[int] = None  # None = num_attention_heads (no GQA)
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_position_embeddings: int = 512

    # flavour
    pre_norm: bool = True  # pre-LN (GPT-2, Llama) or post-LN (BERT, BART, Marian)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    position: str = "learned"
    position_offset: int = 0  # BART's learned positions start at row 2; fairseq's sinusoids at angle pad_token_id + 1
    sinusoid_endpoint: bool = False  # sinusoid frequencies 1 … 1/10000 with both ends (10000^(-i/(d/2-1)), fairseq:
    # M2M100, NLLB) instead of Marian's 10000^(-2i/d)
    positions_skip_pad: bool = False  # positions count non-pad tokens only; a pad token gets no position vector
    # (fairseq's make_positions: a left-padded sentence keeps the positions it has alone)
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": one of ROPE_SCALINGS, ...its keys}; None = plain RoPE
    rope_local_theta: Optional[float] = None  # RoPE base of the sliding-window layers (Gemma 3); None = rope_theta
    relative_buckets: int = 32  # position="relative" (T5): a learned bias per head for each bucket of key - query
    relative_max_distance: int = 128  # distances past this share the last bucket (buckets grow logarithmically)
    partial_rotary_factor: float = 1.0  # share of each head's dims that rotate (Phi-4-mini: 0.75)
    head_size: Optional[int] = None  # width of one attention head; None = hidden_size // num_attention_heads
    bias: bool = True
    qkv_bias: Optional[bool] = None  # bias on the q/k/v projections only (Qwen2); None = ``bias``
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), weight starting at 0 (Gemma)
    sandwich_norm: bool = False  # a norm after attention and after the MLP as well as before (Gemma 2/3)
    sliding_window: Optional[int] = None  # a query sees the last ``sliding_window`` positions (itself included)
    layer_types: Optional[list] = None  # per decoder layer, one of LAYER_TYPES; None = all sliding if a window is set
    query_pre_attn_scalar: Optional[float] = None  # scores scaled by 1/sqrt(this) instead of 1/sqrt(head_dim) (Gemma)
    attn_logit_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_logit_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    scale_embedding: bool = False  # multiply token embeddings by sqrt(hidden_size)
    embedding_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    final_norm: bool = True  # a norm after the last layer of each stack (pre-LN models)
    type_vocab_size: int = 0  # BERT token-type embeddings; 0 = none
    tie_word_embeddings: bool = True  # output projection shares the input embedding
    lm_head_bias: bool = False  # BART/Marian final_logits_bias
    logit_scale: float = 1.0  # logits multiplied by this (T5 with tied embeddings: hidden_size ** -0.5)
    mlm_transform: bool = False  # BERT's dense+act+norm before the masked-LM projection
    # mixture of experts (decoder layers): a router sends each token to the top ``experts_per_token`` of
    # ``num_experts`` expert MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE); 0 = one dense MLP per layer
    num_experts: int = 0
    experts_per_token: int = 2
    expert_intermediate_size: Optional[int] = None  # width of one expert; None = intermediate_size
    normalize_expert_weights: bool = True  # the top-k router probabilities rescaled to sum to 1 (Qwen's norm_topk_prob)
    shared_expert_size: int = 0  # width of an always-on expert gated by sigmoid(w·x) (Qwen2-MoE); 0 = none
    dense_layers: Optional[list] = None  # decoder layers with a dense MLP of intermediate_size instead (Qwen's mlp_only_layers)

    # regularisation
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    # special tokens
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: Optional[int] = None  # None = bos_token_id

    # free-form notes carried with the checkpoint (e.g. the HF family it came from)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ rules
    def validate(self) -> None:
        """Raise ValueError naming the offending value and the rule it breaks. It is long because it
        is the list of rules, one check each, read top to bottom."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            positive(name)
        for name in ("num_encoder_layers", "num_decoder_layers", "type_vocab_size", "position_offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.num_encoder_layers == 0 and self.num_decoder_layers == 0:
            raise ValueError("num_encoder_layers and num_decoder_layers are both 0: a model needs at least one layer")
        if self.head_size is not None:
            positive("head_size")
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; valid: {', '.join(POSITIONS)}")
        if self.position == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if not (isinstance(self.partial_rotary_factor, (int, float)) and 0 < self.partial_rotary_factor <= 1):
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.position == "rotary" and self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} gives an odd rotary width "
                             f"{self.rotary_dim} of head_dim {self.head_dim}")
        self._validate_rope_scaling()
        if self.positions_skip_pad and self.position != "sinusoidal":
            raise ValueError(f"positions_skip_pad needs position='sinusoidal', got position={self.position!r}")
        if self.sliding_window is not None:
            positive("sliding_window")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"layer_types holds {bad[0]!r}; valid: {', '.join(LAYER_TYPES)}")
            if len(self.layer_types) != self.num_decoder_layers:
                raise ValueError(f"layer_types lists {len(self.layer_types)} layers; the decoder has "
                                 f"{self.num_decoder_layers}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types names sliding_attention layers but sliding_window is None")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0 (or None), got {value!r}")
        self._validate_experts()
        if self.position == "relative":
            positive("relative_buckets")
            positive("relative_max_distance")
            if self.relative_buckets < 4:
                raise ValueError(f"relative_buckets must be >= 4 (half exact, half logarithmic per direction), "
                                 f"got {self.relative_buckets}")
        if not (isinstance(self.logit_scale, (int, float)) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale!r}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not (self.norm_eps > 0):
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not (self.rope_theta > 0):
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {value!r}")

    def _validate_experts(self) -> None:
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 0:
            raise ValueError(f"num_experts must be an integer >= 0, got {self.num_experts!r}")
        if not isinstance(self.shared_expert_size, int) or self.shared_expert_size < 0:
            raise ValueError(f"shared_expert_size must be an integer >= 0, got {self.shared_expert_size!r}")
        if not self.num_experts:
            if self.shared_expert_size:
                raise ValueError(f"shared_expert_size={self.shared_expert_size} needs num_experts > 0")
            return
        if self.num_encoder_layers:
            raise ValueError(f"num_experts={self.num_experts} needs a decoder-only model (zenlm routes decoder layers "
                             f"only), got num_encoder_layers={self.num_encoder_layers}")
        if not (isinstance(self.experts_per_token, int) and 1 <= self.experts_per_token <= self.num_experts):
            raise ValueError(f"experts_per_token must be in [1, num_experts={self.num_experts}], "
                             f"got {self.experts_per_token!r}")
        if self.expert_intermediate_size is not None:
            if not isinstance(self.expert_intermediate_size, int) or self.expert_intermediate_size <= 0:
                raise ValueError(f"expert_intermediate_size must be a positive integer, got "
                                 f"{self.expert_intermediate_size!r}")
        if self.dense_layers is not None:
            bad = [i for i in self.dense_layers if not (isinstance(i, int) and 0 <= i < self.num_decoder_layers)]
            if bad:
                raise ValueError(f"dense_layers holds {bad[0]!r}; layers are 0..{self.num_decoder_layers - 1}")
            self.dense_layers = sorted(set(self.dense_layers))

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict with a rope_type, got {self.rope_scaling!r}")
        kind = self.rope_scaling.get("rope_type")
        if kind not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported; supported: "
                             f"{', '.join(ROPE_SCALINGS)} (or rope_scaling=None for plain RoPE)")
        required, optional = ROPE_SCALINGS[kind]
        missing = [k for k in required if self.rope_scaling.get(k) is None]
        if missing:
            raise ValueError(f"rope_scaling: rope_type {kind!r} needs {', '.join(missing)}")
        unknown = sorted(set(self.rope_scaling) - {"rope_type", *required, *optional})
        if unknown:
            raise ValueError(f"rope_scaling: {unknown[0]}={self.rope_scaling[unknown[0]]!r} is not supported for "
                             f"rope_type {kind!r} (it reads {', '.join(required + optional)})")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(self.rope_scaling[key]) != self.rotary_dim // 2:
                    raise ValueError(f"rope_scaling: {key} has {len(self.rope_scaling[key])} values; "
                                     f"the rotary width {self.rotary_dim} needs {self.rotary_dim // 2}")

    # ------------------------------------------------------------ properties
    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims rotate (the first ones); the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends within ``sliding_window`` only."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def is_moe(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` routes tokens to experts instead of one dense MLP."""
        return self.num_experts > 0 and layer not in (self.dense_layers or ())

    @property
    def family(self) -> str:
        """'encoder-decoder', 'decoder-only' or 'encoder-only'."""
        if self.num_encoder_layers and self.num_decoder_layers:
            return "encoder-decoder"
        return "decoder-only" if self.num_decoder_layers else "encoder-only"

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family == "encoder-decoder"

    @property
    def start_token_id(self) -> int:
        return self.bos_token_id if self.decoder_start_token_id is None else self.decoder_start_token_id

    # -------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TransformerConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if "model_type" in data:
            raise ValueError(f"{path} is a Hugging Face config; import it with zenlm.load() / `zenlm convert from-hf`")
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TransformerConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---------------------------------------------------------------- costs
    _model_class: ClassVar[Optional[type]] = None  # TransformerLM, registered by model.py on import

    @classmethod
    def register_model(cls, model_class: type) -> None:
        """model.py hands its class over, so that counting parameters (below) builds the real
        model without this ground-floor module importing the floor above it."""
        cls._model_class = model_class

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count of the model this config describes (built on the meta device: no memory)."""
        import torch

        if TransformerConfig._model_class is None:
            raise RuntimeError("no model class registered; import zenlm (or zenlm.model) first")
        with torch.device("meta"):
            model = TransformerConfig._model_class(self)
        params = {id(p): p for p in model.parameters()}
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            total -= model.embed_tokens.weight.numel()
        return total


def estimate_costs(config: TransformerConfig, batch_size: int = 1, seq_len: Optional[int] = None,
                   bytes_per_param: int = 4) -> dict[str, float]:
    """FLOPs per token and memory for a training step, from the shape alone.

    FLOPs follow the usual accounting (Kaplan et al.; nanoGPT's estimate_mfu):
    2 per parameter per token forward, 3x that for forward+backward, plus the
    attention score/value products (2 * 2 * layers * seq * hidden forward).
    Activation memory uses Korthikanti et al.'s per-layer estimate without
    recomputation: seq*batch*hidden*(34 + 5*heads*seq/hidden) bytes in 16-bit,
    doubled for fp32.
    """
    seq = seq_len or config.max_position_embeddings
    n_params = config.num_parameters()
    n_embed = config.vocab_size * config.hidden_size
    layers = config.num_encoder_layers + config.num_decoder_layers
    # decoder layers of an encoder-decoder model also attend across to the source
    attn_layers = layers + (config.num_decoder_layers if config.is_encoder_decoder else 0)
    # non-embedding parameters per token (the embedding lookup is free; the output projection is not)
    matmul_params = n_params - n_embed + (config.vocab_size * config.hidden_size if config.num_decoder_layers else 0)
    if config.is_encoder_decoder:
        # each token flows through one stack only: count half the layers per token
        matmul_params = (n_params - n_embed) / 2 + config.vocab_size * config.hidden_size / 2
    if config.num_experts:  # each token runs experts_per_token of the num_experts in a mixture-of-experts layer
        width = config.expert_intermediate_size or config.intermediate_size
        per_expert = config.hidden_size * width * (3 if config.activation in GATED else 2)
        moe_layers = sum(config.is_moe(i) for i in range(config.num_decoder_layers))
        matmul_params -= moe_layers * (config.num_experts - config.experts_per_token) * per_expert
    forward = 2 * matmul_params + 4 * attn_layers * seq * config.hidden_size / (2 if config.is_encoder_decoder else 1)
    act_per_layer = seq * batch_size * config.hidden_size * (
        34 + 5 * config.num_attention_heads * seq / config.hidden_size) * (bytes_per_param / 2)
    return {
        "parameters": n_params,
        "forward_flops_per_token": forward,
        "training_flops_per_token": 3 * forward,
        "weights_bytes": n_params * bytes_per_param,
        "grads_bytes": n_params * bytes_per_param,
        "optimizer_bytes": n_params * 8,  # AdamW: two fp32 moments
        "activations_bytes": act_per_layer * layers,
        "batch_size": batch_size,
        "seq_len": seq,
    }


# Named shapes. ``seed-base`` is the contract shape (BART-base-like, post-LN);
# the family presets carry the flags that make their checkpoints load.
PRESETS: dict[str, dict[str, Any]] = {
    "seed-base": dict(vocab_size=10000, hidden_size=768, intermediate_size=3072, num_attention_heads=8,
                      num_encoder_layers=6, num_decoder_layers=6, max_position_embeddings=512),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                 num_encoder_layers=0, num_decoder_layers=4, max_position_embeddings=256,
                 position="rotary", norm="rmsnorm", activation="swiglu", bias=False),
    "tiny-seq2seq": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                         num_encoder_layers=2, num_decoder_layers=2, max_position_embeddings=256),
    "bert-base": dict(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                      num_encoder_layers=12, num_decoder_layers=0, max_position_embeddings=512,
                      pre_norm=False, norm_eps=1e-12, activation="gelu", type_vocab_size=2,
                      embedding_norm=True, final_norm=False, mlm_transform=True, pad_token_id=0,
                      bos_token_id=101, eos_token_id=102),
    "gpt2-small": dict(vocab_size=50257, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                       num_encoder_layers=0, num_decoder_layers=12, max_position_embeddings=1024,
                       activation="gelu_tanh", pad_token_id=50256, bos_token_id=50256, eos_token_id=50256),
    "bart-base": dict(vocab_size=50265, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                      num_encoder_layers=6, num_decoder_layers=6, max_position_embeddings=1024,
                      pre_norm=False, activation="gelu", position_offset=2, embedding_norm=True,
                      final_norm=False, lm_head_bias=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      decoder_start_token_id=2),
    "llama-tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                       num_key_value_heads=4, num_encoder_layers=0, num_decoder_layers=4,
                       max_position_embeddings=2048, norm="rmsnorm", norm_eps=1e-6, activation="swiglu",
                       position="rotary", bias=False, tie_word_embeddings=False),
}
