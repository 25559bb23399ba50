"""The torch backend's eidetic selection (``bmojo.backends.torch.innovation``) against the oracle: the in-place
innovation scores are bitwise the reference's (the decoder's), so the parallel selection and step-by-step
decoding can never disagree on a near tie; the selection picks the reference's positions."""
from __future__ import annotations

import pytest
import torch

from bmojo import ops
from bmojo.backends.torch.innovation.parallel import innovation_scores_inplace, innovation_scores_traceable


@pytest.mark.parametrize("T", [1, 2, 3, 5, 64, 2049])
@pytest.mark.parametrize("taps", [1, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("history", [False, True])
def test_scores_bitwise_equal_to_reference(T, taps, dtype, history):
    g = torch.Generator().manual_seed(T * 31 + taps)
    f = torch.randn(2, T, 40, generator=g).to(dtype)
    hist = torch.randn(2, taps, 40, generator=g) if history else None
    got = innovation_scores_inplace(f, taps, hist)
    assert got.dtype == torch.float32 and torch.equal(got, ops.innovation_scores_ref(f, taps, hist))


def test_scores_non_contiguous_input_and_no_grad():
    f = torch.randn(2, 40, 50).transpose(1, 2).requires_grad_()  # (2, 50, 40), strided
    got = innovation_scores_inplace(f, 4)
    assert not got.requires_grad and torch.equal(got, ops.innovation_scores_ref(f, 4).detach())


def test_selection_matches_reference_with_ties():
    """Repeated rows give equal scores: the earlier position must win, as in the reference."""
    f = torch.randn(2, 8, 6).repeat_interleave(12, dim=1)  # (2, 96, 6): runs of equal f, many equal eps
    pos, valid = ops.innovation_select(f, 16, 5, 4, backend="torch")
    ref_pos, ref_valid = ops.innovation_select_ref(f, 16, 5, 4)
    assert torch.equal(pos, ref_pos) and torch.equal(valid, ref_valid)


@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("history", [False, True])
def test_traceable_scores_bitwise_equal_to_reference(T, history):
    """The scores of the path taken with a symbolic T (torch.export with a dynamic T), called eagerly."""
    g = torch.Generator().manual_seed(T)
    f = torch.randn(2, T, 24, generator=g)
    hist = torch.randn(2, 4, 24, generator=g) if history else None
    want = ops.innovation_scores_ref(f, 4, hist)
    assert torch.equal(innovation_scores_traceable(f, 4, hist), want)
    assert torch.equal(innovation_scores_inplace(f, 4, hist), want)
