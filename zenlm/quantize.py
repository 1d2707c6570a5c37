"""Integer weights: int8 / int4 linear layers and embeddings that save as safetensors.

Three schemes, all symmetric (zero maps to zero, so no zero-point to store):

* ``int8`` weight-only: one scale per output channel (row); activations stay in floating point.
  4x smaller on disk than fp32.
* ``int4`` weight-only: one scale per group of ``group_size`` input columns per row (default 32,
  llama.cpp's Q4_0 block), two 4-bit values packed in a byte. ~7x smaller (the fp16 scales).
  Rounding follows Q4_0: the group's largest-magnitude weight maps to -8, so all 16 levels are used.
* ``dynamic`` int8: int8 weights as above, and each activation row (token) is quantized
  to int8 at run time so the matmul runs in integers (fbgemm's packed int8 GEMM on x86,
  else ``torch._int_mm``; int32 accumulation), then rescaled.
  On x86 CPUs without VNNI the activations get 7 bits, not 8 (``zenlm.cpu``): their int16
  pair sums would saturate otherwise, and the answer would be silently wrong.

Speed. Decoding multiplies a few rows by every weight matrix, so it is a read of the weights;
the weight-only schemes read them as integers, through torch's CPU kernels
(``_weight_int8pack_mm``; ``_weight_int4pack_mm_for_cpu`` on a layout packed once at load time).
Those kernels are vectorised (AVX-512 and AVX2 alike) only for bf16 activations, so the few
rows go in as bf16 and come out as fp32: one bf16 rounding of the activations and of the raw
output (2^-9 relative), below int8's own weight rounding. Prompts (many rows) dequantize each
matrix once per call and run one fp32 GEMM, which is faster there (``kernel_rows``).

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
    group_size: Optional[int] = None  # int4: columns sharing a scale (default 32, Q4_0's); int8: None = per row
    embeddings: bool = True  # also store embedding tables (tokens, learned positions; a tied head) in integers

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        if self.scheme == "int4" and self.group_size is None:
            self.group_size = 32
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
    """Symmetric round-to-nearest: returns (integers, scales) with w ≈ q * scale.

    int8: int8 tensor (rows, cols) with values in [-127, 127]; float32 scales, max|w| / 127.
    int4: uint8 tensor (rows, cols/2), two values in [-8, 7] per byte (low nibble first); float16
    scales, as llama.cpp's Q4_0: scale = m / -8 for the group's largest-magnitude weight m (so
    m -> -8 exactly and a scale may be negative), a step of max|w| / 8 instead of max|w| / 7.
    scales: (rows, cols/group).
    """
    w = weight.detach().float()
    rows, cols = w.shape
    g = _groups(cols, group_size)
    qmax = 2 ** (bits - 1) - 1
    grouped = w.reshape(rows, cols // g, g)
    if bits == 4:  # llama.cpp's quantize_row_q4_0, op for op in fp32, so the integers are Q4_0's own
        extreme = grouped.gather(-1, grouped.abs().argmax(dim=-1, keepdim=True))[..., 0]
        scales = extreme / -8
        inverse = torch.where(scales == 0, torch.zeros_like(scales), 1 / scales)  # an all-zero group -> 0
        q = torch.trunc(grouped * inverse[..., None] + 8.5).clamp(0, 15) - 8
    else:
        scales = (grouped.abs().amax(dim=-1) / qmax).clamp(min=1e-12)
        q = torch.round(grouped / scales[..., None]).clamp(-qmax, qmax)
    q = q.to(torch.int8).reshape(rows, cols)
    if bits == 4:
        if cols % 2:
            raise ValueError(f"int4 packing needs an even number of columns, got {cols}")
        nib = (q & 0x0F).to(torch.uint8)
        q = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return q.contiguous(), (scales.half() if bits == 4 else scales).contiguous()  # fp16 scales: int4 files ~7x


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """Inverse of ``quantize_weight`` (up to rounding)."""
    if bits == 4:  # signed nibbles by arithmetic shifts of the bytes read as int8: low = (b << 4) >> 4, high = b >> 4
        b = q.view(torch.int8)
        q = torch.stack([(b << 4) >> 4, b >> 4], dim=-1).reshape(q.size(0), -1)
    rows, cols = q.shape
    groups = scales.size(1)
    w = q.reshape(rows, groups, cols // groups).float().mul_(scales.float()[..., None])
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


# --------------------------------------------------------------------------- weight-only kernels
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes


def kernel_rows(bits: int) -> int:
    """Up to how many rows (tokens) a weight-only matmul runs torch's integer kernel on this CPU;
    beyond that, dequantizing the matrix once per call and one fp32 GEMM is faster (the kernels
    are GEMVs at heart: their cost grows with the rows, the GEMM's barely does). Measured with
    ``benchmarks/bench_quantize.py --rows`` on AVX-512 and on forced AVX2 (RESULTS.md): the int4
    kernel wins for longer, since dequantizing nibbles costs more than widening int8."""
    if cpu_info().avx512:
        return 32 if bits == 8 else 64
    return 24 if bits == 8 else 48


def _int4_kernel_form(qweight: torch.Tensor, scales: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Our int4 matrix in the layout of ``_weight_int4pack_mm_for_cpu``: (packed weight, (groups,
    rows, 2) table of scale and zero in bf16), or None where the kernel cannot take it.

    The kernel computes w = (u - 8) * scale + zero on unsigned nibbles u, so our signed q is
    u = q + 8 (a flip of the nibble's top bit) with zero 0: the same weights, bit for bit. Its rows
    must come in multiples of 16; a padded matrix gets zero rows, sliced off the output."""
    rows, cols = qweight.size(0), qweight.size(1) * 2
    group = cols // scales.size(1)
    if (group not in INT4_KERNEL_GROUPS or qweight.device.type != "cpu"
            or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")):
        return None
    unsigned = torch.stack([(qweight & 0x0F) ^ 8, (qweight >> 4) ^ 8], dim=-1).reshape(rows, cols).to(torch.int32)
    pad = -rows % 16
    if pad:
        unsigned = torch.cat([unsigned, torch.full((pad, cols), 8, dtype=torch.int32)])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    table = torch.zeros(scales.size(1), rows + pad, 2, dtype=torch.bfloat16)
    table[:, :rows, 0] = scales.t().to(torch.bfloat16)
    return packed, table


class _IntegerMatrix(nn.Module):
    """A (rows, cols) weight stored as integers plus scales, and the matmul ``x @ weight.T`` that
    reads it (shared by the linear layer and the embedding table, whose tied head is this matmul).

    ``kernel_weight`` / ``kernel_scales`` are the kernels' in-memory forms (never saved: a
    checkpoint keeps the portable ``qweight`` / ``scales``), built once when the integers are
    set or loaded, so that ``forward`` has no lazy state and compiles to one graph."""

    def _init_matrix(self, rows: int, cols: int, spec: QuantizationSpec) -> None:
        self.spec = spec
        g = _groups(cols, spec.group_size)
        packed = cols // 2 if spec.bits == 4 else cols
        self.register_buffer("qweight", torch.zeros(rows, packed, dtype=torch.uint8 if spec.bits == 4 else torch.int8))
        self.register_buffer("scales", torch.ones(rows, cols // g,
                                                  dtype=torch.float16 if spec.bits == 4 else torch.float32))
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scales", None, persistent=False)
        self.kernel_rows = 0
        self.register_load_state_dict_post_hook(_pack_after_load)

    def pack_for_kernels(self) -> None:
        """Build the kernels' forms of the current integers (called after quantizing and after loading)."""
        self.kernel_weight = self.kernel_scales = None
        self.kernel_rows = 0
        if self.spec.scheme == "dynamic" or self.qweight.device.type != "cpu":
            return
        if self.spec.bits == 8 and self.scales.size(1) == 1 and hasattr(torch, "_weight_int8pack_mm"):
            # the kernel reads qweight as it is; unit bf16 scales, the fp32 ones multiply the output
            self.kernel_scales = torch.ones(self.qweight.size(0), dtype=torch.bfloat16)
        elif self.spec.bits == 4:
            form = _int4_kernel_form(self.qweight, self.scales)
            if form is None:
                return
            self.kernel_weight, self.kernel_scales = form
        else:
            return
        self.kernel_rows = kernel_rows(self.spec.bits)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.spec.bits)

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ weight.T + bias`` in x's dtype: the integer kernel for a few rows, else dequantize + GEMM."""
        if self.spec.scheme == "dynamic":
            return dynamic_int8_linear(self, x, bias)
        rows = x.numel() // x.size(-1)
        if rows <= self.kernel_rows and x.device.type == "cpu" and self.kernel_scales is not None:
            flat = x.reshape(rows, x.size(-1)).to(torch.bfloat16)
            if self.kernel_weight is None:  # int8, one scale per row
                out = torch._weight_int8pack_mm(flat, self.qweight, self.kernel_scales.to(torch.bfloat16))
                out = out * self.scales.view(-1)  # bf16 * fp32 -> fp32: the exact row scale
            else:
                group = 2 * self.qweight.size(1) // self.scales.size(1)
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.kernel_weight, group,
                                                                 self.kernel_scales.to(torch.bfloat16))
                out = out[:, :self.qweight.size(0)]
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.qweight.size(0))
            return out if bias is None else out + bias.to(x.dtype)
        if x.dtype == torch.float32 and x.device.type == "cpu" and cpu_info().bf16:
            # many rows (a prompt) on a CPU that multiplies bf16 natively (AMX, AVX512_BF16): the GEMM in bf16,
            # the activations rounded as the kernels above round theirs (int8 weights are exact in bf16; the
            # row scales multiply in fp32). Prompt processing of an int4 Qwen2.5-0.5B shape, 2 threads: 2x.
            if self.spec.bits == 8 and self.scales.size(1) == 1:
                out = F.linear(x.to(torch.bfloat16), self.qweight.to(torch.bfloat16)).float() * self.scales.view(-1)
            else:
                out = F.linear(x.to(torch.bfloat16), self.weight.to(torch.bfloat16)).float()
            return out if bias is None else out + bias.float()
        return F.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _pack_after_load(module: _IntegerMatrix, incompatible_keys) -> None:
    module.pack_for_kernels()


# --------------------------------------------------------------------------- modules
class QuantizedLinear(_IntegerMatrix):
    """A Linear whose weight is stored as integers plus scales (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantizationSpec):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_matrix(out_features, in_features, spec)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantizationSpec) -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec)
        module.qweight, module.scales = quantize_weight(linear.weight, spec.bits, spec.group_size)
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().float().clone()
        module = module.to(linear.weight.device)
        module.pack_for_kernels()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.spec.scheme}, "
                f"scales={tuple(self.scales.shape)}, bias={self.bias is not None}, kernel_rows={self.kernel_rows}")


class QuantizedEmbedding(_IntegerMatrix):
    """An embedding table stored as integers; ``weight`` dequantizes it, and ``project`` is the
    tied output head, which multiplies the integer table itself."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantizationSpec):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_matrix(num_embeddings, embedding_dim, spec)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantizationSpec) -> "QuantizedEmbedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, spec)
        module.qweight, module.scales = quantize_weight(embedding.weight, spec.bits, spec.group_size)
        module = module.to(embedding.weight.device)
        module.pack_for_kernels()
        return module

    def project(self, hidden: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tied output head, ``hidden @ weight.T + bias``: the table's rows are the head's output
        channels, so the integer kernels (or int8 GEMM, for dynamic) read the table as it is stored
        instead of dequantizing all of it every step (the head is 13% of a SmolLM's weights)."""
        return self.matmul(hidden, bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # dequantize only the rows asked for
        q = self.qweight[ids.reshape(-1)]
        return dequantize_weight(q, self.scales[ids.reshape(-1)], self.spec.bits).reshape(*ids.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.spec.scheme}, kernel_rows={self.kernel_rows}"


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
    if spec.scheme == "int4" and spec.group_size not in INT4_KERNEL_GROUPS:
        logger.warning("int4 group_size %d: torch's int4 kernel takes %s, so these weights decode by dequantizing "
                       "every matrix each step (slow)", spec.group_size, ", ".join(map(str, INT4_KERNEL_GROUPS)))
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
           "quantize_model", "prepare_quantized", "is_quantized", "kernel_rows", "SCHEMES"]
