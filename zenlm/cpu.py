"""What this CPU can do, and the choices that follow from it: one place, used everywhere.

zenlm runs on x86-64 CPUs that differ in ways that change results, not just speed:

* **int8 dot products.** Without VNNI (AVX-512 VNNI, or AMX for int8), x86 multiplies
  uint8 x int8 pairs with ``vpmaddubsw``, whose int16 pair sums saturate for full 8-bit
  activations: a silently wrong answer (10-20 % error), not a slow one. Such a CPU must
  quantize activations to 7 bits (fbgemm's ``reduce_range``), which cannot saturate.
* **bf16.** Without AVX512_BF16 or AMX, a bf16 matmul is emulated, ~100x slower than fp32
  (1 vs 100 GFLOP/s on Zen 3): there "bf16" must mean fp32, said once, not a silent crawl.

The features come from the CPU flags (``/proc/cpuinfo``; torch's own checks elsewhere) and
then from the switches that force older kernels, so that a VNNI machine can prove the AVX2
behaviour: ``ATEN_CPU_CAPABILITY`` (ATen), ``FBGEMM_ENABLE_INSTRUCTIONS`` (int8 GEMMs),
``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` (oneDNN) and ``MKL_ENABLE_INSTRUCTIONS``.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class CPUInfo:
    """The CPU as zenlm's kernels see it (after any forcing switch in the environment)."""

    model: str
    arch: str
    cores: int  # logical CPUs this process may use
    flags: frozenset = field(default_factory=frozenset, repr=False)  # what the hardware reports
    l2_bytes: Optional[int] = None  # per core
    l3_bytes: Optional[int] = None  # whole package
    forced: tuple = ()  # the forcing switches found in the environment, "NAME=value"
    avx2: bool = False
    avx512: bool = False  # AVX-512 F/BW/VL usable (not forced off)
    vnni: bool = False  # int8 dot products without saturation (AVX-512 VNNI or AMX-INT8) usable by fbgemm
    bf16: bool = False  # native bf16 matmuls (AVX512_BF16 or AMX-BF16) usable by oneDNN
    amx: bool = False  # AMX tiles usable

    @property
    def isa(self) -> str:
        """The widest vector ISA usable here: 'avx512', 'avx2' or the architecture's name."""
        return "avx512" if self.avx512 else "avx2" if self.avx2 else self.arch

    @property
    def int8_activation_bits(self) -> int:
        """8 where int8 dot products cannot saturate (VNNI/AMX, or not x86), else 7."""
        return 7 if self.arch == "x86_64" and not self.vnni else 8

    def describe(self) -> str:
        """One line for benchmarks, ``zenlm info --system`` and logs."""
        feats = [name for name, on in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.vnni),
                                       ("BF16", self.bf16), ("AMX", self.amx)) if on]
        caches = ", ".join(f"{name} {_size(b)}" for name, b in (("L2", self.l2_bytes), ("L3", self.l3_bytes)) if b)
        forced = f"; forced: {' '.join(self.forced)}" if self.forced else ""
        return (f"CPU: {self.model} | {self.cores} cores | {' '.join(feats) or self.arch}"
                f"{' | ' + caches if caches else ''} | int8 activations {self.int8_activation_bits}-bit"
                f" | bf16 {'native' if self.bf16 else 'emulated (fp32 used)'}{forced}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["flags"] = sorted(self.flags)
        out.update(isa=self.isa, int8_activation_bits=self.int8_activation_bits)
        return out


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def _cpuinfo() -> tuple[str, frozenset]:
    """(model name, flags) from /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model or platform.processor() or platform.machine(), flags


def _cache_bytes(level: str) -> Optional[int]:
    """Size of one cache of ``level`` ('L2' or 'L3') from sysfs."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        try:
            if f"L{(index / 'level').read_text().strip()}" != level or \
                    (index / "type").read_text().strip() not in ("Unified", "Data"):
                continue
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        return int(size.rstrip("KMG")) * scale
    return None


# the forcing switches, lower-cased, and the ranks they allow (higher = newer)
_ATEN = {"default": 9, "avx512": 2, "avx2": 1}
_FBGEMM = {"avx2": 1, "avx512": 2, "avx512_256": 2, "avx512_e1": 3, "avx512_vnni": 3}
_ONEDNN = {"sse41": 0, "avx": 0, "avx2": 1, "avx2_vnni": 1, "avx2_vnni_2": 1, "avx512_core": 2,
           "avx512_core_vnni": 3, "avx512_core_bf16": 4, "avx10_1_512": 4, "avx512_core_fp16": 4,
           "avx512_core_amx": 5, "avx10_1_512_amx": 5, "avx512_core_amx_fp16": 5, "avx10_1_512_amx_fp16": 5,
           "avx10_2_512": 5, "avx10_2_512_amx_2": 5, "default": 9, "all": 9}
_MKL = {"sse4_2": 0, "avx": 0, "avx2": 1, "avx512": 2, "avx512_e1": 3, "avx512_e2": 3, "avx512_e3": 4,
        "avx512_e4": 4, "avx512_e5": 5}


def _forced(env) -> tuple[tuple, dict]:
    """The forcing switches in ``env`` and the highest rank each lets its library use."""
    found, ranks = [], {}
    for lib, names, table in (("aten", ("ATEN_CPU_CAPABILITY",), _ATEN),
                              ("fbgemm", ("FBGEMM_ENABLE_INSTRUCTIONS",), _FBGEMM),
                              ("onednn", ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"), _ONEDNN),
                              ("mkl", ("MKL_ENABLE_INSTRUCTIONS",), _MKL)):
        for name in names:
            value = env.get(name, "").strip()
            if value:
                found.append(f"{name}={value}")
                ranks[lib] = table.get(value.lower(), 9)
                break
    return tuple(found), ranks


def detect(env=None, flags: Optional[frozenset] = None, model: Optional[str] = None,
           arch: Optional[str] = None) -> CPUInfo:
    """Build a CPUInfo from the hardware (or the given ``flags``/``model``/``arch``, for tests)
    and the forcing switches in ``env`` (default: this process's environment)."""
    env = os.environ if env is None else env
    if flags is None or model is None:
        hw_model, hw_flags = _cpuinfo()
        flags = hw_flags if flags is None else flags
        model = hw_model if model is None else model
    arch = arch or platform.machine().lower().replace("amd64", "x86_64")
    forced, ranks = _forced(env)
    rank = lambda lib: ranks.get(lib, 9)  # noqa: E731
    x86 = arch == "x86_64"
    avx2 = x86 and "avx2" in flags and "fma" in flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl"} <= flags
    amx_int8 = {"amx_tile", "amx_int8"} <= flags
    amx_bf16 = {"amx_tile", "amx_bf16"} <= flags
    # fbgemm's packed int8 GEMM needs AVX-512 VNNI (it has no AVX-VNNI kernels); AMX implies it
    vnni = avx512 and ("avx512_vnni" in flags or amx_int8) and rank("fbgemm") >= 3
    # ATen's capability decides which bf16 kernels (and, under avx2, which kernels at all) run
    bf16 = avx512 and ("avx512_bf16" in flags or amx_bf16) and rank("aten") >= 2 and rank("onednn") >= 4
    if not x86:  # arm64 and others: int8 dot products do not saturate; bf16 where the flags say so
        bf16 = "bf16" in flags or "sve_bf16" in flags or "bf16" in model.lower()
    return CPUInfo(model=model, arch=arch, cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1), flags=frozenset(flags), l2_bytes=_cache_bytes("L2"),
                   l3_bytes=_cache_bytes("L3"), forced=forced, avx2=avx2 and rank("aten") >= 1,
                   avx512=avx512 and rank("aten") >= 2, vnni=vnni, bf16=bf16,
                   amx=(amx_int8 or amx_bf16) and rank("aten") >= 2 and rank("onednn") >= 5)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CPUInfo:
    """This process's CPU (detected once)."""
    return detect()


def native_bf16(device=None) -> bool:
    """Whether bf16 matmuls run natively on ``device`` (default: the CPU)."""
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_info().bf16
    return device.type in ("mps", "xpu")


def resolve_precision(requested: str, device=None, strict: bool = False, what: str = "training") -> str:
    """The precision to run: 'fp32' or 'bf16'.

    ``auto`` is bf16 where the device multiplies bf16 natively, else fp32. An explicit ``bf16``
    on a CPU without native bf16 falls back to fp32 with one warning saying why (emulated bf16
    is ~100x slower than fp32), or, with ``strict``, raises ValueError with that reason.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    native = native_bf16(device)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if native:
        return "bf16"
    reason = (f"this CPU has no native bf16 (no AVX512_BF16 or AMX-BF16: {cpu_info().model}"
              f"{'; forced: ' + ' '.join(cpu_info().forced) if cpu_info().forced else ''}), where bf16 matmuls "
              "are emulated and ~100x slower than fp32")
    if strict:
        raise ValueError(f"precision 'bf16' was required for {what}, but {reason}")
    logger.warning("precision bf16 -> fp32 for %s: %s", what, reason)
    return "fp32"


__all__ = ["CPUInfo", "cpu_info", "detect", "native_bf16", "resolve_precision", "PRECISIONS"]
