"""Eidetic memory selection (docs/design.md, "The layer", steps 3-4)."""
import pytest
import torch

from bmojo import ops


def test_hand_made_sequence_selects_known_positions():
    # taps=1: eps_s = (f_s - f_{s-1})^2, so a spike of height a at s gives eps = a^2 at s and s+1.
    f = torch.zeros(1, 30, 1)
    f[0, 5], f[0, 13], f[0, 20] = 3.0, 1.0, 5.0
    eps = ops.innovation_scores(f, taps=1)[0]
    assert eps[5] == eps[6] == 9 and eps[13] == eps[14] == 1 and eps[20] == eps[21] == 25
    for backend in ("torch",):
        pos, valid = ops.innovation_select(f, window=4, slots=2, taps=1, backend=backend)
        expected = {  # chunk c may remember s <= 4c - 4; larger eps first, earlier position on ties
            0: [], 1: [0], 2: [0, 1], 3: [5, 6], 4: [5, 6], 5: [5, 6], 6: [20, 5], 7: [20, 21],
        }
        assert pos.shape == (1, 8, 2)
        for c, want in expected.items():
            got = pos[0, c][valid[0, c]].tolist()
            assert got == want, (c, got, want)


def test_predictor_is_mean_of_last_taps_with_zero_history():
    f = torch.arange(1.0, 7.0).view(1, 6, 1)
    eps = ops.innovation_scores(f, taps=3)[0]
    preds = torch.tensor([0.0, 1 / 3, 1.0, 2.0, 3.0, 4.0])  # mean of the 3 previous values, zeros before 0
    torch.testing.assert_close(eps, (f[0, :, 0] - preds) ** 2)


@pytest.mark.parametrize("T,w,slots,taps", [(1, 4, 2, 1), (37, 8, 3, 4), (50, 5, 20, 2), (64, 16, 4, 4)])
def test_memory_never_holds_window_or_future(T, w, slots, taps):
    f = torch.randn(3, T, 6)
    pos, valid = ops.innovation_select(f, w, slots, taps)
    ref_pos, ref_valid = ops.innovation_select_ref(f, w, slots, taps)
    assert torch.equal(pos, ref_pos) and torch.equal(valid, ref_valid)
    n_chunks = -(-T // w)
    assert pos.shape == (3, n_chunks, slots)
    for c in range(n_chunks):
        first_query = c * w
        chosen = pos[:, c][valid[:, c]]
        assert (chosen <= first_query - w).all()  # outside every query's window, never in the future
        eligible = max(0, (c - 1) * w + 1)
        assert int(valid[0, c].sum()) == min(slots, eligible)  # more slots than positions: rest invalid
        for bi in range(3):
            p = pos[bi, c][valid[bi, c]]
            assert len(set(p.tolist())) == len(p)  # no position twice
