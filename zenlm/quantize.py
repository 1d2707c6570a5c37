"""Integer weights: int8 / int4 linear layers and embeddings that save as safetensors.

Three schemes, all symmetric (zero maps to zero, so no zero-point to store):

* ``int8`` weight-only: one scale per output channel (row); weights are dequantized
  on the fly, activations stay in floating point. 4x smaller on disk than fp32.
* ``int4`` weight-only: one scale per group of ``group_size`` input columns per row,
  two 4-bit values packed in a byte. ~8x smaller (a bit less, for the scales).
* ``dynamic`` int8: int8 weights as above, and each activation row (token) is quantized
  to int8 at run time so the matmul runs in integers (fbgemm's packed int8 GEMM on x86,
  else ``torch._int_mm``; int32 accumulation), then rescaled. This is what buys speed on a CPU; weight-only buys size.
  On x86 CPUs without VNNI the activations get 7 bits, not 8 (``zenlm.cpu``): their int16
  pair sums would saturate otherwise, and the answer would be silently wrong.

The scheme is written into ``config.extra["quantization"]`` so ``zenlm.load`` rebuilds
the same modules before reading the integer tensors (``prepare_quantized``). Norms and
biases stay in floating point: they are tiny and sensitive.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import cpu_info

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "int4", "dynamic")


@dataclass
class QuantizationSpec:
    """How a model's weights were quantized; stored as ``config.extra["quantization"]``."""

    scheme: str = "int8"  # int8 | int4 | dynamic
    group_size: Optional[int] = None  # int4: columns sharing a scale (default 64); int8: None = per row
    embeddings: bool = True  # also store embedding tables (tokens, learned positions; a tied head) in integers

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        if self.scheme == "int4" and self.group_size is None:
            self.group_size = 64
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0
                                            or self.group_size % 2):
            raise ValueError(f"group_size must be a positive even integer, got {self.group_size!r}")

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4" else 8


