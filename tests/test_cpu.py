"""What this CPU has, and the choices zenlm makes from it: int8 activation width, bf16 or fp32,
on each kind of x86 CPU the project runs on, and under the switches that force older kernels."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zenlm
from zenlm import cpu
from zenlm.cpu import detect, resolve_precision

BASE = {"sse4_2", "avx", "fma", "f16c"}
ZEN3 = frozenset(BASE | {"avx2"})  # AVX2 only: no AVX-512, no VNNI, no bf16
ZEN4 = frozenset(ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"})
SAPPHIRE = frozenset(ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"})
ALDER = frozenset(ZEN3 | {"avx_vnni"})  # 256-bit VNNI only: fbgemm has no kernels for it


@pytest.mark.parametrize("flags,bits,bf16", [(ZEN3, 7, False), (ALDER, 7, False), (ZEN4, 8, True),
                                             (SAPPHIRE, 8, True)])
def test_each_cpu_kind_gets_its_int8_width_and_bf16(flags, bits, bf16):
    info = detect(env={}, flags=flags, model="test", arch="x86_64")
    assert info.int8_activation_bits == bits
    assert info.bf16 is bf16
    assert info.isa == ("avx512" if "avx512f" in flags else "avx2")
    line = info.describe()
    assert f"int8 activations {bits}-bit" in line and ("bf16 native" in line) is bf16


@pytest.mark.parametrize("env,bits,bf16", [
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, 7, True),
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"}, 7, True),  # AVX-512 without the VNNI extension
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"}, 8, True),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, 8, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, 8, False),
    ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, 7, False),
])
def test_forcing_switches_make_a_new_cpu_behave_as_an_old_one(env, bits, bf16):
    info = detect(env=env, flags=SAPPHIRE, model="test", arch="x86_64")
    assert (info.int8_activation_bits, info.bf16) == (bits, bf16)
    assert all(f"{k}={v}" in info.forced for k, v in env.items())
    assert "forced:" in info.describe()


def test_other_architectures_never_take_7_bits():
    assert detect(env={}, flags=frozenset({"asimd"}), model="arm", arch="aarch64").int8_activation_bits == 8


def test_auto_precision_follows_the_cpu(monkeypatch):
    for flags, expected in ((ZEN3, "fp32"), (ZEN4, "bf16")):
        monkeypatch.setattr(cpu, "cpu_info", lambda flags=flags: detect(env={}, flags=flags, model="t", arch="x86_64"))
        assert resolve_precision("auto") == expected
        assert resolve_precision("fp32") == "fp32"


def test_bf16_without_native_support_falls_back_with_one_line_or_fails_when_strict(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "cpu_info", lambda: detect(env={}, flags=ZEN3, model="AMD EPYC 7B13", arch="x86_64"))
    with caplog.at_level(logging.WARNING, logger="zenlm.cpu"):
        assert resolve_precision("bf16", what="training") == "fp32"
    assert len(caplog.records) == 1
    assert "bf16 -> fp32" in caplog.text and "AMD EPYC 7B13" in caplog.text and "100x slower" in caplog.text
    with pytest.raises(ValueError, match="bf16.*required.*no native bf16"):
        resolve_precision("bf16", strict=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")


def test_this_machine_is_described():
    info = cpu.cpu_info()
    assert info.cores >= 1 and info.model
    line = info.describe()
    assert line.startswith("CPU: ") and "int8 activations" in line
    # torch's own view agrees with ours on the hardware features zenlm relies on (no forcing here)
    if not info.forced and info.arch == "x86_64":
        vnni = getattr(torch.cpu, "_is_vnni_supported", None) or getattr(torch.cpu, "_is_avx512_vnni_supported", None)
        if vnni is not None and info.avx512:
            assert bool(vnni()) == ("avx512_vnni" in info.flags or "amx_int8" in info.flags)
    # under the forcing switches (the forced pass below runs this test with them) it reports the old CPU
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        assert not info.avx512 and not info.bf16 and resolve_precision("auto") == "fp32"
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") == "AVX2" and info.arch == "x86_64":
        assert info.int8_activation_bits == 7


FORCED = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_int8_and_precision_tests_hold_with_avx2_kernels_forced():
    """The proof, on a VNNI/bf16 machine, that an AVX2-only CPU gets right answers: the int8,
    precision and CPU-path tests run again in a fresh process with the older kernels forced
    (fbgemm without VNNI, ATen at AVX2). On an AVX2-only host this repeats them as they are."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **FORCED, "OMP_NUM_THREADS": "1"}
    tests = ["tests/test_quantize.py", "tests/test_cpu.py", "tests/test_fast_cpu.py",
             "tests/train/test_loop.py::test_bf16_autocast_trains",
             "tests/train/test_loop.py::test_precision_on_the_cpu_it_has",
             "tests/retrieval/test_embed.py::test_embedder_precisions_and_truncation",
             "tests/retrieval/test_index.py::test_queries_are_encoded_at_full_precision"]
    me = "tests/test_cpu.py::test_int8_and_precision_tests_hold_with_avx2_kernels_forced"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--deselect", me, *tests],
                          cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout

