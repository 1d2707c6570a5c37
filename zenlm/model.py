"""The transformer, in one file, read top to bottom like the paper.

    norm → attention → MLP → block → stack (encoder / decoder) → model → heads

Encoder-decoder, decoder-only and encoder-only models are the same code with
different layer counts; BERT, GPT-2, BART, Marian, Llama, Qwen, Mistral, Gemma and
Phi differ only by the flags in ``TransformerConfig`` (norm type and placement,
activation, position scheme and its scaling, bias, key/value heads, sliding windows,
soft-capping); Mixtral and Qwen-MoE swap the MLP for a mixture of experts (``MoE``).

Why it is one long file: it is the one model, and it reads top to bottom like the paper; the house
rule (tests/test_layout.py) lets it import only torch, config and kernels, so the per-family rotary
scalings and options stay here beside the attention that uses them, each class and function short.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import GATED, POOLINGS, TransformerConfig
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
    aux_loss: Optional[torch.Tensor] = None  # the experts' load-balancing loss, when asked for (already in ``loss``)


# --------------------------------------------------------------------------- norms
class UnitOffsetRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), weight starting at zero, computed in fp32 (Gemma)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def make_norm(config: TransformerConfig, dim: Optional[int] = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "rmsnorm":
        if config.norm_unit_offset:
            return UnitOffsetRMSNorm(dim, config.norm_eps)
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


# --------------------------------------------------------------------------- positions
def sinusoidal_table(num_positions: int, dim: int, endpoint: bool = False, start: int = 0) -> torch.Tensor:
    """[sin | cos] halves with frequencies 1/10000^(2i/d) (Vaswani et al.; Marian's layout), or with
    ``endpoint`` 1/10000^(i/(d/2-1)), the last exactly 1/10000 (tensor2tensor, fairseq: M2M100, NLLB; an odd
    dim's last column is 0). Row p holds angle ``start`` + p (fairseq's positions start past the pad id)."""
    position = torch.arange(start, start + num_positions, dtype=torch.float64)[:, None]
    if endpoint:
        half = dim // 2
        freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
        table = torch.zeros(num_positions, dim, dtype=torch.float64)
        table[:, :half], table[:, half:2 * half] = torch.sin(position * freq), torch.cos(position * freq)
        return table.float()
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    half = dim // 2 + dim % 2
    table[:, :half] = torch.sin(position * freq)
    table[:, half:] = torch.cos(position * freq)[:, : dim // 2]
    return table.float()


def rotary_frequencies(dim: int, theta: float, scaling: Optional[dict] = None, seq_len: int = 0,
                       max_positions: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ^(-2i/d) of rotary embeddings (Su et al.), and the factor cos/sin are
    multiplied by, under a context-extension scaling:

    * linear (position interpolation, Chen et al.): every frequency divided by ``factor``;
    * dynamic (NTK-aware): past the original length L, the base grows to
      θ·(factor·n/L − (factor − 1))^(d/(d−2)) for a sequence of n positions;
    * llama3: low frequencies (wavelength > L/low_freq_factor) divided by ``factor``, high ones
      (wavelength < L/high_freq_factor) kept, those between interpolated smoothly;
    * yarn (Peng et al.): per-dimension blend of interpolated and original frequencies along a
      ramp between the dims that turn beta_slow and beta_fast times over L; cos/sin scaled by
      0.1·ln(factor) + 1;
    * longrope (Phi-3): per-dimension ``short_factor`` divisors, ``long_factor`` past L; cos/sin
      scaled by sqrt(1 + ln(factor)/ln(L)) with factor = max_positions / L.

    It stays one function because it is a table: one short branch per rope type above, each the
    paper's formula, read side by side.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    kind = (scaling or {}).get("rope_type")
    if kind is None:
        return inv_freq, 1.0
    factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings")
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        if seq_len <= original:
            return inv_freq, 1.0
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim), 1.0
    if kind == "llama3":
        low_wavelen = original / scaling["low_freq_factor"]
        high_wavelen = original / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            if scaling.get("mscale") and scaling.get("mscale_all_dim"):
                attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
            else:
                attention_factor = mscale(factor)

        def correction_dim(rotations):  # the dim that turns ``rotations`` times over the original length
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        powers = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
        extrapolate = 1 - ramp
        inv_freq = (1.0 / (factor * powers)) * (1 - extrapolate) + (1.0 / powers) * extrapolate
        return inv_freq, float(attention_factor)
    # longrope
    factor = factor or max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(scaling["long_factor" if seq_len > original else "short_factor"], dtype=torch.float32, device="cpu")
    powers = theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    return 1.0 / (ext * powers), float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin of position × frequency for the first ``rotary_dim`` dims of each head. Scalings whose
    frequencies depend on the sequence length (dynamic, longrope) recompute them per call from the
    largest position in it; the others are fixed."""

    def __init__(self, config: TransformerConfig, theta: float, scaling: Optional[dict]):
        super().__init__()
        self.dim, self.theta, self.scaling = config.rotary_dim, theta, scaling
        self.max_positions = config.max_position_embeddings
        self.by_length = (scaling or {}).get("rope_type") in ("dynamic", "longrope")
        # a plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        self.inv_freq, self.factor = rotary_frequencies(self.dim, theta, scaling, 0, self.max_positions)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, factor = self.inv_freq, self.factor
        if self.by_length:
            inv_freq, factor = rotary_frequencies(self.dim, self.theta, self.scaling, int(position_ids.max()) + 1,
                                                  self.max_positions)
        angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+r/2}) of the first r = cos.size(-1) dims by position-dependent angles;
    any dims past r pass through (partial rotary). x: (B, H, T, D); cos/sin: (B, 1, T, r)."""
    if cos.size(-1) < x.size(-1):
        r = cos.size(-1)
        return torch.cat([apply_rotary(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int
                             ) -> torch.Tensor:
    """T5's bucket of each key − query distance (Raffel et al., Mesh TensorFlow): half the buckets per
    direction when both are allowed (one direction, the past, for a causal decoder); within a direction,
    the first half holds distances 0, 1, 2, … exactly and the rest grow logarithmically up to
    ``max_distance``, past which all share the last bucket."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out = out + (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)
    exact = buckets // 2
    far = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    return out + torch.where(relative < exact, relative, far.clamp(max=buckets - 1))


