"""The NKI emulator enforces the hardware rules it claims to (one kernel breaking each rule), follows the
documented instruction semantics, and implements exactly the ``nki.language`` / ``nki.isa`` names the
kernels use."""
from __future__ import annotations

import ast
import pathlib
import sys

import numpy as np
import pytest

import nki_emulator as nki
from neuron_harness import one_torch_thread  # noqa: F401  (autouse fixture)
from nki_emulator import NkiValidationError
from nki_emulator import isa as nisa
from nki_emulator import language as nl

NEURON_DIR = pathlib.Path(__file__).resolve().parents[3] / "backends" / "neuron"  # every op's kernels


def run(kernel, *args):
    return nki.simulate(nki.jit(kernel))(*args)


def _load(src, dtype=nl.float32):
    t = nl.ndarray(src.shape, dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=src)
    return t


def _store(t):
    out = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out


A64 = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# one kernel per enforced limit
# ----------------------------------------------------------------------------------------------
def test_rejects_more_than_128_partitions():
    def k(a):
        t = nl.ndarray((256, 512), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=t, value=0.0)
        return _store(t)
    with pytest.raises(NkiValidationError, match="partition dimension 256 exceeds maximum 128"):
        run(k, A64)


def test_rejects_psum_tile_larger_than_psum():
    def k(a):
        nl.ndarray((128, 4097), dtype=nl.float32, buffer=nl.psum)  # 16 KiB + 4 bytes per partition
    with pytest.raises(NkiValidationError, match="psum tile needs 16388 bytes"):
        run(k, A64)


def test_rejects_psum_overflow_of_live_tiles():
    def k(a):
        banks = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(9)]  # 9 x 2 KiB live
        return banks
    with pytest.raises(NkiValidationError, match="psum overflow"):
        run(k, A64)


def test_psum_space_is_reused_once_tiles_die():
    def k(a):
        for _ in range(20):  # each iteration's tiles die when the name is rebound
            t = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
            nisa.memset(dst=t, value=0.0)
    run(k, A64)
    assert nki.last_run["peak_psum_bytes"] <= 2 * 2048


def test_rejects_sbuf_overflow():
    def k(a):
        tiles = [nl.ndarray((128, 16384), dtype=nl.float32, buffer=nl.sbuf) for _ in range(4)]  # 4 x 64 KiB
        return tiles
    with pytest.raises(NkiValidationError, match="sbuf overflow"):
        run(k, A64)


def test_rejects_matmul_stationary_free_size_over_128():
    def k(a):
        st = nl.ndarray((64, 129), dtype=nl.float32, buffer=nl.sbuf)
        mv = _load(a)
        nisa.memset(dst=st, value=1.0)
        out = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.psum)  # (129, 64) could not even exist
        nisa.nc_matmul(dst=out, stationary=st, moving=mv)
    with pytest.raises(NkiValidationError, match="stationary free size 129 exceeds maximum 128"):
        run(k, A64)


def test_rejects_matmul_moving_free_size_over_512():
    def k(a):
        st = _load(a)
        mv = nl.ndarray((64, 513), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=mv, value=1.0)
        out = nl.ndarray((64, 513), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=out, stationary=st, moving=mv)
    with pytest.raises(NkiValidationError, match="moving free size 513 exceeds maximum 512"):
        run(k, A64)


def test_rejects_matmul_output_outside_psum():
    def k(a):
        st, mv = _load(a), _load(a)
        out = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.nc_matmul(dst=out, stationary=st, moving=mv)
    with pytest.raises(NkiValidationError, match="nc_matmul: dst is in sbuf"):
        run(k, A64)


def test_rejects_matmul_reading_psum_or_hbm():
    def from_psum(a):
        st = _load(a)
        ps = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=st, moving=st)
        out = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=out, stationary=st, moving=ps)

    def from_hbm(a):
        out = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=out, stationary=_load(a), moving=a)
    with pytest.raises(NkiValidationError, match="moving is in psum"):
        run(from_psum, A64)
    with pytest.raises(NkiValidationError, match="moving is in hbm"):
        run(from_hbm, A64)


def test_rejects_compute_engines_reading_hbm():
    def k(a):
        t = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=t, op=nl.exp, data=a)  # a is still in HBM: it must be DMA'd to SBUF first
    with pytest.raises(NkiValidationError, match="activation: data is in hbm"):
        run(k, A64)

    def k2(a):
        t = _load(a)
        nisa.tensor_tensor(dst=t, data1=t, data2=a, op=nl.add)
    with pytest.raises(NkiValidationError, match="tensor_tensor: data2 is in hbm"):
        run(k2, A64)


def test_rejects_dma_through_psum():
    def k(a):
        ps = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.dma_copy(dst=ps, src=a)
    with pytest.raises(NkiValidationError, match="dma_copy: dst is in PSUM"):
        run(k, A64)


def test_rejects_two_psum_inputs():
    def k(a):
        st = _load(a)
        p1 = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        p2 = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=p1, stationary=st, moving=st)
        nisa.nc_matmul(dst=p2, stationary=st, moving=st)
        nisa.tensor_tensor(dst=st, data1=p1, data2=p2, op=nl.add)
    with pytest.raises(NkiValidationError, match="both inputs in PSUM"):
        run(k, A64)


