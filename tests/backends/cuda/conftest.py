"""tests/backends/cuda: the Triton kernels of the cuda backend against the naive references.

Without a GPU the kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET=1 must be
set before bmojo.backends.cuda (and its @triton.jit kernels) is imported, so it is set here, at collection.
The interpreter executes every program in Python, so shapes are tiny and block sizes are small enough
that several chunks / blocks occur. Each test module skips itself when triton is not importable.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def small_attention_blocks():
    """16-row query / key / memory blocks, so a chunk's memory is read by several query blocks."""
    from bmojo.backends.cuda.attention import parallel

    old = parallel._TEST_BLOCKS
    parallel._TEST_BLOCKS = {"M": 16, "N": 16, "E": 16}
    yield
    parallel._TEST_BLOCKS = old
