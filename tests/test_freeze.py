"""Frozen weights: Module.freeze() and fastrnn._buffers.frozen_copy.

A frozen parameter's values live on an immutable bytes object, so they cannot
change, and eval calls take the digests its plan took once instead of hashing the
weights on every call. What must hold: no view of a frozen array can be made
writeable; a frozen module's results are bitwise those of the same weights
unfrozen (except short sequences at small batch, which frozen read the packed
weights the cache keeps, functional.pack_flags: there bitwise the general path's
frozen call, and the unfrozen call's within float rounding), with no weights hashed
per call; a new array (frozen or not) is seen
at the next call; writes through fastrnn (optimiser steps, load_state_dict) fail
naming the parameter before anything is written; unfreeze() gives writeable
copies whose in-place edits the next call sees.
"""

import copy

import numpy as np
import pytest

import fastrnn
from fastrnn import _fastpath, _recurrent
from fastrnn import functional as F
from fastrnn._buffers import frozen_copy, is_frozen
from fastrnn.modules.module import ALIGN
from test_fastpath import flat, general

MODULES = {"LSTM": fastrnn.LSTM, "GRU": fastrnn.GRU, "RNN": fastrnn.RNN}
CELLS = {"LSTMCell": fastrnn.LSTMCell, "GRUCell": fastrnn.GRUCell, "RNNCell": fastrnn.RNNCell}


# the packed and the dot-product kernels' sums of the same terms, through a few layers
ROUNDING = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}


def seq(T, B, I, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal((T, B, I)).astype(dtype)


# ---- frozen_copy ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8])
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (5, 0), (4, 5, 6)])
def test_frozen_copy_holds_the_values_read_only_on_a_line(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    f = frozen_copy(a)
    assert f.dtype == a.dtype and f.shape == a.shape and f.flags.c_contiguous
    np.testing.assert_array_equal(f, a)
    assert f.ctypes.data % ALIGN == 0
    assert not f.flags.writeable and is_frozen(f) and not is_frozen(a)


def test_no_view_of_a_frozen_array_can_be_made_writeable():
    f = frozen_copy(np.ones((4, 6), np.float32))
    views = [f, f[1:], f.T, f.reshape(-1), f.view(np.uint8), f.base]
    for v in views:
        assert is_frozen(v)
        with pytest.raises(ValueError):
            v.flags.writeable = True
        with pytest.raises(ValueError):
            v[...] = 0
    np.testing.assert_array_equal(f, 1)


def test_frozen_copy_of_a_strided_array_is_c_ordered_and_checks_its_argument():
    a = np.asfortranarray(np.arange(12.0).reshape(3, 4))[:, ::2]
    f = frozen_copy(a)
    assert f.flags.c_contiguous
    np.testing.assert_array_equal(f, a)
    with pytest.raises(ValueError, match="src"):
        frozen_copy(np.array([object()]))
    with pytest.raises(ValueError, match="src"):
        frozen_copy([1.0, 2.0])


def test_what_is_frozen():
    assert is_frozen(np.frombuffer(bytes(16), np.float32))       # any array on bytes
    assert not is_frozen(np.frombuffer(bytearray(16), np.float32))
    assert not is_frozen(np.zeros(4))
    ro = np.zeros(4)
    ro.flags.writeable = False                 # read-only, but its owner can flip it back
    assert not is_frozen(ro)


# ---- modules -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(MODULES))
# (T, B, layers, directions, whether unfrozen calls read the weights packed too)
@pytest.mark.parametrize("T,B,layers,D,packed", [(50, 2, 1, 1, True), (7, 3, 2, 1, False),
                                                 (1, 1, 1, 1, False), (12, 40, 1, 1, True),
                                                 (9, 2, 2, 2, False), (5, 1, 1, 1, False),
                                                 (12, 2, 1, 1, False), (1, 9, 1, 1, True)])
def test_frozen_module_gives_the_same_bits_and_hashes_nothing(name, dtype, T, B, layers, D,
                                                              packed):
    I, H = 384, 320        # large enough that eval calls pack (and so hash) their weights
    m = MODULES[name](I, H, num_layers=layers, bidirectional=D == 2, dtype=dtype).eval()
    x = seq(T, B, I, dtype)
    h0 = np.random.default_rng(2).standard_normal((layers * D, B, H)).astype(dtype)
    hx = (h0, h0 * 0.5) if name == "LSTM" else h0
    want = m(x, hx)
    before = _recurrent._digested_bytes()
    m(x, hx)
    plain = _recurrent._digested_bytes() - before
    assert m.freeze() is m and m.is_frozen()
    same_bits = F.pack_flags(T, B) == (True, True)
    assert same_bits == packed
    for _ in range(3):
        before = _recurrent._digested_bytes()
        got = m(x, hx)
        assert _recurrent._digested_bytes() == before
        ref = general(m, x, hx)       # the same frozen call, the general path
        for g, w, r in zip(flat(got), flat(want), flat(ref)):
            np.testing.assert_array_equal(g, r)        # fast path = general path, frozen
            if same_bits:
                np.testing.assert_array_equal(g, w)
            else:   # packed, not read in place: the unfrozen call's numbers to rounding
                np.testing.assert_allclose(g, w, **ROUNDING[dtype])
    # Where a call packs its weights (decided from the shapes alone), the plain calls
    # hashed them, so the frozen calls' "hashed nothing" above could have failed; the
    # other shapes read the weights in place (nothing to hash, frozen or not) and are
    # here for the bits.
    assert (plain > 0) == any(F.pack_flags(T, B)), plain


@pytest.mark.parametrize("B", [1, 5, 64])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_frozen_cells_give_the_same_bits_and_hash_nothing(name, B):
    """Frozen, a step reads the packed weights (B = 1, 5: unfrozen in place, so the
    same numbers to rounding); bitwise the general path's frozen step."""
    c = CELLS[name](512, 512).eval()
    x = np.random.default_rng(3).standard_normal((B, 512)).astype(np.float32)
    want = c(x)
    before = _recurrent._digested_bytes()
    c(x)
    plain = _recurrent._digested_bytes() - before
    c.freeze()
    before = _recurrent._digested_bytes()
    got = c(x)
    assert _recurrent._digested_bytes() == before
    for g, w, r in zip(flat(got), flat(want), flat(general(c, x))):
        np.testing.assert_array_equal(g, r)
        if B == 64:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, **ROUNDING[np.float32])
    assert (plain > 0) == any(F.pack_flags(1, B)), plain   # as above


