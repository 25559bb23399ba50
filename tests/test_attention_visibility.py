"""bmojo_attention against a brute-force oracle that lists, query by query, the keys it may see (and the query
that scores each: the fading keys' own queries when ``q_fading`` is given)."""
import math

import pytest
import torch

from bmojo import ops


def brute_force(q, k, v, window, kf, vf, m_f, km, vm, valid, qf=None):
    b, T, Hq, D = q.shape
    qf = q if qf is None else qf
    rep = Hq // k.shape[2]
    out = torch.zeros(b, T, Hq, D, dtype=torch.float64)
    for bi in range(b):
        for t in range(T):
            for h in range(Hq):
                g = h // rep
                scores, vals = [], []
                for s in range(T):
                    if s <= t and (window is None or s > t - window):
                        scores.append(k[bi, s, g].double() @ q[bi, t, h].double()), vals.append(v[bi, s, g])
                    if kf is not None and window is not None and t - window - m_f < s <= t - window:
                        scores.append(kf[bi, s, g].double() @ qf[bi, t, h].double()), vals.append(vf[bi, s, g])
                if km is not None:
                    c = t // window
                    for j in range(km.shape[2]):
                        if valid is None or valid[bi, c, j]:
                            scores.append(km[bi, c, j, g].double() @ q[bi, t, h].double()), vals.append(vm[bi, c, j, g])
                V = torch.stack(vals).double()
                p = torch.softmax(torch.stack(scores) / math.sqrt(D), 0)
                out[bi, t, h] = p @ V
    return out


CASES = [  # T, window, fading_window (None = w), with_fading, memory_slots, invalid_fraction
    (13, None, None, False, 0, 0.0),
    (13, 4, None, False, 0, 0.0),
    (13, 4, None, True, 0, 0.0),
    (13, 4, 2, True, 0, 0.0),
    (13, 4, 0, True, 0, 0.0),
    (13, 4, 3, True, 3, 0.0),
    (13, 4, 3, True, 3, 0.5),
    (13, 4, None, True, 2, 1.0),
    (6, 9, None, True, 2, 0.3),  # T < w: one chunk, no fading position yet
    (17, 5, 7, False, 4, 0.25),
]


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("T,window,m_f,with_fading,slots,invalid", CASES)
@pytest.mark.parametrize("q_fading", [False, True])
def test_matches_brute_force(backend, T, window, m_f, with_fading, slots, invalid, q_fading):
    if q_fading and not with_fading:
        pytest.skip("q_fading scores fading keys")
    b, Hq, Hkv, D = 2, 4, 2, 8
    q, k, v = torch.randn(b, T, Hq, D), torch.randn(b, T, Hkv, D), torch.randn(b, T, Hkv, D)
    kf = vf = km = vm = valid = qf = None
    if with_fading:
        kf, vf = torch.randn(b, T, Hkv, D), torch.randn(b, T, Hkv, D)
        qf = torch.randn(b, T, Hq, D) if q_fading else None
    if slots:
        n_chunks = -(-T // window)
        km, vm = torch.randn(b, n_chunks, slots, Hkv, D), torch.randn(b, n_chunks, slots, Hkv, D)
        valid = torch.rand(b, n_chunks, slots) >= invalid
    kw = dict(window=window, k_fading=kf, v_fading=vf, fading_window=m_f, k_memory=km, v_memory=vm,
              memory_valid=valid, q_fading=qf)
    if backend == "naive":
        out = ops.bmojo_attention_ref(q, k, v, **kw)
    else:
        out = ops.bmojo_attention(q, k, v, backend=backend, **kw)
    m_f_eff = window if m_f is None else m_f
    want = brute_force(q, k, v, window, kf, vf, m_f_eff, km, vm, valid, qf)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if backend == "naive" and window is not None:  # the weights oracle: the same output, rows summing to 1
        pos = None
        if km is not None:
            pos = torch.randint(0, T, km.shape[:3])
        o, weights = ops.bmojo_attention_weights_ref(q, k, v, memory_positions=pos, **kw)
        torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]), atol=1e-5, rtol=1e-5)
