"""The SSD scan's op API (``bmojo.ops.ssd_scan`` / ``ssd_state_update``): every malformed argument is refused
with a ValueError naming it, before any backend runs; well-formed calls dispatch to the backend's implementation."""
from __future__ import annotations

import math

import pytest
import torch

import bmojo.ops as ops


def scan_args(b=2, T=5, H=4, P=3, G=2, N=4):
    r = torch.randn
    return dict(x=r(b, T, H, P), dt=r(b, T, H), A=-torch.rand(H), B=r(b, T, G, N), C=r(b, T, G, N), D=r(H),
                z=r(b, T, H, P), dt_bias=r(H), initial_state=r(b, H, P, N))


def step_args(b=2, H=4, P=3, G=2, N=4):
    r = torch.randn
    return dict(state=r(b, H, P, N), x=r(b, H, P), dt=r(b, H), A=-torch.rand(H), B=r(b, G, N), C=r(b, G, N),
                D=r(H, P), z=r(b, H, P), dt_bias=r(H))


SCAN_ERRORS = [  # (argument(s), bad value or a function of the good args, what the message says)
    ("x", lambda a: a["x"][..., 0], r"x must be \(b, T, H, P\)"),
    ("x", lambda a: a["x"].long(), "x must be a floating-point tensor"),
    ("dt", lambda a: a["dt"][:, :, :3], r"dt must be \(b, T, H\)"),
    ("dt", lambda a: a["dt"][..., None].expand(-1, -1, -1, 3), r"dt must be \(b, T, H\)"),
    ("A", lambda a: torch.rand(4, 4), r"A must be \(H=4,\)"),
    ("A", lambda a: torch.ones(4, dtype=torch.int32), "A must be a floating-point tensor"),
    ("B", lambda a: a["B"][:, :4], "B must be"),
    ("C", lambda a: a["C"][..., :3], "B and C must have the same shape"),
    ("B C", lambda a: torch.randn(2, 5, 3, 4), "the groups G=3 of B and C must divide the heads H=4"),
    ("D", lambda a: torch.randn(3), r"D must be \(H=4,\) or \(H, P\)"),
    ("z", lambda a: a["z"][:, :4], "z must match x"),
    ("dt_bias", lambda a: torch.randn(4, 1), r"dt_bias must be \(H=4,\)"),
    ("initial_state", lambda a: a["initial_state"].transpose(2, 3), r"initial_state must be \(b, H, P, N\)"),
    ("initial_state", lambda a: a["initial_state"].double(), "initial_state must be float32"),
    ("dt_limit", (1.0, 0.5), "dt_limit must be a pair"),
    ("dt_limit", (0.0, math.nan), "dt_limit must be a pair"),
    ("dt_limit", 0.5, "dt_limit must be a pair"),
]


@pytest.mark.parametrize("name,bad,match", SCAN_ERRORS)
def test_ssd_scan_refuses_bad_arguments_by_name(name, bad, match):
    a = scan_args()
    value = bad(a) if callable(bad) else bad
    a.update(dict.fromkeys(name.split(), value))
    with pytest.raises(ValueError, match=f"ssd_scan: {match}"):
        ops.ssd_scan(**a, backend="torch")


STEP_ERRORS = [
    ("state", lambda a: a["state"][..., :3], r"state must be \(b, H, P, N\)"),
    ("state", lambda a: a["state"].half(), "state must be float32"),
    ("x", lambda a: a["x"][:, None], r"x must be \(b, H, P\)"),
    ("dt", lambda a: a["dt"][:, :2], r"dt must be \(b, H\)"),
    ("B C", lambda a: torch.randn(2, 3, 4), "the groups G=3 of B and C must divide the heads H=4"),
    ("C", lambda a: a["C"][:1], "B and C must have the same shape"),
    ("D", lambda a: torch.randn(4, 2), r"D must be \(H=4,\) or \(H, P\)"),
    ("z", lambda a: a["z"].int(), "z must be a floating-point tensor"),
]


@pytest.mark.parametrize("name,bad,match", STEP_ERRORS)
def test_ssd_state_update_refuses_bad_arguments_by_name(name, bad, match):
    a = step_args()
    value = bad(a) if callable(bad) else bad
    a.update(dict.fromkeys(name.split(), value))
    with pytest.raises(ValueError, match=f"ssd_state_update: {match}"):
        ops.ssd_state_update(**a, backend="torch")


def test_well_formed_calls_run_the_torch_backend():
    a = scan_args()
    y, h = ops.ssd_scan(**a, dt_limit=[0.0, 1.0], return_final_state=True, backend="torch")
    want, h_want = ops.ssd_scan_ref(**a, dt_limit=(0.0, 1.0), return_final_state=True)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_want, rtol=1e-5, atol=1e-5)
    s = step_args()
    state = s.pop("state")
    state_ref = state.clone()
    torch.testing.assert_close(ops.ssd_state_update(state, **s, backend="torch"), ops.ssd_state_update_ref(state_ref, **s))
    torch.testing.assert_close(state, state_ref)