@pytest.mark.parametrize("name", sorted(MODULES))
def test_new_weights_after_freezing_are_seen(name):
    """A plan's digests belong to its arrays: another array (other values, frozen or
    not) at the same parameter must not find the old packing."""
    I, H = 256, 256
    m = MODULES[name](I, H).eval().freeze()
    ref = copy.deepcopy(m)            # writeable copies, for the expected results
    x = seq(50, 2, I, np.float32)
    m(x)
    w = np.random.default_rng(5).uniform(-0.1, 0.1, m.weight_hh_l0.shape).astype(np.float32)
    m.weight_hh_l0.data = frozen_copy(w)
    ref.weight_hh_l0.data[...] = w
    np.testing.assert_array_equal(m(x)[0], ref(x)[0])
    m.weight_hh_l0.data = fastrnn.modules.module.aligned_copy(w * 2)
    ref.weight_hh_l0.data[...] = w * 2
    np.testing.assert_array_equal(m(x)[0], ref(x)[0])
    assert not m.is_frozen()


def test_unfreeze_gives_writeable_copies_whose_edits_are_seen():
    m = fastrnn.LSTM(256, 256).eval()
    x = seq(50, 2, 256, np.float32)
    m.freeze()
    y_frozen = m(x)[0]
    assert m.unfreeze() is m and not m.is_frozen()
    assert all(p.data.flags.writeable for p in m.parameters())
    np.testing.assert_array_equal(m(x)[0], y_frozen)
    m.weight_hh_l0.data[3, 4] += 0.5
    assert not np.array_equal(m(x)[0], y_frozen)


