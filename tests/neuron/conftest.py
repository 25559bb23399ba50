import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The reference loops run many tiny ops: one intra-op thread is much faster than two competing ones
    on the shared 2-core CI machine. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
