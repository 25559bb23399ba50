import os

import torch

# Triton reads TRITON_INTERPRET when its kernels are defined, so it must be set before any test module
# imports bmojo.ops (which may import the cuda backend): without a GPU, Triton kernels run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