def test_writes_to_frozen_parameters_fail_before_anything_is_written():
    a = fastrnn.GRU(8, 6)
    b = fastrnn.GRU(8, 6).freeze()
    params = a.parameters() + b.parameters()
    for p in params:
        p.grad[...] = 1.0
    before = [p.data.copy() for p in params]
    n = len(a.parameters())
    for opt in (fastrnn.optim.SGD(params, lr=0.1), fastrnn.optim.Adam(params, lr=0.1)):
        with pytest.raises(ValueError, match=rf"params\[{n}\].*freeze\(\).*unfreeze"):
            opt.step()
        for p, d in zip(params, before):
            np.testing.assert_array_equal(p.data, d)
    sd = {k: v + 1 for k, v in a.state_dict().items()}
    with pytest.raises(ValueError, match="'weight_ih_l0'.*frozen"):
        b.load_state_dict(sd)
    for p, d in zip(params, before):
        np.testing.assert_array_equal(p.data, d)
    with pytest.raises(ValueError, match="read-only"):
        b.weight_ih_l0.data[...] = 0
    b.unfreeze()
    b.load_state_dict(sd)
    np.testing.assert_array_equal(b.weight_ih_l0.data, sd["weight_ih_l0"])


def test_freeze_keeps_shared_arrays_shared_and_copies_are_writeable():
    m = fastrnn.LSTM(6, 5)
    m.weight_hh_l0 = fastrnn.Parameter(m.weight_ih_l0.data[:20, :5].copy())
    other = fastrnn.Parameter(m.weight_hh_l0.data)        # the same array, another Parameter
    m.extra = other
    m.freeze()
    assert m.weight_hh_l0.data is m.extra.data and is_frozen(m.extra.data)
    c = copy.deepcopy(m)
    assert not c.is_frozen() and all(p.data.flags.writeable for p in c.parameters())
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), c.named_parameters()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.data, p2.data)


