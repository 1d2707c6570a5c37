"""Fixtures shared by the whole suite."""
import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine OpenMP's spin-waiting of a
    second thread multiplies the CPU time (the fine-tuning test once cost 30 s of CPU instead of 2).
    Restored after each test. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_with(monkeypatch):
    """``cpu_with(bf16=True)`` makes zenlm see a CPU with native bf16 (Zen 4 flags), ``bf16=False`` one
    without (Zen 3), whatever this host is: the bf16 paths are tested everywhere (emulated where the CPU
    has no bf16; the models are tiny) and the fp32 fallback too."""
    from zenlm import cpu

    def use(bf16: bool) -> None:
        flags = {"avx2", "fma"} | ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"} if bf16 else set())
        fake = cpu.detect(env={}, flags=frozenset(flags), model="Zen 4" if bf16 else "Zen 3", arch="x86_64")
        monkeypatch.setattr(cpu, "cpu_info", lambda: fake)
    return use
