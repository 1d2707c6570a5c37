"""The transformer, in one file, read top to bottom like the paper.

    norm → attention → MLP → block → stack (encoder / decoder) → model → heads

Encoder-decoder, decoder-only and encoder-only models are the same code with
different layer counts; BERT, GPT-2, BART, Marian and Llama differ only by the
flags in ``TransformerConfig`` (norm type and placement, activation, position
scheme, bias, key/value heads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import POOLINGS, TransformerConfig
from .kernels import IGNORE_INDEX, causal_mask, cross_entropy, linear


# --------------------------------------------------------------------------- services from above
_SERVICES: dict = {}


def provide(**services) -> None:
    """Register the functions behind ``model.generate``, ``save_pretrained``, ``from_pretrained``
    and ``from_hf`` (names: generate, save_pretrained, load_model, load_hf). ``zenlm/__init__.py``
    does it on import, so this ground floor never imports the floors above it."""
    _SERVICES.update(services)


def _service(name: str):
    if name not in _SERVICES:
        raise RuntimeError(f"{name} is provided by the zenlm package; import zenlm (it registers it on import)")
    return _SERVICES[name]


# --------------------------------------------------------------------------- outputs
@dataclass
class TransformerOutput:
    """What the backbone returns. ``attentions`` holds the main stack's self-attention
    weights (decoder for models with one, else encoder) when asked for."""

    last_hidden_state: torch.Tensor
    encoder_last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional["KVCache"] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    encoder_attentions: Optional[tuple[torch.Tensor, ...]] = None
    cross_attentions: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class LMOutput(TransformerOutput):
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------- norms
def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


# --------------------------------------------------------------------------- positions
def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """[sin | cos] halves with frequencies 1/10000^(2i/d) (Vaswani et al.; Marian's layout)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    half = dim // 2 + dim % 2
    table[:, :half] = torch.sin(position * freq)
    table[:, half:] = torch.cos(position * freq)[:, : dim // 2]
    return table.float()


def rotary_tables(num_positions: int, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings (Su et al.), halves layout as in Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    angles = torch.outer(torch.arange(num_positions).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles. x: (B, H, T, D); cos/sin: (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# --------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of past positions for incremental decoding.

    Buffers are preallocated per layer (B, H_kv, capacity, D) and written in place,
    so a decoding step costs no concatenation; they grow by doubling when full.
    Cross-attention keys/values of the source are computed once and kept here.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        if layer == len(self.keys):
            shape = (k.size(0), k.size(1), max(self.capacity, end), k.size(3))
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        if end > self.keys[layer].size(2):
            grow = max(end, 2 * self.keys[layer].size(2)) - self.keys[layer].size(2)
            pad = lambda t: torch.cat([t, t.new_zeros(t.size(0), t.size(1), grow, t.size(3))], dim=2)
            self.keys[layer], self.values[layer] = pad(self.keys[layer]), pad(self.values[layer])
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Select batch rows (beam search): row i of the cache becomes old row index[i].

        When the batch size stays the same only the rows that change are copied, and only
        their filled positions. ``cross=False`` leaves the cross-attention keys/values alone
        (beams of one source share them)."""
        if self.keys and index.numel() == self.keys[0].size(0):
            moved = (index != torch.arange(index.numel(), device=index.device)).nonzero().squeeze(1)
            if moved.numel():
                source, n = index[moved], self.length
                for buf in self.keys + self.values:  # index_select/index_copy_: ~25% faster than buf[a] = buf[b]
                    filled = buf[:, :, :n]
                    filled.index_copy_(0, moved, filled.index_select(0, source))
        else:
            self.keys = [k.index_select(0, index) for k in self.keys]
            self.values = [v.index_select(0, index) for v in self.values]
        if cross:
            self.reorder_cross(index)

    def reorder_cross(self, index: torch.Tensor) -> None:
        """Select rows of the cross-attention keys/values only (row i becomes old row index[i])."""
        self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}


# --------------------------------------------------------------------------- linear layers
class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) that takes the ``fast_cpu()`` path
    (``zenlm.kernels``: the CPU speed-ups live there, so that this file reads like the paper)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------- attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              is_causal: bool = False, dropout: float = 0.0, need_weights: bool = False
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(QKᵀ/√d_k)V.

    q: (B, H, T, D); k, v: (B, H, S, D); mask: bool, True where a query may attend,
    broadcastable to (B, H, T, S). The fused kernel is used unless the weights are
    wanted; the explicit path is the same formula written out.
    """
    if not need_weights and not dropout and kernels.cpu_attention_applies(q):
        return kernels.cpu_attention(q, k, v, mask, is_causal), None
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        return out, None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        mask = causal_mask(q.size(2), k.size(2), 0, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return (F.dropout(weights, dropout) if dropout else weights) @ v, weights


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention; self-attention fuses Q, K, V into one matmul."""

    def __init__(self, config: TransformerConfig, cross: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.cross = cross
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if cross:
            self.q = Linear(config.hidden_size, q_dim, bias=config.bias)
            self.kv = Linear(config.hidden_size, 2 * kv_dim, bias=config.bias)
        else:
            self.qkv = Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=config.bias)
        self.out = Linear(q_dim, config.hidden_size, bias=config.bias)
        self.dropout = config.attention_dropout

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, layer: int = 0, need_weights: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        kv_dim = self.kv_heads * self.head_dim
        if self.cross:
            q = self._split(self.q(x), self.heads)
            if cache is not None and layer in cache.cross:
                k, v = cache.cross[layer]
            else:
                k, v = (self._split(t, self.kv_heads) for t in self.kv(memory).split(kv_dim, dim=-1))
                if cache is not None:
                    cache.cross[layer] = (k, v)
        else:
            q, k, v = self.qkv(x).split([self.heads * self.head_dim, kv_dim, kv_dim], dim=-1)
            q, k, v = self._split(q, self.heads), self._split(k, self.kv_heads), self._split(v, self.kv_heads)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        if self.kv_heads != self.heads:  # grouped-query: each K/V head serves heads/kv_heads query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        group = q.size(0) // k.size(0)
        if group > 1:  # g consecutive rows (beams) share one source: fold them into g*T queries of it
            b, h, t, d = q.shape
            q = q.view(b // group, group, h, t, d).transpose(1, 2).reshape(b // group, h, group * t, d)
        out, weights = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0, need_weights)
        if group > 1:
            out = out.view(b // group, h, group, t, d).transpose(1, 2).reshape(b, h, t, d)
            if weights is not None:
                weights = weights.view(b // group, h, group, t, -1).transpose(1, 2).reshape(b, h, t, -1)
        out = out.transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        return self.out(out), weights


# --------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Position-wise feed-forward: fc_out(act(fc_in(x))); gated variants (SwiGLU, GeGLU)
    compute gate and up projections in one matmul and multiply act(gate) * up."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gated = config.activation in ("swiglu", "geglu")
        width = config.intermediate_size * (2 if self.gated else 1)
        self.fc_in = Linear(config.hidden_size, width, bias=config.bias)
        self.fc_out = Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
                    "silu": nn.SiLU(), "swiglu": nn.SiLU(), "geglu": nn.GELU()}[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fc_out(self.act(gate) * up)
        return self.fc_out(self.act(h))


# --------------------------------------------------------------------------- block
class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP; each a residual sublayer,
    normalised before (pre-LN) or after (post-LN) the residual add."""

    def __init__(self, config: TransformerConfig, cross: bool):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm, self.attn = make_norm(config), Attention(config)
        if cross:
            self.cross_norm, self.cross_attn = make_norm(config), Attention(config, cross=True)
        self.mlp_norm, self.mlp = make_norm(config), MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.pre_norm:
            h, w = fn(norm(x))
        else:
            h, w = fn(x)
        if self.training and self.drop.p:  # (a no-op call skipped: it costs per token when decoding)
            h = self.drop(h)
        return (x + h, w) if self.pre_norm else (norm(x + h), w)

    def forward(self, x: torch.Tensor, mask, is_causal, rotary, memory, memory_mask, cache, layer, need_weights):
        x, self_w = self._residual(x, self.attn_norm, lambda h: self.attn(
            h, mask=mask, is_causal=is_causal, rotary=rotary, cache=cache, layer=layer, need_weights=need_weights))
        cross_w = None
        if hasattr(self, "cross_attn"):
            x, cross_w = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, memory=memory, mask=memory_mask, cache=cache, layer=layer, need_weights=need_weights))
        x, _ = self._residual(x, self.mlp_norm, lambda h: (self.mlp(h), None))
        return x, self_w, cross_w


# --------------------------------------------------------------------------- stacks
class Stack(nn.Module):
    """A stack of blocks with its own positions and norms: the encoder (bidirectional)
    or the decoder (causal, with cross-attention when there is an encoder)."""

    def __init__(self, config: TransformerConfig, num_layers: int, causal: bool, cross: bool):
        super().__init__()
        self.config, self.causal = config, causal
        if config.position == "learned":
            self.positions = nn.Embedding(config.max_position_embeddings + config.position_offset, config.hidden_size)
        elif config.position == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_table(config.max_position_embeddings, config.hidden_size),
                                 persistent=False)
        elif config.position == "rotary":
            cos, sin = rotary_tables(config.max_position_embeddings, config.head_dim, config.rope_theta)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        if config.type_vocab_size:
            self.token_types = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if config.embedding_norm:
            self.embed_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, cross) for _ in range(num_layers))
        if config.final_norm:
            self.final_norm = make_norm(config)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, memory: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                need_weights: bool = False):
        """x: token embeddings (B, T, d). attention_mask: (B, S) with 1 for real keys
        (S = past + T when decoding with a cache)."""
        config, rotary = self.config, None
        if config.position == "learned":
            x = x + self.positions(position_ids + config.position_offset)
        elif config.position == "sinusoidal":
            x = x + self.sinusoids[position_ids].to(x.dtype)
        elif config.position == "rotary":
            rotary = (self.rotary_cos[position_ids].unsqueeze(1).to(x.dtype),
                      self.rotary_sin[position_ids].unsqueeze(1).to(x.dtype))
        if config.type_vocab_size:
            x = x + self.token_types(token_type_ids if token_type_ids is not None else torch.zeros_like(position_ids))
        if config.embedding_norm:
            x = self.embed_norm(x)
        x = self.drop(x)

        past = cache.length if cache is not None else 0
        mask, is_causal = self._self_mask(x.size(1), past, attention_mask, x.device)
        memory_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        self_ws, cross_ws = [], []
        for i, block in enumerate(self.layers):
            x, self_w, cross_w = block(x, mask, is_causal, rotary, memory, memory_mask, cache, i, need_weights)
            self_ws.append(self_w)
            cross_ws.append(cross_w)
        if cache is not None:
            cache.advance(x.size(1))
        if config.final_norm:
            x = self.final_norm(x)
        return x, (tuple(self_ws) if need_weights else None), (tuple(cross_ws) if need_weights and memory is not None else None)

    def _self_mask(self, query_len: int, past: int, attention_mask: Optional[torch.Tensor], device):
        """Combine causality and padding into one bool mask, or return is_causal for the fast kernel."""
        if not self.causal:
            return (None if attention_mask is None else attention_mask[:, None, None, :]), False
        if attention_mask is None:
            if past == 0:
                return None, True
            if query_len == 1:
                return None, False
        mask = causal_mask(query_len, past + query_len, past, device)[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :]
            # a padded query row would see no key at all (NaN); let it see itself
            mask = mask | _diagonal(query_len, past, device)
        return mask, False


def _diagonal(query_len: int, past: int, device) -> torch.Tensor:
    rows = torch.arange(past, past + query_len, device=device)[:, None]
    return (torch.arange(past + query_len, device=device)[None, :] == rows)[None, None]


# --------------------------------------------------------------------------- model
class TransformerModel(nn.Module):
    """The backbone. ``model(input_ids, decoder_input_ids)`` for encoder-decoder,
    ``model(input_ids)`` for decoder-only or encoder-only."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        if config.num_encoder_layers:
            self.encoder = Stack(config, config.num_encoder_layers, causal=False, cross=False)
        if config.num_decoder_layers:
            self.decoder = Stack(config, config.num_decoder_layers, causal=True, cross=config.is_encoder_decoder)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    # ---------------------------------------------------------------- input checks
    def _check_ids(self, name: str, ids: torch.Tensor, past: int = 0) -> None:
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, sequence), got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(ids.shape)})")
        if not torch.compiler.is_compiling():  # the two reads sync and would break a compiled graph
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"{name} holds token id {bad}, outside [0, vocab_size={self.config.vocab_size})")
        if past + ids.size(1) > self.config.max_position_embeddings:
            raise ValueError(f"{name} reaches position {past + ids.size(1)} (length {ids.size(1)} + {past} cached), "
                             f"beyond max_position_embeddings={self.config.max_position_embeddings}")

    @staticmethod
    def _check_mask(name: str, mask: Optional[torch.Tensor], batch: int, lengths: tuple[int, ...]) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.size(0) != batch or mask.size(1) not in lengths:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            want = " or ".join(f"({batch}, {n})" for n in sorted(set(lengths)))
            raise ValueError(f"{name} has shape {shape}; expected {want}")
        mask = mask.bool()
        return None if bool(mask.all()) else mask

    def _positions(self, ids: torch.Tensor, past: int, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if position_ids is not None:
            if position_ids.shape[-1] != ids.size(1):
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected (*, {ids.size(1)})")
            if int(position_ids.max()) >= self.config.max_position_embeddings or int(position_ids.min()) < 0:
                raise ValueError(f"position_ids must lie in [0, {self.config.max_position_embeddings})")
            return position_ids
        return torch.arange(past, past + ids.size(1), device=ids.device)[None].expand(ids.size(0), -1)

    def _token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        return x * self.embed_scale if self.embed_scale != 1.0 else x  # skip a no-op pass (and its backward)

    # ---------------------------------------------------------------- the two halves
    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
               output_attentions: bool = False):
        """Run the encoder; returns (hidden (B,S,d), attentions or None)."""
        self._check_ids("input_ids", input_ids)
        mask = self._check_mask("attention_mask", attention_mask, input_ids.size(0), (input_ids.size(1),))
        if token_type_ids is not None and (token_type_ids.shape != input_ids.shape or
                                           int(token_type_ids.max()) >= max(self.config.type_vocab_size, 1)):
            raise ValueError(f"token_type_ids must match input_ids' shape {tuple(input_ids.shape)} and lie in "
                             f"[0, type_vocab_size={self.config.type_vocab_size})")
        x = self._token_embeddings(input_ids)
        hidden, attn, _ = self.encoder(x, self._positions(input_ids, 0, position_ids), mask, token_type_ids,
                                       need_weights=output_attentions)
        return hidden, attn

    def decode(self, decoder_input_ids: torch.Tensor, memory: Optional[torch.Tensor] = None,
               memory_mask: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
               token_type_ids: Optional[torch.Tensor] = None, output_attentions: bool = False,
               name: str = "decoder_input_ids"):
        """Run the decoder over new tokens (after ``cache.length`` cached ones)."""
        past = cache.length if cache is not None else 0
        self._check_ids(name, decoder_input_ids, past)
        mask = self._check_mask(name.replace("input_ids", "attention_mask"), attention_mask,
                                decoder_input_ids.size(0), (decoder_input_ids.size(1) + past,))
        x = self._token_embeddings(decoder_input_ids)
        return self.decoder(x, self._positions(decoder_input_ids, past, position_ids), mask, token_type_ids,
                            memory, memory_mask, cache, output_attentions)

    def forward(self, input_ids: Optional[torch.Tensor] = None, decoder_input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, decoder_attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                past_key_values: Optional[KVCache] = None, use_cache: bool = False,
                output_attentions: bool = False, encoder_hidden_states: Optional[torch.Tensor] = None
                ) -> TransformerOutput:
        family = self.config.family
        cache = past_key_values
        if use_cache and cache is None and family != "encoder-only":
            cache = KVCache()
        if family == "encoder-only":
            if decoder_input_ids is not None:
                raise ValueError("an encoder-only model takes one sequence; decoder_input_ids must be None")
            hidden, attn = self.encode(input_ids, attention_mask, token_type_ids, position_ids, output_attentions)
            return TransformerOutput(hidden, attentions=attn)
        if family == "decoder-only":
            if decoder_input_ids is not None:
                raise ValueError("a decoder-only model takes one sequence; pass it as input_ids, decoder_input_ids must be None")
            hidden, attn, _ = self.decode(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                          cache=cache, token_type_ids=token_type_ids,
                                          output_attentions=output_attentions, name="input_ids")
            return TransformerOutput(hidden, past_key_values=cache if use_cache else None, attentions=attn)
        # encoder-decoder
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids (the second argument)")
        enc_attn = None
        if encoder_hidden_states is None:
            encoder_hidden_states, enc_attn = self.encode(input_ids, attention_mask, token_type_ids,
                                                          output_attentions=output_attentions)
        memory_mask = None
        if attention_mask is not None:
            memory_mask = self._check_mask("attention_mask", attention_mask, encoder_hidden_states.size(0),
                                           (encoder_hidden_states.size(1),))
        hidden, attn, cross = self.decode(decoder_input_ids, encoder_hidden_states, memory_mask,
                                          decoder_attention_mask, position_ids, cache,
                                          output_attentions=output_attentions)
        return TransformerOutput(hidden, encoder_hidden_states, cache if use_cache else None, attn, enc_attn, cross)

    # ---------------------------------------------------------------- sentence embeddings
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              pooling: str = "mean", normalize: bool = True, token_type_ids: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
        """One vector per sequence from the encoder (or the decoder of a decoder-only model)."""
        if self.config.family == "decoder-only":
            hidden = self.decode(input_ids, attention_mask=attention_mask, name="input_ids")[0]
        else:
            hidden = self.encode(input_ids, attention_mask, token_type_ids)[0]
        return pool(hidden, attention_mask, pooling, normalize)

    # ---------------------------------------------------------------- checkpoints
    # Saving, loading and generating live on the floors above (checkpoint.py, hf/, generate.py),
    # which this file does not import: ``import zenlm`` hands them to ``provide`` below.
    def save_pretrained(self, directory, tokenizer=None) -> None:
        _service("save_pretrained")(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        return _service("load_model")(directory, cls, **kwargs)

    @classmethod
    def from_hf(cls, directory, **kwargs):
        """Import a local Hugging Face folder (BERT, GPT-2, BART, Marian, Llama); see zenlm.hf."""
        return _service("load_hf")(directory, cls, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], method: str = "mean",
         normalize: bool = True) -> torch.Tensor:
    """Mean over real tokens, the first (CLS) token, or the last real token; optionally L2-normalised."""
    if method not in POOLINGS:
        raise ValueError(f"unknown pooling {method!r}; valid: {', '.join(POOLINGS)}")
    mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask.to(hidden.dtype)
    if method == "mean":
        out = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    elif method == "cls":
        out = hidden[:, 0]
    else:  # last real token; works for right padding and for left padding alike
        idx = (mask * torch.arange(1, mask.size(1) + 1, device=hidden.device)).argmax(dim=1)
        out = hidden[torch.arange(hidden.size(0), device=hidden.device), idx]
    return F.normalize(out, dim=-1) if normalize else out


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Teacher forcing: decoder inputs are the labels moved one step right behind the start token."""
    shifted = labels.new_full(labels.shape, start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


# --------------------------------------------------------------------------- heads
class TransformerLM(TransformerModel):
    """The backbone plus a token-prediction head whose loss follows the family:
    causal LM (decoder-only, labels shifted inside), seq2seq LM (encoder-decoder,
    decoder inputs made from the labels when not given) or masked LM (encoder-only).
    Labels equal to -100 are ignored."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        if config.mlm_transform:
            self.mlm_dense = Linear(config.hidden_size, config.hidden_size)
            self.mlm_act = MLP(config.replace(activation="gelu" if config.activation in ("swiglu", "geglu")
                                              else config.activation)).act
            self.mlm_norm = make_norm(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
            self._init_weights(self.lm_head)
        if config.lm_head_bias:
            self.lm_head_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.mlm_transform:
            hidden = self.mlm_norm(self.mlm_act(self.mlm_dense(hidden)))
        bias = self.lm_head_bias if self.config.lm_head_bias else None
        if self.config.tie_word_embeddings and hasattr(self.embed_tokens, "project"):
            return self.embed_tokens.project(hidden, bias)  # an integer table (zenlm.quantize) multiplies itself
        weight = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return linear(hidden, weight, bias)

    def generate(self, prompt, tokenizer=None, **options):
        """Text in, text out (ids in, ids out); options as in ``zenlm.GenerationConfig``."""
        return _service("generate")(self, prompt, tokenizer=tokenizer, **options)

    def forward(self, input_ids: Optional[torch.Tensor] = None, decoder_input_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, label_smoothing: float = 0.0, **kwargs) -> LMOutput:
        """``label_smoothing`` spreads that share of each target's probability over the vocabulary
        (Szegedy et al., 2016): a regulariser for small data such as translation; 0 = plain cross-entropy."""
        config = self.config
        if config.is_encoder_decoder and decoder_input_ids is None and labels is not None:
            decoder_input_ids = shift_right(labels, config.start_token_id, config.pad_token_id)
        out = super().forward(input_ids, decoder_input_ids, **kwargs)
        logits = self.logits(out.last_hidden_state)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(logits.shape[:2])}")
            if config.family == "decoder-only":  # position t predicts token t+1; the last predicts nothing
                labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
            loss = cross_entropy(logits, labels, IGNORE_INDEX, label_smoothing)
        return LMOutput(**vars(out), logits=logits, loss=loss)


TransformerConfig.register_model(TransformerLM)  # lets a config count its model's parameters (config.py)