def test_training_a_frozen_module_gives_the_same_gradients():
    m = fastrnn.LSTM(16, 12)
    f = copy.deepcopy(m).freeze()
    x = seq(9, 4, 16, np.float32)
    dy = seq(9, 4, 12, np.float32, seed=7)
    for mod in (m, f):
        mod.train()
        mod(x)
        mod.backward(dy)
    for p, q in zip(m.parameters(), f.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


def test_kernel_only_runs_on_frozen_weights():
    """(kernel_only serves calls small enough for one thread, which read the weights
    in place: nothing to hash either way.)"""
    m = fastrnn.LSTM(64, 48).eval().freeze()
    x = seq(1, 1, 64, np.float32)
    run = _fastpath.kernel_only(m, x)
    before = _recurrent._digested_bytes()
    run()
    assert _recurrent._digested_bytes() == before
    assert m.__dict__["_fp_plan"].digests[0] is not None


@pytest.mark.parametrize("target", ["view", "owner"])
def test_memory_swapped_in_place_under_a_frozen_array_is_seen(target):
    """NumPy's __setstate__ gives an array other memory (and values) in place, same
    object and shape: the plan and the digest memo must notice, not reuse the
    digest of the old values."""
    m = fastrnn.GRU(256, 256).eval().freeze()
    x = seq(50, 2, 256, np.float32)
    m(x)
    ref = copy.deepcopy(m)
    w = m.weight_hh_l0.data
    new = np.random.default_rng(9).uniform(-0.1, 0.1, w.shape).astype(np.float32)
    ref.weight_hh_l0.data[...] = new
    if target == "view":
        w.__setstate__((1, w.shape, w.dtype, False, new.tobytes()))
        arrays = [w]
    else:   # the array owning the memory, under the parameter's view
        owner = w
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        keep = new.view(np.uint8).reshape(-1).copy()
        owner.__setstate__((1, owner.shape, owner.dtype, False, keep.tobytes()))
        arrays = [owner]
        if not np.array_equal(w, new):
            pytest.skip("this NumPy leaves the view on the old memory")
    assert m.weight_hh_l0.data is arrays[0] or target == "owner"
    np.testing.assert_array_equal(m(x)[0], ref(x)[0])
    np.testing.assert_array_equal(m(x, lengths=[50, 20])[0], ref(x, lengths=[50, 20])[0])


def test_two_frozen_modules_of_one_shape_called_in_turn():
    a = fastrnn.LSTM(256, 256, seed=1).eval()
    b = fastrnn.LSTM(256, 256, seed=2).eval()
    x = seq(50, 2, 256, np.float32)
    want = (a(x)[0], b(x)[0])
    a.freeze(), b.freeze()
    for _ in range(3):
        np.testing.assert_array_equal(a(x)[0], want[0])
        np.testing.assert_array_equal(b(x)[0], want[1])


def test_frozen_weights_under_bf16_matmul_precision():
    m = fastrnn.LSTM(256, 256).eval()
    x = seq(50, 4, 256, np.float32)
    old = fastrnn.get_float32_matmul_precision()
    fastrnn.set_float32_matmul_precision("medium")
    try:
        want = m(x)[0]
        m.freeze()
        before = _recurrent._digested_bytes()
        got = m(x)[0]
        hashed = _recurrent._digested_bytes() - before
    finally:
        fastrnn.set_float32_matmul_precision(old)
    np.testing.assert_array_equal(got, want)
    assert hashed == 0


def test_reset_parameters_of_a_frozen_module_names_the_parameter():
    m = fastrnn.RNN(4, 3).freeze()
    with pytest.raises(ValueError, match="reset_parameters.*'weight_ih_l0'.*unfreeze"):
        m.reset_parameters()
    c = fastrnn.GRUCell(4, 3).freeze()
    with pytest.raises(ValueError, match="reset_parameters.*'weight_ih'"):
        c.reset_parameters()


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("how", ["time_major", "lengths", "batch_first"])
def test_general_path_calls_of_frozen_weights_hash_nothing(name, how, fast_path_off):
    """Calls on the general path (fastrnn.functional, through fastrnn._frozen) of a
    bidirectional layer."""
    I, H, T, B = 256, 256, 30, 3
    m = MODULES[name](I, H, bidirectional=True, batch_first=how == "batch_first").eval()
    x = seq(T, B, I, np.float32)
    kw = {}
    if how == "batch_first":
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    if how != "time_major":
        kw["lengths"] = [T, T - 7, 1]
    want = m(x, **kw)[0]
    before = _recurrent._digested_bytes()
    m(x, **kw)
    assert _recurrent._digested_bytes() > before      # unfrozen: the call hashes
    m.freeze()
    for _ in range(2):
        before = _recurrent._digested_bytes()
        np.testing.assert_array_equal(m(x, **kw)[0], want)
        assert _recurrent._digested_bytes() == before
    m.weight_hh_l0.data = frozen_copy(m.weight_hh_l0.data * 0.5)   # new values: seen
    m.weight_ih_l0_reverse.data = frozen_copy(m.weight_ih_l0_reverse.data * 0.5)
    ref = copy.deepcopy(m)
    got = m(x, **kw)[0]
    assert not np.array_equal(got, want)
    np.testing.assert_array_equal(got, ref(x, **kw)[0])


def test_frozen_digests_are_the_kernels_and_live_with_the_array():
    from fastrnn import _frozen
    w = frozen_copy(np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32))
    v = frozen_copy(np.ones((48, 12), np.float32))
    d = _frozen.frozen_digests(w, v)
    assert d == (_recurrent._digest(np.frombuffer(w.tobytes(), np.uint8)),
                 _recurrent._digest(np.frombuffer(v.tobytes(), np.uint8)))
    assert _frozen.frozen_digests(w[:10], v[:10])[0] != d[0]      # a part: its own digest
    assert _frozen.frozen_digests(w.copy(), v) is None             # writeable: none
    keys = {id(_frozen._owner(w)), id(_frozen._owner(v))}
    assert keys <= set(_frozen._memo)
    del w, v
    assert not keys & set(_frozen._memo)        # gone with their arrays