# --------------------------------------------------------------------------- the arithmetic
def _groups(cols: int, group_size: Optional[int]) -> int:
    """The group size actually used for a matrix with ``cols`` columns (a divisor of cols)."""
    if group_size is None or group_size >= cols:
        return cols
    g = group_size
    while cols % g:  # fall back to the largest even divisor below the requested size
        g -= 2 if g > 2 else 1
    return max(g, 1)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: Optional[int] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: returns (integers, scales).

    int8: int8 tensor (rows, cols) with values in [-127, 127].
    int4: uint8 tensor (rows, cols/2), two values in [-8, 7] per byte (low nibble first).
    scales: (rows, cols/group) with w ≈ q * scale; float32 for int8, float16 for int4.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    g = _groups(cols, group_size)
    qmax = 2 ** (bits - 1) - 1
    grouped = w.reshape(rows, cols // g, g)
    scales = (grouped.abs().amax(dim=-1) / qmax).clamp(min=1e-12)
    if bits == 4:  # fp16 scales: their rounding (5e-4) is far below int4's, and int4 files get ~8x, not 7x
        scales = scales.half().float().clamp(min=6e-8)
    q = torch.round(grouped / scales[..., None]).clamp(-qmax, qmax).to(torch.int8).reshape(rows, cols)
    if bits == 4:
        if cols % 2:
            raise ValueError(f"int4 packing needs an even number of columns, got {cols}")
        nib = (q & 0x0F).to(torch.uint8)
        q = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return q.contiguous(), (scales.half() if bits == 4 else scales).contiguous()


_NIBBLES: dict = {}


def _nibble_table(device) -> torch.Tensor:
    """(256, 2) float32: byte -> (low nibble, high nibble) as signed values in [-8, 7]."""
    if device not in _NIBBLES:
        b = torch.arange(256)
        low, high = b & 0x0F, b >> 4
        _NIBBLES[device] = torch.stack([torch.where(low > 7, low - 16, low),
                                        torch.where(high > 7, high - 16, high)], dim=-1).float().to(device)
    return _NIBBLES[device]


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """Inverse of ``quantize_weight`` (up to rounding)."""
    if bits == 4:  # one table lookup turns each byte into its two signed nibbles
        q = _nibble_table(q.device)[q.long()].reshape(q.size(0), -1)
    rows, cols = q.shape
    groups = scales.size(1)
    w = q.reshape(rows, groups, cols // groups).float() * scales.float()[..., None]  # no-op cast for int4
    return w.reshape(rows, cols).to(dtype)


def _int8_matmul(x_q: torch.Tensor, w_q_t: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32; torch._int_mm where the backend offers it and its
    integer products are exact (an x86 CPU without VNNI may saturate them: the float product
    of int8 values is exact there instead, up to K = 1040, and off by float rounding beyond)."""
    if hasattr(torch, "_int_mm") and (x_q.device.type != "cpu" or cpu_info().int8_activation_bits == 8):
        try:
            return torch._int_mm(x_q, w_q_t)
        except RuntimeError:  # a shape or device the kernel does not take
            pass
    return (x_q.float() @ w_q_t.float()).round().to(torch.int32)


_INT8PACK_MAX_ROWS = 16  # above this, dequantize + one GEMM is faster on CPU


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def _prepack(qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]):
    """fbgemm's packed layout of an int8 weight with per-row scales (built once per module, kept
    in memory only: safetensors keeps the plain int8 tensor)."""
    import warnings

    with warnings.catch_warnings():  # torch marks quantized-tensor creation deprecated; the kernel is current
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(qweight, scales[:, 0].double(),
                                                     torch.zeros(len(scales), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, bias)


def dynamic_int8_linear(module: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """int8 activations x int8 weights (one scale per output row) with int32 accumulation.

    On x86 CPUs this runs fbgemm's packed int8 GEMM (AVX-512 VNNI where present), which is
    what makes int8 decoding fast: the packed weights are read once per call, a quarter of
    fp32's bytes, and the kernel fuses activation quantization and rescaling. Activations are
    quantized per token (rows are normalised before the call, since fbgemm takes one scale per
    matrix), to 8 bits where the CPU has VNNI and to 7 bits (``reduce_range``) where it has not.
    Elsewhere: per-token symmetric int8 activations through ``torch._int_mm``."""
    if module.scales.size(1) != 1:
        raise ValueError("dynamic int8 needs one scale per output channel (group_size=None)")
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float()
    if flat.device.type == "cpu" and _fbgemm_available():
        key = module.qweight.data_ptr(), module.qweight._version
        if getattr(module, "_packed_key", None) != key:
            module._packed, module._packed_key = _prepack(module.qweight, module.scales, None), key
        # fbgemm takes one activation scale for the whole matrix; dividing each row by its own
        # max first gives every token the full integer range (per-token accuracy, ~3x less error
        # than per-matrix on rows of unequal size), and the row scale is multiplied back after
        rows = flat.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) if flat.size(0) > 1 else None
        out = torch.ops.quantized.linear_dynamic((flat / rows if rows is not None else flat).contiguous(),
                                                 module._packed, cpu_info().int8_activation_bits == 7)
        if rows is not None:
            out = out * rows
        if bias is not None:
            out = out + bias
    else:
        x_scale = (flat.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
        x_q = torch.round(flat / x_scale).clamp(-127, 127).to(torch.int8)
        out = _int8_matmul(x_q, module.qweight.t()).float() * x_scale * module.scales[:, 0]
        if bias is not None:
            out = out + bias
    return out.reshape(*shape[:-1], -1).to(x.dtype)


# --------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored as integers plus scales (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantizationSpec):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        g = _groups(in_features, spec.group_size)
        packed = in_features // 2 if spec.bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, packed,
                                                    dtype=torch.uint8 if spec.bits == 4 else torch.int8))
        self.register_buffer("scales", torch.ones(out_features, in_features // g,
                                                  dtype=torch.float16 if spec.bits == 4 else torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantizationSpec) -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec)
        module.qweight, module.scales = quantize_weight(linear.weight, spec.bits, spec.group_size)
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().float().clone()
        return module.to(linear.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.spec.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.scheme == "dynamic":
            return dynamic_int8_linear(self, x, self.bias)
        rows = x.numel() // x.size(-1)
        if self.spec.bits == 8 and rows <= _INT8PACK_MAX_ROWS and x.device.type == "cpu" and \
                x.dtype == torch.float32 and hasattr(torch, "_weight_int8pack_mm"):
            # decoding (a few rows): torch's int8 weight-only kernel reads the int8 weights directly,
            # ~5x faster than dequantizing the whole matrix first; slower than that for big batches
            out = torch._weight_int8pack_mm(x.reshape(rows, -1), self.qweight, self.scales[:, 0])
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        w = self.weight.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.spec.scheme}, "
                f"scales={tuple(self.scales.shape)}, bias={self.bias is not None}")


class QuantizedEmbedding(nn.Module):
    """An embedding table stored as integers; ``weight`` dequantizes it, so a tied output
    head (``F.linear(hidden, embed_tokens.weight)``) keeps working unchanged."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantizationSpec):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.spec = num_embeddings, embedding_dim, spec
        g = _groups(embedding_dim, spec.group_size)
        packed = embedding_dim // 2 if spec.bits == 4 else embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, packed,
                                                    dtype=torch.uint8 if spec.bits == 4 else torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, embedding_dim // g,
                                                  dtype=torch.float16 if spec.bits == 4 else torch.float32))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantizationSpec) -> "QuantizedEmbedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, spec)
        module.qweight, module.scales = quantize_weight(embedding.weight, spec.bits, spec.group_size)
        return module.to(embedding.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.spec.bits)

    def project(self, hidden: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tied output head, ``hidden @ weight.T + bias``. The table's per-row scales are the
        head's per-output-channel scales, so the dynamic scheme multiplies in int8 without ever
        dequantizing the whole table (as ``F.linear(hidden, self.weight)`` would, every step)."""
        if self.spec.scheme == "dynamic":
            return dynamic_int8_linear(self, hidden, None if bias is None else bias.float())
        return F.linear(hidden, self.weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # dequantize only the rows asked for
        q = self.qweight[ids.reshape(-1)]
        return dequantize_weight(q, self.scales[ids.reshape(-1)], self.spec.bits).reshape(*ids.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.spec.scheme}"


# --------------------------------------------------------------------------- whole models
def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "extra", {}).get("quantization")) or any(
        isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def _swap(model: nn.Module, spec: QuantizationSpec, convert: bool) -> int:
    """Replace every nn.Linear (and every embedding table when spec.embeddings) in place.
    ``convert`` quantizes the existing weights; otherwise empty shells are built to load into."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                new = (QuantizedLinear.from_linear(child, spec) if convert else
                       QuantizedLinear(child.in_features, child.out_features, child.bias is not None, spec))
            elif isinstance(child, nn.Embedding) and spec.embeddings:
                new = (QuantizedEmbedding.from_embedding(child, spec) if convert else
                       QuantizedEmbedding(child.num_embeddings, child.embedding_dim, spec))
            else:
                continue
            setattr(parent, name, new)
            count += 1
    return count