# --------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of past positions for incremental decoding.

    Buffers are preallocated per layer (B, H_kv, capacity, D) and written in place,
    so a decoding step costs no concatenation; they grow by doubling when full.
    Cross-attention keys/values of the source are computed once and kept here.

    With ``trim_windows``, a sliding-window layer keeps about two windows of keys: when its
    buffer is full it forgets the positions no later query can see (``starts[layer]`` is the
    position of its first kept key), so its memory stays bounded however long the sequence.
    """

    def __init__(self, capacity: int = 256, trim_windows: bool = False):
        self.capacity = capacity
        self.length = 0
        self.trim_windows = trim_windows
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.starts: list[int] = []
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # the tokens and positions behind the cached keys, kept where a model may need to re-encode them
        self.tokens: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None

    def remember(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        positions = positions.expand(tokens.size(0), -1)
        first = self.tokens is None or self.tokens.size(0) != tokens.size(0)
        self.tokens = tokens if first else torch.cat([self.tokens, tokens], 1)
        self.positions = positions if first else torch.cat([self.positions, positions], 1)

    def clear(self) -> None:
        """Forget every position (the buffers' memory is kept only through ``capacity``)."""
        self.length, self.keys, self.values, self.starts = 0, [], [], []
        self.tokens = self.positions = None

    def start(self, layer: int) -> int:
        """Position of the first key kept for ``layer`` (0 unless a window trimmed it)."""
        return self.starts[layer] if layer < len(self.starts) else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the keys/values of the new positions; return those of every kept position."""
        end = self.length + k.size(2)
        window = window if self.trim_windows else None
        if layer == len(self.keys):
            size = self.capacity if window is None else min(self.capacity, 2 * window)
            shape = (k.size(0), k.size(1), max(size, end), k.size(3))
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        while len(self.starts) < len(self.keys):
            self.starts.append(0)
        start = self.starts[layer]
        if window is not None and end - start > self.keys[layer].size(2):
            keep = max(start, self.length - window + 1)  # the first position the new queries can see
            if keep > start:
                n = self.length - keep
                for buf in (self.keys[layer], self.values[layer]):
                    buf[:, :, :n] = buf[:, :, keep - start:self.length - start].clone()
                self.starts[layer] = start = keep
        if end - start > self.keys[layer].size(2):
            grow = max(end - start, 2 * self.keys[layer].size(2)) - self.keys[layer].size(2)
            pad = lambda t: torch.cat([t, t.new_zeros(t.size(0), t.size(1), grow, t.size(3))], dim=2)
            self.keys[layer], self.values[layer] = pad(self.keys[layer]), pad(self.values[layer])
        self.keys[layer][:, :, self.length - start:end - start] = k
        self.values[layer][:, :, self.length - start:end - start] = v
        return self.keys[layer][:, :, :end - start], self.values[layer][:, :, :end - start]

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
                source = index[moved]
                for layer, buf in enumerate(self.keys + self.values):  # index_select/index_copy_: ~25% faster
                    filled = buf[:, :, :self.length - self.start(layer % len(self.keys))]
                    filled.index_copy_(0, moved, filled.index_select(0, source))
        else:
            self.keys = [k.index_select(0, index) for k in self.keys]
            self.values = [v.index_select(0, index) for v in self.values]
        if self.tokens is not None:
            self.tokens, self.positions = self.tokens.index_select(0, index), self.positions.index_select(0, index)
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
              is_causal: bool = False, dropout: float = 0.0, need_weights: bool = False,
              scale: Optional[float] = None, softcap: Optional[float] = None, bias: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(QKᵀ/√d_k)V, or softmax(c·tanh(QKᵀ·s / c))V with another scale s and a soft cap c (Gemma 2),
    or softmax(QKᵀ·s + B)V with a position bias B added to the scores (T5's relative positions).

    q: (B, H, T, D); k, v: (B, H, S, D); mask: bool, True where a query may attend,
    broadcastable to (B, H, T, S), as is ``bias``. The fused kernel is used unless the weights are
    wanted or the scores are capped (a bias joins the mask as one additive mask); the explicit path is
    the same formula written out.
    """
    # a decode step under torch.compile (one query per row, or heads/kv_heads queries of a grouped K/V head,
    # at most 8 in the families we load) is written out as two reductions, which inductor fuses with the
    # masked softmax into a few loops: the fused kernel's or two batched matmuls' per-call set-up costs more
    # than such a step's work (int4 SmolLM-135M step, 2 threads: 6.19 ms with batched matmuls, 5.64 so)
    decoding = q.size(-2) <= 8 and torch.compiler.is_compiling()
    fused = not need_weights and not decoding
    if fused and softcap is None and bias is not None:  # the bias and the mask as one additive mask
        if is_causal:
            mask = causal_mask(q.size(2), k.size(2), 0, q.device)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=scale), None
    if fused and softcap is None:
        if not dropout and kernels.cpu_attention_applies(q):
            if scale is not None:  # the kernel divides by √d: fold the other scale into the queries
                q = q * (scale * math.sqrt(q.size(-1)))
            return kernels.cpu_attention(q, k, v, mask, is_causal), None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                             scale=scale)
        return out, None
    # (B, H, T, 1, D) * (B, H, 1, S, D) summed over D: never materialised under compile
    scores = (q[..., :, None, :] * k[..., None, :, :]).sum(-1) if decoding else q @ k.transpose(-2, -1)
    scores = scores / math.sqrt(q.size(-1)) if scale is None else scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if is_causal:
        mask = causal_mask(q.size(2), k.size(2), 0, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if decoding and not dropout:
        return (weights[..., :, :, None] * v[..., None, :, :]).sum(-2), weights
    return (F.dropout(weights, dropout) if dropout else weights) @ v, weights


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention; self-attention fuses Q, K, V into one matmul.
    Optionally each query/key head is RMS-normalised before RoPE (``qk_norm``), and a
    sliding-window layer (``window``) sees only the last ``window`` positions."""

    def __init__(self, config: TransformerConfig, cross: bool = False, window: Optional[int] = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.cross, self.window = cross, window
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        if cross:
            self.q = Linear(config.hidden_size, q_dim, bias=qkv_bias)
            self.kv = Linear(config.hidden_size, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv = Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=qkv_bias)
        if config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, self.head_dim), make_norm(config, self.head_dim)
        self.out = Linear(q_dim, config.hidden_size, bias=config.bias)
        self.dropout = config.attention_dropout
        self.scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcap

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, layer: int = 0, need_weights: bool = False,
                bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.update(layer, k, v, self.window)
                if cache.start(layer):  # keys before start were forgotten (window)
                    mask = None if mask is None else mask[..., cache.start(layer):]
                    bias = None if bias is None else bias[..., cache.start(layer):]
        if (self.kv_heads != self.heads and q.size(2) == 1 and q.size(0) == k.size(0) and not need_weights
                and not is_causal):
            # one query per row (decoding): a K/V head's query heads attend as that many queries of it, so the
            # cache is read in place instead of copied heads/kv_heads times (repeat_interleave below)
            b = q.size(0)
            out, _ = attention(q.reshape(b, self.kv_heads, -1, self.head_dim), k, v, mask, False,
                               self.dropout if self.training else 0.0, False, self.scale, self.softcap)
            return self.out(out.reshape(b, 1, -1)), None
        if self.kv_heads != self.heads:  # grouped-query: each K/V head serves heads/kv_heads query heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        group = q.size(0) // k.size(0)
        if group > 1:  # g consecutive rows (beams) share one source: fold them into g*T queries of it
            b, h, t, d = q.shape
            q = q.view(b // group, group, h, t, d).transpose(1, 2).reshape(b // group, h, group * t, d)
        out, weights = attention(q, k, v, mask, is_causal, self.dropout if self.training else 0.0, need_weights,
                                 self.scale, self.softcap, bias)
        if group > 1:
            out = out.view(b // group, h, group, t, d).transpose(1, 2).reshape(b, h, t, d)
            if weights is not None:
                weights = weights.view(b // group, h, group, t, -1).transpose(1, 2).reshape(b, h, t, -1)
        out = out.transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        return self.out(out), weights


# --------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Position-wise feed-forward: fc_out(act(fc_in(x))); gated variants (SwiGLU, GeGLU with exact
    or tanh GELU) compute gate and up projections in one matmul and multiply act(gate) * up."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gated = config.activation in GATED
        width = config.intermediate_size * (2 if self.gated else 1)
        self.fc_in = Linear(config.hidden_size, width, bias=config.bias)
        self.fc_out = Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
                    "silu": nn.SiLU(), "swiglu": nn.SiLU(), "geglu": nn.GELU(),
                    "geglu_tanh": nn.GELU(approximate="tanh")}[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fc_out(self.act(gate) * up)
        return self.fc_out(self.act(h))


class MoE(nn.Module):
    """Sparse mixture of experts (Shazeer et al., 2017; Mixtral; Qwen-MoE) in place of the one MLP: a linear
    router scores the experts per token, softmax; the token goes through the top ``experts_per_token``
    expert MLPs and takes their outputs weighted by those probabilities (rescaled to sum to 1 with
    ``normalize_expert_weights``). Qwen2-MoE adds a shared expert every token goes through, scaled by
    sigmoid(w·x). Each expert runs once per call on the tokens routed to it, so a token costs k experts.
    While ``router_logits`` is a list (TransformerLM.forward, for ``load_balancing_loss``) each call appends
    its router logits to it."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.top_k, self.renormalize = config.experts_per_token, config.normalize_expert_weights
        self.router_logits: Optional[list[torch.Tensor]] = None
        self.router = Linear(config.hidden_size, config.num_experts, bias=False)
        width = config.expert_intermediate_size or config.intermediate_size
        expert = config.replace(intermediate_size=width, num_experts=0, shared_expert_size=0)
        self.experts = nn.ModuleList(MLP(expert) for _ in range(config.num_experts))
        if config.shared_expert_size:
            self.shared = MLP(config.replace(intermediate_size=config.shared_expert_size, num_experts=0,
                                             shared_expert_size=0))
            self.shared_gate = Linear(config.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), each (tokens, k): the k most probable experts of each token of x (tokens, d)."""
        logits = self.router(x)
        if self.router_logits is not None:
            self.router_logits.append(logits)
        probs = logits.float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.size(-1))
        weights, chosen = self.route(h)
        out = torch.zeros_like(h)
        for e in chosen.unique().tolist():  # only the experts some token chose
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.experts[e](h[token]) * weights[token, slot, None])
        if hasattr(self, "shared"):
            out = out + torch.sigmoid(self.shared_gate(h)) * self.shared(h)
        return out.view_as(x)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al., 2021, eqs. 4-6; transformers'
    ``load_balancing_loss_func``): E · Σ_e f_e · P_e over the E experts, where f_e is the share of the top-k
    routings (per token, summed over the k) that went to expert e and P_e its mean router probability, both
    over every MoE layer's real tokens. Uniform routing gives k; it grows as tokens crowd onto few experts, so
    added to the LM loss it keeps every expert in use while fine-tuning. ``router_logits``: (tokens, E) per
    MoE layer; ``attention_mask`` (B, T), the tokens' batch layout, leaves padding out."""
    experts = router_logits[0].size(-1)
    weight = None if attention_mask is None else attention_mask.reshape(-1, 1).to(router_logits[0].device).float()
    hits, mass, rows = 0.0, 0.0, 0.0
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, experts).sum(dim=1).float()  # (tokens, E)
        if weight is not None:
            chosen, probs = chosen * weight, probs * weight
        hits, mass = hits + chosen.sum(dim=0), mass + probs.sum(dim=0)
        rows = rows + (probs.size(0) if weight is None else weight.sum())
    return experts * torch.sum((hits / rows) * (mass / rows))


