"""Mixtral: the Mistral layout (an optional sliding window on every layer) with a sparse mixture of
experts in place of each MLP: a router over ``num_local_experts`` SwiGLU experts, the top
``num_experts_per_tok`` (2) per token, their softmax weights rescaled to sum to 1, no shared expert.
HF stores every expert apart (``block_sparse_moe.experts.{e}.w1/w3/w2``: gate, up, down); gate|up are
fused into our expert's ``fc_in`` as in Llama's MLP.

The load-balancing loss (transformers' ``router_aux_loss_coef``) is a training term, not part of the model:
``TrainConfig.router_aux_loss_coef`` (or ``model(..., router_aux_loss_coef=)``) adds it to the loss
(``zenlm.model.load_balancing_loss``).
"""
from __future__ import annotations

from typing import Any

from ...config import TransformerConfig
from ..family import Family, Source, require_off
from .llama import DECODER_FIXED, decoder_config, decoder_config_to_hf, decoder_fields, llama_weights


def moe_weights(block: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), shared: bool = False,
                layer: str = "model.layers.{n}.") -> dict[str, Source]:
    """Our mixture-of-experts tensors -> HF names (``{e}`` is the expert index): the router, each expert's
    gate|up (fused into ``fc_in``) and down, and Qwen2-MoE's shared expert with its gate."""
    gate, up, down = names
    p = f"{layer}{block}."
    out: dict[str, Source] = {
        "decoder.layers.{n}.mlp.router.weight": f"{p}gate.weight",
        "decoder.layers.{n}.mlp.experts.{e}.fc_in.weight": (f"{p}experts.{{e}}.{gate}.weight",
                                                            f"{p}experts.{{e}}.{up}.weight"),
        "decoder.layers.{n}.mlp.experts.{e}.fc_out.weight": f"{p}experts.{{e}}.{down}.weight",
    }
    if shared:
        out["decoder.layers.{n}.mlp.shared.fc_in.weight"] = (f"{p}shared_expert.{gate}.weight",
                                                             f"{p}shared_expert.{up}.weight")
        out["decoder.layers.{n}.mlp.shared.fc_out.weight"] = f"{p}shared_expert.{down}.weight"
        out["decoder.layers.{n}.mlp.shared_gate.weight"] = f"{p}shared_expert_gate.weight"
    return out


def experts_from_hf(h: dict, family: str, default: int) -> dict[str, Any]:
    """How many experts and how many per token (transformers 5 writes ``num_local_experts`` where the
    Hub's Qwen configs say ``num_experts``)."""
    experts = h.get("num_experts", h.get("num_local_experts", default))
    if not experts:
        raise ValueError(f"{family}: num_experts={experts!r}; a mixture-of-experts model needs at least one expert")
    return dict(num_experts=experts, experts_per_token=h.get("num_experts_per_tok", 2))


def _mixtral_from_hf(h: dict, names: set[str]) -> dict:
    require_off(h, "mixtral", "router_jitter_noise")  # multiplicative noise on the router's input while training
    out = dict(decoder_config(h, "mixtral", names), **experts_from_hf(h, "mixtral", 8))
    if h.get("sliding_window") is not None:
        out["sliding_window"] = h["sliding_window"]
    return out


def _mixtral_to_hf(c: TransformerConfig) -> dict:
    return dict(decoder_config_to_hf(c), sliding_window=c.sliding_window, num_local_experts=c.num_experts,
                num_experts_per_tok=c.experts_per_token, router_jitter_noise=0.0)


_DENSE_MLP = ("decoder.layers.{n}.mlp.fc_in.weight", "decoder.layers.{n}.mlp.fc_in.bias",
              "decoder.layers.{n}.mlp.fc_out.weight", "decoder.layers.{n}.mlp.fc_out.bias")

MIXTRAL = Family(
    model_type="mixtral", architecture="MixtralForCausalLM", base_architecture="MixtralModel", prefix="model.",
    fields=decoder_fields(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                          rms_norm_eps=1e-5),
    fixed=dict(DECODER_FIXED, bias=False, layer_types=None, expert_intermediate_size=None,
               normalize_expert_weights=True, shared_expert_size=0, dense_layers=None),
    weights={**{k: v for k, v in llama_weights().items() if k not in _DENSE_MLP},
             **moe_weights("block_sparse_moe", ("w1", "w3", "w2"))},
    config_from_hf=_mixtral_from_hf, config_to_hf=_mixtral_to_hf,
    ignore=(r".*rotary_emb\.inv_freq",),
    aliases={"model.embed_tokens.weight": ("lm_head.weight",)},
)