def test_rejects_out_of_bounds_views_and_non_shared_outputs():
    def oob(a):
        t = _load(a)
        return _store(t[:, 32:65])
    with pytest.raises(NkiValidationError, match="out of bounds"):
        run(oob, A64)

    def private_out(a):
        out = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.hbm)
        nisa.dma_copy(dst=out, src=_load(a))
        return out
    with pytest.raises(NkiValidationError, match="shared_hbm"):
        run(private_out, A64)


def test_uninitialised_memory_reads_as_nan():
    def half_written(a):
        t = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[:, 0:32], src=a[:, 0:32])
        return _store(t)
    out = run(half_written, A64)
    assert np.array_equal(out[:, :32], A64[:, :32]) and np.isnan(out[:, 32:]).all()

    def accumulate_on_fresh_psum(a):
        st = _load(a)
        ps = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=st, moving=st, accumulate=True)  # nothing to accumulate onto
        res = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=ps)
        return _store(res)
    assert np.isnan(run(accumulate_on_fresh_psum, A64)).all()


# ----------------------------------------------------------------------------------------------
# documented semantics
# ----------------------------------------------------------------------------------------------
def test_matmul_transposes_stationary_and_accumulates():
    a = A64[:, :48]
    b = np.random.default_rng(1).standard_normal((64, 100)).astype(np.float32)

    def k(a, b):
        st, mv = _load(a), _load(b)
        ps = nl.ndarray((48, 100), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=st, moving=mv)  # accumulate=None: first write overwrites
        nisa.nc_matmul(dst=ps, stationary=st, moving=mv)  # ... later writes accumulate
        res = nl.ndarray((48, 100), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=ps)
        return _store(res)
    np.testing.assert_allclose(run(k, a, b), 2 * a.T @ b, rtol=1e-5, atol=1e-4)


def test_tensor_tensor_scan_follows_the_isa_pseudocode():
    rng = np.random.default_rng(2)
    d0, d1 = rng.random((8, 40), dtype=np.float32), rng.random((8, 40), dtype=np.float32)
    init = rng.random((8, 1), dtype=np.float32)

    def k(d0, d1, init):
        a, b, i = _load(d0), _load(d1), _load(init)
        out = nl.ndarray((8, 40), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(dst=out, data0=a, data1=b, initial=i, op0=nl.multiply, op1=nl.add)
        return _store(out)
    want = np.zeros((8, 40), dtype=np.float64)
    prev = init[:, 0].astype(np.float64)
    for t in range(40):
        prev = d0[:, t] * prev + d1[:, t]
        want[:, t] = prev
    np.testing.assert_allclose(run(k, d0, d1, init), want, rtol=1e-5)


def test_affine_select_and_activation_reduce():
    def k(a):
        t = _load(a)
        nisa.affine_select(dst=t, pattern=[[-1, 64]], channel_multiplier=1, on_true_tile=t, on_false_value=-5.0,
                           cmp_op=nl.greater_equal, offset=0)  # keep p - j >= 0 (lower triangle)
        e = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.sbuf)
        s = nl.ndarray((64, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=e, op=nl.copy, data=t, scale=2.0, bias=1.0, reduce_op=nl.add, reduce_res=s,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)
        return _store(e), _store(s)
    e, s = run(k, A64)
    masked = np.where(np.tril(np.ones((64, 64), dtype=bool)), A64, -5.0)
    np.testing.assert_allclose(e, 2 * masked + 1, rtol=1e-6)
    np.testing.assert_allclose(s[:, 0], (2 * masked + 1).sum(1), rtol=1e-5, atol=1e-4)


def test_installed_is_scoped():
    before = {n: sys.modules.get(n) for n in ("nki", "nki.language", "nki.isa")}
    with nki.installed():
        import nki as inner
        import nki.language as inner_nl
        assert inner is nki and inner_nl is nl
    assert {n: sys.modules.get(n) for n in before} == before


# ----------------------------------------------------------------------------------------------
# exactly the subset the kernels use
# ----------------------------------------------------------------------------------------------
def _used_names():
    used = {"nl": set(), "nisa": set(), "nki": set()}
    for path in NEURON_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in used:
                used[node.value.id].add(node.attr)
    return used


DTYPE_NAMES = {"float32", "float16", "bfloat16", "int32", "uint8"}  # what kernel arguments may carry


def test_emulator_implements_exactly_what_the_kernels_use():
    used = _used_names()
    public = lambda mod: {n for n in vars(mod) if not n.startswith("_")}  # noqa: E731
    lang = public(nl) - {"annotations", "np", "MemoryRegion", "NkiTensor"}
    isa = {n for n in public(nisa) if callable(getattr(nisa, n)) and getattr(getattr(nisa, n), "__module__", "") == nisa.__name__}
    isa -= {"engine"}  # default-argument enum of the instruction signatures
    assert used["nl"] <= lang, f"kernels use nl names the emulator lacks: {used['nl'] - lang}"
    assert used["nisa"] <= isa | {"reduce_cmd"}, f"kernels use nisa names the emulator lacks: {used['nisa'] - isa}"
    assert lang - DTYPE_NAMES == used["nl"] - DTYPE_NAMES, f"emulated but unused nl names: {lang - DTYPE_NAMES - used['nl']}"
    assert isa == used["nisa"], f"emulated but unused nisa names: {isa - used['nisa']}"
    assert used["nki"] == {"jit"}