# --------------------------------------------------------------------------- block
class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP; each a residual sublayer,
    normalised before (pre-LN) or after (post-LN) the residual add; with ``sandwich_norm``
    a pre-LN sublayer's output is normalised too before the add (Gemma 2/3)."""

    def __init__(self, config: TransformerConfig, cross: bool, sliding: bool = False, moe: bool = False):
        super().__init__()
        self.pre_norm, self.sliding = config.pre_norm, sliding
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, window=config.sliding_window if sliding else None)
        if cross:
            self.cross_norm, self.cross_attn = make_norm(config), Attention(config, cross=True)
        self.mlp_norm, self.mlp = make_norm(config), (MoE(config) if moe else MLP(config))
        if config.sandwich_norm:
            self.attn_post_norm, self.mlp_post_norm = make_norm(config), make_norm(config)
        self.drop = nn.Dropout(config.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn, post: Optional[nn.Module] = None
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.pre_norm:
            h, w = fn(norm(x))
        else:
            h, w = fn(x)
        if post is not None:
            h = post(h)
        if self.training and self.drop.p:  # (a no-op call skipped: it costs per token when decoding)
            h = self.drop(h)
        return (x + h, w) if self.pre_norm else (norm(x + h), w)

    def forward(self, x: torch.Tensor, mask, is_causal, rotary, memory, memory_mask, cache, layer, need_weights,
                bias: Optional[torch.Tensor] = None):
        x, self_w = self._residual(x, self.attn_norm, lambda h: self.attn(
            h, mask=mask, is_causal=is_causal, rotary=rotary, cache=cache, layer=layer, need_weights=need_weights,
            bias=bias),
            getattr(self, "attn_post_norm", None))
        cross_w = None
        if hasattr(self, "cross_attn"):
            x, cross_w = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, memory=memory, mask=memory_mask, cache=cache, layer=layer, need_weights=need_weights))
        x, _ = self._residual(x, self.mlp_norm, lambda h: (self.mlp(h), None), getattr(self, "mlp_post_norm", None))
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
            self.register_buffer("sinusoids", sinusoidal_table(config.max_position_embeddings, config.hidden_size,
                                                               config.sinusoid_endpoint, config.position_offset),
                                 persistent=False)
        elif config.position == "rotary":
            self.rotary = RotaryEmbedding(config, config.rope_theta, config.rope_scaling)
            if config.rope_local_theta is not None:  # sliding-window layers: their own base, no scaling
                self.rotary_local = RotaryEmbedding(config, config.rope_local_theta, None)
        elif config.position == "relative":  # one learned bias per head and distance bucket, shared by the layers
            self.relative_bias = nn.Embedding(config.relative_buckets, config.num_attention_heads)
        if config.type_vocab_size:
            self.token_types = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if config.embedding_norm:
            self.embed_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        # sliding windows are a decoder feature (the decoder of a decoder-only model)
        self.layers = nn.ModuleList(Block(config, cross, sliding=causal and config.is_sliding(i),
                                          moe=causal and config.is_moe(i)) for i in range(num_layers))
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
        elif config.position == "sinusoidal" and config.positions_skip_pad:  # a pad (position -1) gets none
            x = x + self.sinusoids[position_ids.clamp(min=0)].to(x.dtype) * (position_ids >= 0)[..., None]
        elif config.position == "sinusoidal":
            x = x + self.sinusoids[position_ids].to(x.dtype)
        elif config.position == "rotary":
            rotary = self.rotary(position_ids, x.dtype)
            rotary_local = self.rotary_local(position_ids, x.dtype) if hasattr(self, "rotary_local") else rotary
        if config.type_vocab_size:
            x = x + self.token_types(token_type_ids if token_type_ids is not None else torch.zeros_like(position_ids))
        if config.embedding_norm:
            x = self.embed_norm(x)
        x = self.drop(x)

        past = cache.length if cache is not None else 0
        mask, is_causal = self._self_mask(x.size(1), past, attention_mask, x.device)
        if any(block.sliding for block in self.layers):
            window_mask, window_causal = self._self_mask(x.size(1), past, attention_mask, x.device,
                                                         config.sliding_window)
        bias = self._relative_bias(x.size(1), past, x.device) if config.position == "relative" else None
        memory_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        self_ws, cross_ws = [], []
        for i, block in enumerate(self.layers):
            if block.sliding:
                x, self_w, cross_w = block(x, window_mask, window_causal, rotary_local if rotary else None, memory,
                                           memory_mask, cache, i, need_weights, bias)
            else:
                x, self_w, cross_w = block(x, mask, is_causal, rotary, memory, memory_mask, cache, i, need_weights, bias)
            self_ws.append(self_w)
            cross_ws.append(cross_w)
        if cache is not None:
            cache.advance(x.size(1))
        if config.final_norm:
            x = self.final_norm(x)
        return x, (tuple(self_ws) if need_weights else None), (tuple(cross_ws) if need_weights and memory is not None else None)

    def _relative_bias(self, query_len: int, past: int, device) -> torch.Tensor:
        """(1, H, T, past + T): the learned bias of each query's distance to each key (T5), by column; in a
        batch cache whose rows are right-aligned the columns of a row's real tokens are consecutive, so a
        column difference is the distance."""
        rows = torch.arange(past, past + query_len, device=device)[:, None]
        relative = torch.arange(past + query_len, device=device)[None, :] - rows
        buckets = relative_position_bucket(relative, not self.causal, self.config.relative_buckets,
                                           self.config.relative_max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)[None]

    def _self_mask(self, query_len: int, past: int, attention_mask: Optional[torch.Tensor], device,
                   window: Optional[int] = None):
        """Combine causality, the sliding window (a query at i sees keys in (i - window, i]) and
        padding into one bool mask, or return is_causal for the fast kernel."""
        if not self.causal:
            return (None if attention_mask is None else attention_mask[:, None, None, :]), False
        if window is not None and past + query_len <= window:
            window = None  # every key is inside every window
        if attention_mask is None and window is None:
            if past == 0:
                return None, True
            if query_len == 1:
                return None, False
        mask = causal_mask(query_len, past + query_len, past, device)[None, None]
        if window is not None:
            rows = torch.arange(past, past + query_len, device=device)[:, None]
            mask = mask & (torch.arange(past + query_len, device=device)[None, :] > rows - window)
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
        if self.config.positions_skip_pad:  # fairseq's make_positions: count real tokens; a pad's position is -1
            real = ids.ne(self.config.pad_token_id)
            return torch.where(real, past + real.cumsum(1) - 1, -1)
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
        positions = self._positions(decoder_input_ids, past, position_ids)
        if cache is not None and self._rope_switches(cache, decoder_input_ids.size(1)):
            # longrope's frequencies change once the sequence passes the pretraining length, and the
            # cached keys were rotated the short way: re-encode the whole sequence (as transformers' Phi-3)
            ids, positions = torch.cat([cache.tokens, decoder_input_ids], 1), torch.cat([cache.positions, positions], 1)
            cache.clear()
            hidden, attn, cross = self.decode(ids, memory, memory_mask, attention_mask, positions, cache, token_type_ids,
                                              output_attentions, name)
            return hidden[:, -decoder_input_ids.size(1):], attn, cross
        x = self._token_embeddings(decoder_input_ids)
        out = self.decoder(x, positions, mask, token_type_ids, memory, memory_mask, cache, output_attentions)
        if cache is not None and (self.config.rope_scaling or {}).get("rope_type") == "longrope":
            cache.remember(decoder_input_ids, positions)
        return out

    def _rope_switches(self, cache: KVCache, new: int) -> bool:
        """Whether these ``new`` positions take longrope past its pretraining length for the first time
        (with the cache's own record of the tokens behind it; a cache edited from outside has none)."""
        scaling = self.config.rope_scaling or {}
        if scaling.get("rope_type") != "longrope" or cache.tokens is None or cache.tokens.size(1) != cache.length:
            return False
        return 0 < cache.length <= scaling["original_max_position_embeddings"] < cache.length + new

    def forward(self, input_ids: Optional[torch.Tensor] = None, decoder_input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, decoder_attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                past_key_values: Optional[KVCache] = None, use_cache: bool = False,
                output_attentions: bool = False, encoder_hidden_states: Optional[torch.Tensor] = None
                ) -> TransformerOutput:
        family = self.config.family
        cache = past_key_values
        if use_cache and cache is None and family != "encoder-only":
            cache = KVCache(trim_windows=True)
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
            self.mlm_act = MLP(config.replace(activation="gelu" if config.activation in GATED
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
            logits = self.embed_tokens.project(hidden, bias)  # an integer table (zenlm.quantize) multiplies itself
        else:
            weight = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
            logits = linear(hidden, weight, bias)
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def generate(self, prompt, tokenizer=None, **options):
        """Text in, text out (ids in, ids out); options as in ``zenlm.GenerationConfig``."""
        return _service("generate")(self, prompt, tokenizer=tokenizer, **options)

    def forward(self, input_ids: Optional[torch.Tensor] = None, decoder_input_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, label_smoothing: float = 0.0, router_aux_loss_coef: float = 0.0,
                **kwargs) -> LMOutput:
        """``label_smoothing`` spreads that share of each target's probability over the vocabulary
        (Szegedy et al., 2016): a regulariser for small data such as translation; 0 = plain cross-entropy.
        ``router_aux_loss_coef`` > 0 (a mixture of experts) adds that multiple of ``load_balancing_loss`` to
        the loss, as transformers' ``router_aux_loss_coef`` with ``output_router_logits``; ``aux_loss`` holds it."""
        config = self.config
        if config.is_encoder_decoder and decoder_input_ids is None and labels is not None:
            decoder_input_ids = shift_right(labels, config.start_token_id, config.pad_token_id)
        moes = [m for m in self.modules() if isinstance(m, MoE)] if router_aux_loss_coef else []
        for moe in moes:
            moe.router_logits = []
        try:
            out = super().forward(input_ids, decoder_input_ids, **kwargs)
            router_logits = [t for moe in moes for t in moe.router_logits]
        finally:
            for moe in moes:
                moe.router_logits = None
        logits = self.logits(out.last_hidden_state)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(logits.shape[:2])}")
            if config.family == "decoder-only":  # position t predicts token t+1; the last predicts nothing
                labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
            loss = cross_entropy(logits, labels, IGNORE_INDEX, label_smoothing)
        aux_loss = None
        if router_logits:
            mask = kwargs.get("attention_mask")
            aux_loss = load_balancing_loss(router_logits, config.experts_per_token,
                                           None if mask is None else mask[:, -logits.size(1):])
            if loss is not None:
                loss = loss + router_aux_loss_coef * aux_loss
        return LMOutput(**vars(out), logits=logits, loss=loss, aux_loss=aux_loss)


TransformerConfig.register_model(TransformerLM)  # lets a config count its model's parameters (config.py)