def quantize_model(model: nn.Module, scheme: str = "int8", group_size: Optional[int] = None,
                   embeddings: bool = True) -> nn.Module:
    """A quantized copy of ``model`` (the original is left untouched).

    Raises ValueError for a model that is already quantized: re-quantizing integers
    compounds the rounding error, so start again from the floating-point checkpoint.
    """
    if is_quantized(model):
        current = getattr(model.config, "extra", {}).get("quantization", {}).get("scheme", "quantized")
        raise ValueError(f"the model is already quantized ({current}); quantize its floating-point checkpoint instead")
    spec = QuantizationSpec(scheme, group_size, embeddings)
    if spec.scheme == "dynamic" and spec.group_size is not None:
        raise ValueError(f"dynamic int8 uses one scale per output channel; group_size must be None, got {group_size}")
    out = copy.deepcopy(model).float().eval()
    count = _swap(out, spec, convert=True)
    if hasattr(out, "config"):
        out.config = out.config.replace(extra={**out.config.extra, "quantization": asdict(spec)})
    logger.info("quantized %d modules to %s", count, spec.scheme)
    return out


def prepare_quantized(model: nn.Module, spec: dict) -> nn.Module:
    """Turn a freshly built model into the quantized layout recorded in its config, so a
    quantized checkpoint's integer tensors load into it (used by ``zenlm.checkpoint.load_model``)."""
    try:
        spec = QuantizationSpec(**spec)
    except TypeError as e:
        raise ValueError(f"config.extra.quantization is malformed ({spec!r}): {e}") from None
    _swap(model, spec, convert=False)
    return model


__all__ = ["QuantizationSpec", "QuantizedLinear", "QuantizedEmbedding", "quantize_weight", "dequantize_weight",
           "quantize_model", "prepare_quantized", "is_quantized", "SCHEMES"]
