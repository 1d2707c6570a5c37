"""CPU speed-ups for the model, behind one switch (``fast_cpu``); model.py reads like the paper
and calls these where they apply.

* Linear layers: fp32 through MKL or oneDNN, whichever measured faster on this CPU; under bf16
  autocast (inference) cached bf16 weights instead of a fresh cast every call.
* Attention under bf16 on CPU: batched matmuls (causal squares in blocks) instead of the flash kernel.
* Cross-entropy on CPU: blockwise, one log-sum-exp per row kept instead of an fp32 log-softmax.

Every path computes the same function as the plain torch call, up to float rounding
(tests/test_fast_cpu.py, tests/test_model.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a position without a target (torch's default ignore_index)


def causal_mask(query_len: int, key_len: int, past: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool: query i (at absolute position past+i) sees keys 0..past+i."""
    rows = torch.arange(past, past + query_len, device=device)[:, None]
    return torch.arange(key_len, device=device)[None, :] <= rows


# --------------------------------------------------------------------------- linear layers
# On CPU, torch sends fp32 matmuls to MKL, which on some CPUs (AMD Zen 4/5 here) reaches
# well below the oneDNN kernels torch already ships, and on others (Zen 3, AVX2 only) above
# them; bf16 already goes to oneDNN. fast_cpu() turns on zenlm's CPU paths (cached bf16
# weights, bf16 attention) and routes fp32 Linear layers (forward and both backward products)
# through whichever of the two measures faster on this CPU: same math, results equal to
# float rounding. Off by default: it is opt-in state.
_FAST_CPU = {"enabled": False, "onednn": False}
FP32_LINEAR_BACKENDS = ("mkl", "onednn")
_BACKEND: dict = {}


def fast_cpu(enabled: bool = True, fp32_linear: Optional[str] = None) -> bool:
    """Opt in (or out) to zenlm's CPU fast paths; returns the new setting.

    ``fp32_linear`` picks the kernel library for fp32 Linear layers: "onednn", "mkl" (torch's
    default) or None, which takes the one that measured faster on this CPU
    (``fp32_linear_backend``). Affects only zenlm modules (no torch flags change). Inputs under
    autocast, other dtypes or devices, and code being compiled keep the default ``F.linear`` path.
    """
    if fp32_linear is not None and fp32_linear not in FP32_LINEAR_BACKENDS:
        raise ValueError(f"fp32_linear must be one of {', '.join(FP32_LINEAR_BACKENDS)} or None, got {fp32_linear!r}")
    _FAST_CPU["enabled"] = bool(enabled) and torch.backends.mkldnn.is_available()
    _FAST_CPU["onednn"] = _FAST_CPU["enabled"] and (fp32_linear or fp32_linear_backend()) == "onednn"
    return _FAST_CPU["enabled"]


def fp32_linear_backend() -> str:
    """'onednn' or 'mkl': the faster library for fp32 Linear layers on this CPU and thread count.

    Decided once per CPU model, forcing switches, torch version and thread count by timing a
    768x3072 Linear and its input gradient on 256 rows both ways (~0.3 s), and cached in ``$XDG_CACHE_HOME/zenlm``
    (``~/.cache/zenlm``) so later processes skip it. ``ZENLM_FP32_LINEAR=mkl|onednn`` overrides.
    oneDNN must win by 3% to be chosen: below that, torch's default path is the safer bet.
    """
    import os

    forced = os.environ.get("ZENLM_FP32_LINEAR", "").strip().lower()
    if forced:
        if forced not in FP32_LINEAR_BACKENDS:
            raise ValueError(f"ZENLM_FP32_LINEAR must be one of {', '.join(FP32_LINEAR_BACKENDS)}, got {forced!r}")
        return forced
    if not torch.backends.mkldnn.is_available():
        return "mkl"
    from .cpu import cpu_info

    info = cpu_info()
    key = f"{info.model}|{' '.join(info.forced)}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    if key not in _BACKEND:
        import json
        from pathlib import Path

        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zenlm" / "kernels.json"
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key not in cache.get("fp32_linear", {}):
            times = calibrate_fp32_linear()
            cache.setdefault("fp32_linear", {})[key] = {
                "choice": "onednn" if times["onednn"] < 0.97 * times["mkl"] else "mkl", "seconds": times}
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cache, indent=1))
                tmp.replace(path)
            except OSError:  # a read-only home: decide again next process
                pass
        _BACKEND[key] = cache["fp32_linear"][key]["choice"]
    return _BACKEND[key]


