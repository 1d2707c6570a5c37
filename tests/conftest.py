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