def system_summary() -> str:
    """``zenlm info --system``: what this CPU has, the torch build and threads, and the kernels and
    precision zenlm picks for it (int8 activation width, ``precision='auto'``, the fp32 Linear backend)."""
    from .cpu import cpu_info, resolve_precision

    info = cpu_info()
    return "\n".join([
        info.describe(),
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen capability "
        f"{torch.backends.cpu.get_cpu_capability()}",
        f"int8 (dynamic): {info.int8_activation_bits}-bit activations "
        + ("(VNNI: 8-bit products cannot saturate)" if info.int8_activation_bits == 8 else
           "(no VNNI: 8-bit pair sums would saturate, so 7-bit, as torch's reduce_range)"),
        f"precision auto -> {resolve_precision('auto')} "
        + ("(native bf16)" if info.bf16 else "(no AVX512_BF16/AMX: emulated bf16 is ~100x slower, so fp32)"),
        f"fp32 linear layers under fast_cpu(): {fp32_linear_backend()}",
    ])


def calibrate_fp32_linear(rows: int = 256, d: int = 768, reps: int = 5) -> dict:
    """Best seconds of one (rows x d) @ (d x 4d) fp32 Linear and its input gradient (the product
    with the transposed weight, which training adds) through MKL and through oneDNN, timed
    alternately so that load from other processes hits both alike."""
    import time

    x, w, g = torch.randn(rows, d), torch.randn(4 * d, d), torch.randn(rows, 4 * d)
    paths = {"mkl": lambda: (F.linear(x, w), F.linear(g, w.t())),
             "onednn": lambda: (_onednn(x, w, None), _onednn(g, w.t(), None))}
    best = {name: float("inf") for name in paths}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                if rep:  # the first round warms up (packing, page faults)
                    best[name] = min(best[name], time.perf_counter() - start)
    return best


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.size(0))


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b with oneDNN for y and dL/dx = g W; dL/dW = gᵀ x."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.size(-1))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t(), None)
        if ctx.needs_input_grad[1]:
            # gᵀx through torch.mm: MKL reads both transposed operands in place, where oneDNN would
            # first copy them (measured 1.3-1.5% of a seed-base fp32 training step)
            grad_w = torch.mm(grad2.t(), x.reshape(-1, x.size(-1)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


def _bf16_copy(t: torch.Tensor) -> torch.Tensor:
    """t cast to bf16, kept on the tensor until it changes (in-place updates bump ``_version``),
    so repeated bf16-autocast inference does not re-cast every weight on every call."""
    key = (t._version, t.data_ptr())
    cached = getattr(t, "_zenlm_bf16", None)
    if cached is None or cached[0] != key:
        cached = (key, t.detach().to(torch.bfloat16))
        t._zenlm_bf16 = cached
    return cached[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 CPU tensors once ``fast_cpu()`` is on; under bf16
    autocast without autograd (inference) it reuses cached bf16 weights: the same casts autocast makes."""
    if (_FAST_CPU["enabled"] and x.device.type == "cpu" and not torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling()):
        return F.linear(x.to(torch.bfloat16), _bf16_copy(weight), None if bias is None else _bf16_copy(bias))
    if (_FAST_CPU["onednn"] and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OneDNNLinear.apply(x, weight, bias)
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                   is_causal: bool) -> torch.Tensor:
    """softmax(QKᵀ/√d_k)V on CPU as batched matmuls (fast_cpu() only, bf16).

    torch's CPU flash kernel runs bf16 no faster than fp32 (~115 GFLOP/s on 2 Zen 4
    cores), while bf16 bmm reaches ~2x that. torch's CPU softmax of a bf16 tensor
    accumulates in fp32 and stores bf16 probabilities: the rounding of eager attention
    under autocast, without an fp32 copy of the scores.
    A causal square (training, prefill) is cut into query blocks that multiply only the
    keys they may see, skipping ~3/8 of the products a full masked matmul would do.
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    t, s = q.size(2), k.size(2)
    if is_causal and mask is None and t == s and t >= 256:
        outs, step = [], t // 4
        for a in range(0, t, step):
            b = min(t, a + step)
            scores = (q[:, :, a:b] * scale) @ k[:, :, :b].transpose(-2, -1)
            scores = scores.masked_fill(~causal_mask(b - a, b, a, q.device), float("-inf"))
            outs.append(scores.softmax(dim=-1) @ v[:, :, :b])
        return torch.cat(outs, dim=2)
    scores = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        mask = causal_mask(t, s, 0, q.device) if mask is None else mask & causal_mask(t, s, 0, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def cpu_attention_applies(q: torch.Tensor) -> bool:
    """Whether ``cpu_attention`` is the path for these queries (fast_cpu() on, bf16, CPU, eager)."""
    return (_FAST_CPU["enabled"] and q.dtype == torch.bfloat16 and q.device.type == "cpu"
            and not torch.compiler.is_compiling())


# --------------------------------------------------------------------------- loss
class _CrossEntropy(torch.autograd.Function):
    """Mean token cross-entropy over rows whose label is not ``ignore_index``, read from the
    logits a few rows at a time (each block of fp32 work stays in cache).

    ``F.cross_entropy(logits.float())`` keeps an fp32 log-softmax of every (token, vocabulary)
    pair for its backward and, under bf16, an fp32 copy of the logits too: on a CPU that is a
    few passes over tens of megabytes per step. Here the forward keeps one log-sum-exp per row
    and the backward writes softmax − target straight into the logits' dtype. Label smoothing ε
    follows torch: (1 − ε)·nll + ε·(lse − mean logit), averaged over the counted rows."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, smoothing: float):
        n, vocab = logits.shape
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)
        lse, target = logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)
        mean = logits.new_empty(n, dtype=torch.float32) if smoothing else None
        rows = _loss_rows(vocab)
        for a in range(0, n, rows):
            x = logits[a:a + rows].float()
            lse[a:a + rows] = torch.logsumexp(x, dim=-1)
            target[a:a + rows] = x.gather(1, safe[a:a + rows, None]).squeeze(1)
            if smoothing:
                mean[a:a + rows] = x.mean(dim=-1)
        per_row = lse - target
        if smoothing:
            per_row = (1.0 - smoothing) * per_row + smoothing * (lse - mean)
        count = valid.sum()
        ctx.save_for_backward(logits, safe, valid, lse, count)
        ctx.smoothing = smoothing
        return per_row.masked_fill(~valid, 0.0).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, safe, valid, lse, count = ctx.saved_tensors
        s, vocab = ctx.smoothing, logits.size(1)
        scale = (grad / count) * valid.float()  # d loss / d logit = scale · (softmax − target)
        out = torch.empty_like(logits)
        rows = _loss_rows(vocab)
        for a in range(0, logits.size(0), rows):
            p = torch.sub(logits[a:a + rows].float(), lse[a:a + rows, None]).exp_()  # a new block, never the logits
            if s:
                p.sub_(s / vocab)
            p.scatter_add_(1, safe[a:a + rows, None], p.new_full((p.size(0), 1), s - 1.0))
            out[a:a + rows] = p.mul_(scale[a:a + rows, None])
        return out, None, None, None


def _loss_rows(vocab: int) -> int:
    return max(1, (1 << 20) // (4 * vocab))  # ~1 MB of fp32 per block: one core's L2


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), labels, ignore_index=..., label_smoothing=...)`` (mean over
    counted rows; nan when none is counted, as torch). On CPU it takes the blockwise path above;
    elsewhere, or while compiling, torch's own (one fused kernel on a GPU)."""
    logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    counted = labels[labels != ignore_index]
    if counted.numel():
        low, high = (int(t) for t in torch.aminmax(counted))
        if low < 0 or high >= logits.size(-1):
            raise ValueError(f"label {low if low < 0 else high} is outside the vocabulary [0, {logits.size(-1)}) "
                             f"(use {ignore_index} for positions without a target)")
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        return _CrossEntropy.apply(logits.contiguous(), labels, ignore_index, float(label_smoothing))
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing)
