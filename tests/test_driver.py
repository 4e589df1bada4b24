"""The recurrence driver (src/_recurrent.pyx) under the splits it chooses by itself.

test_kernels.py forces each split on every cell; here the schedule is left to
fastrnn.functional, as users get it, for the small-batch cases where the
hidden-unit split now reads the weights in place (batch 1-3, any T, no packed
copy) and backward's reverse loop splits units too: a single step and short
chunks on two threads must give bitwise the one-thread numbers and match the
reference, at inference and in training.
"""

import time

import numpy as np
import pytest

import fastrnn
from fastrnn import _recurrent
from fastrnn import functional as F
from fastrnn import reference as R
from fastrnn._buffers import frozen_copy

from test_kernels import CELLS, TOL, make_case, rel_err, run


class SplitSpy:
    """Stands in for fastrnn._recurrent and records the split of each forward call."""

    def __init__(self, real):
        self.real = real
        self.by_units = []
        self.threads = []
        self.backward_by_units = []
        self.retry = False

    def forward(self, *args, **kwargs):
        # An eval call whose pool workers are asleep returns False and is run again on
        # one thread (src/team_pool.h): only the split first asked for is recorded.
        if not self.retry:
            self.by_units.append(args[-1])
            self.threads.append(args[-2])
        ok = self.real.forward(*args, **kwargs)
        self.retry = not ok
        return ok

    def backward(self, *args, **kwargs):
        self.backward_by_units.append(args[-1])
        return self.real.backward(*args, **kwargs)

    def __getattr__(self, name):   # everything else is the real module's
        return getattr(self.real, name)


def forward_only(cell, case):
    c = case
    if cell == "lstm":
        return F.lstm_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"], c["b_ih"],
                              c["b_hh"], lengths=c["lengths"], training=False)[:3]
    if cell.startswith("gru"):
        return F.gru_forward(c["x"], c["h0"], c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"],
                             lengths=c["lengths"], training=False,
                             reset_after=cell == "gru")[:2]
    return F.rnn_forward(c["x"], c["h0"], c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"],
                         cell[4:], lengths=c["lengths"], training=False)[:2]


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 7, 40), (3, 2, 5, 37), (20, 3, 9, 33)])
def test_small_batch_unit_split_in_place(cell, dtype, shape, monkeypatch):
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)   # two threads even for these sizes
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "RESET_BEFORE_TEAM_STEP_FLOP", 0)
    monkeypatch.setattr(F, "RESET_BEFORE_TEAM_SINGLE_STEP_FLOP", 0)
    spy = SplitSpy(F._recurrent)
    monkeypatch.setattr(F, "_recurrent", spy)
    case = make_case(cell, dtype, shape, True, shape[1] > 1, True, 11)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(1)
        one_inf = forward_only(cell, case)
        one = run(F, cell, case, False, 3)
        fastrnn.set_num_threads(2)
        spy.by_units.clear()
        spy.backward_by_units.clear()
        two_inf = forward_only(cell, case)
        two = run(F, cell, case, False, 3)
        assert spy.by_units == [True, True], "batch <= 3 should split hidden units"
        assert spy.backward_by_units == [True], "so should backward's reverse loop"
    finally:
        fastrnn.set_num_threads(before)
    for a, b in zip(list(one_inf) + one[0] + one[1], list(two_inf) + two[0] + two[1]):
        if a is not None:
            assert np.array_equal(a, b)
    ref = run(R, cell, case, False, 3)
    for got, want in zip(two[0] + two[1], ref[0] + ref[1]):
        if want is not None:
            assert rel_err(got, want) <= TOL[dtype]
    for got, want in zip(two_inf, ref[0]):
        assert rel_err(got, want) <= TOL[dtype]


def test_backward_splits_units_when_w_hh_overflows_the_l2(monkeypatch):
    """The rule itself (F.backward_splits_units): small batches always; up to
    BACKWARD_UNITS_L2_MAX_BATCH only when W_hh overflows the L2 and the sequence
    has UNITS_MIN_STEPS steps; rows past that batch whatever W_hh's size."""
    monkeypatch.setattr(F._cpu_cache, "l2_bytes", lambda: 2 << 20)
    big, small = 4 << 20, 1 << 20
    steps = F.UNITS_MIN_STEPS
    assert F.backward_splits_units(1, F.BACKWARD_UNITS_MAX_BATCH, small)
    assert not F.backward_splits_units(steps, F.BACKWARD_UNITS_MAX_BATCH + 1, small)
    assert F.backward_splits_units(steps, F.BACKWARD_UNITS_MAX_BATCH + 1, big)
    assert F.backward_splits_units(steps, F.BACKWARD_UNITS_L2_MAX_BATCH, big)
    assert not F.backward_splits_units(steps, F.BACKWARD_UNITS_L2_MAX_BATCH + 1, big)
    assert not F.backward_splits_units(steps - 1, F.BACKWARD_UNITS_MAX_BATCH + 1, big)
    monkeypatch.setattr(F._cpu_cache, "l2_bytes", lambda: 0)   # L2 unknown: rows
    assert not F.backward_splits_units(steps, F.BACKWARD_UNITS_MAX_BATCH + 1, big)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_unit_split_past_small_batches_equals_one_thread(cell, dtype, monkeypatch):
    """A batch past BACKWARD_UNITS_MAX_BATCH whose W_hh overflows the L2 (here an L2
    made small) splits backward's hidden units: bitwise the one-thread numbers, the
    reference's within tolerance; the same batch under the real L2 splits rows."""
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "RESET_BEFORE_TEAM_STEP_FLOP", 0)
    monkeypatch.setattr(F, "RESET_BEFORE_TEAM_SINGLE_STEP_FLOP", 0)
    spy = SplitSpy(F._recurrent)
    monkeypatch.setattr(F, "_recurrent", spy)
    B = F.BACKWARD_UNITS_MAX_BATCH + 5
    assert B <= F.BACKWARD_UNITS_L2_MAX_BATCH
    case = make_case(cell, dtype, (F.UNITS_MIN_STEPS + 1, B, 9, 37), True, True, True, 5)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(1)
        one = run(F, cell, case, False, 3)
        fastrnn.set_num_threads(2)
        spy.backward_by_units.clear()
        rows = run(F, cell, case, False, 3)
        monkeypatch.setattr(F._cpu_cache, "l2_bytes", lambda: 1024)   # every W_hh overflows
        units = run(F, cell, case, False, 3)
        assert spy.backward_by_units == [False, True]
    finally:
        fastrnn.set_num_threads(before)
    for a, b, c in zip(one[0] + one[1], rows[0] + rows[1], units[0] + units[1]):
        if a is not None:
            assert np.array_equal(a, b) and np.array_equal(a, c)
    ref = run(R, cell, case, False, 3)
    for got, want in zip(units[0] + units[1], ref[0] + ref[1]):
        if want is not None:
            assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch", [1, 9])
def test_bidirectional_directions_at_once_equal_one_after_the_other(mode, batch, monkeypatch):
    """The two directions of a layer, run at once on a share of the threads each,
    give bitwise the numbers of running them in turn: outputs, states, dx, every grad."""
    import fastrnn.modules.rnn as rnn_module
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, batch, 10)).astype(np.float32)
    dy = rng.standard_normal((12, batch, 2 * 16)).astype(np.float32)
    results = []
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        for at_once in (False, True):
            monkeypatch.setattr(rnn_module, "_at_once", lambda *args, v=at_once: v)
            m = getattr(fastrnn, mode)(10, 16, num_layers=2, bidirectional=True, seed=1)
            out, state = m(x)
            dx, dstate = m.backward(dy)
            grads = [p.grad.copy() for p in m.parameters()]
            m.eval()
            out_eval, _ = m(x)
            flat = lambda s: list(s) if isinstance(s, tuple) else [s]   # noqa: E731
            results.append([out, dx, out_eval] + flat(state) + flat(dstate) + grads)
    finally:
        fastrnn.set_num_threads(before)
    assert len(results[0]) == len(results[1]) == 3 + (4 if mode == "LSTM" else 2) \
        + len(list(m.parameters()))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_error_in_the_reverse_direction_reaches_the_caller(monkeypatch):
    import fastrnn.modules.rnn as rnn_module
    monkeypatch.setattr(rnn_module, "_at_once", lambda *args: True)
    m = fastrnn.GRU(4, 8, bidirectional=True, seed=0)
    real = m._forward_direction

    def failing(x, h0, c0, w, lengths, reverse, keep, out=None):
        if reverse:
            raise MemoryError("reverse direction failed")
        return real(x, h0, c0, w, lengths, reverse, keep, out)

    monkeypatch.setattr(m, "_forward_direction", failing)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        with pytest.raises(MemoryError, match="reverse direction failed"):
            m(np.zeros((3, 2, 4), np.float32))
    finally:
        fastrnn.set_num_threads(before)


# (training, T, B, at once?) for an LSTM with H = 128: 131 kFLOP of h W_hh^T per
# row and step, so B = 8 is 1.05 MFLOP a step and T = 50 steps 52 MFLOP.
DIRECTION_CASES = [
    (True, 50, 8, True),      # training, >= 1 MFLOP a step, >= 50 MFLOP in all
    (True, 50, 4, False),     # 0.5 MFLOP a step
    (True, 20, 8, False),     # 21 MFLOP in all: a Python thread costs more than it saves
    (False, 50, 8, False),    # inference: one after the other
    (False, 50, 32, False),
]


@pytest.mark.parametrize("training, T, B, at_once", DIRECTION_CASES)
def test_when_the_directions_run_at_once_by_default(training, T, B, at_once, monkeypatch):
    """The default rule (modules/rnn.py, _at_once): the reverse direction runs in
    a helper thread (_placement.Beside), in forward and in backward, exactly in these cases."""
    import threading
    from fastrnn import _fastpath
    # (inference on the general path: the eval fast path runs the directions in turn
    # by construction)
    for entry in ("eval_call", "layer_forward"):
        monkeypatch.setattr(_fastpath, entry, lambda *args, **kwargs: None)
    m = fastrnn.LSTM(8, 128, bidirectional=True, seed=0)
    m.train(training)
    seen = {"forward": [], "backward": []}
    real_forward, real_backward = m._forward_direction, m._backward_direction

    def forward_spy(x, h0, c0, w, lengths, reverse, keep, out=None):
        seen["forward"].append((reverse, threading.current_thread().name))
        return real_forward(x, h0, c0, w, lengths, reverse, keep, out)

    def backward_spy(dy, dh_n, dc_n, cache, out=None, accumulate=False):
        seen["backward"].append((cache.reverse, threading.current_thread().name))
        return real_backward(dy, dh_n, dc_n, cache, out, accumulate)

    monkeypatch.setattr(m, "_forward_direction", forward_spy)
    monkeypatch.setattr(m, "_backward_direction", backward_spy)
    main = threading.current_thread().name
    expected = [(False, main), (True, "fastrnn-helper" if at_once else main)]
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        m(np.ones((T, B, 8), np.float32))
        assert sorted(seen["forward"]) == expected
        if training:
            m.backward(np.ones((T, B, 256), np.float32))
            assert sorted(seen["backward"]) == expected
    finally:
        fastrnn.set_num_threads(before)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_buffers_reused_between_calls_give_the_same_numbers(cell):
    """Packed weights live in buffers kept between calls (src/scratch.h): a call
    that gets a buffer a larger call left behind, stale values and all, and a
    call after release_memory() give bitwise the numbers of the first call."""
    big = make_case(cell, np.float32, (9, 6, 21, 40), True, False, True, 5)
    small = make_case(cell, np.float32, (7, 5, 3, 11), True, False, True, 6)
    first_small = run(F, cell, small, False, 3)
    first_big = run(F, cell, big, False, 3)
    again_small = run(F, cell, small, False, 3)     # reuses big's (larger) buffers
    fastrnn.release_memory()
    again_big = run(F, cell, big, False, 3)         # fresh buffers
    for first, again in ((first_small, again_small), (first_big, again_big)):
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            if a is not None:
                assert np.array_equal(a, b)
    ref = run(R, cell, small, False, 3)
    for got, want in zip(again_small[0] + again_small[1], ref[0] + ref[1]):
        if want is not None:
            assert rel_err(got, want) <= TOL[np.float32]


def test_small_batch_packs_w_hh_only_when_it_pays():
    assert F.pack_flags(50, 1) == (True, True)       # long enough to repay the copy
    assert F.pack_flags(10, 1) == (False, False)     # too short: read in place
    assert F.pack_flags(16, 2) == (True, True)       # T*B rows, not T, count
    assert F.pack_flags(2, 4) == (True, True)        # batch >= 4 packs W_hh ...
    assert F.pack_flags(1, 8) == (False, False)      # ... but a single step up to 8 rows not
    assert F.pack_flags(1, 9) == (True, True)
    # frozen weights at inference: kept packings, read packed by every call
    for T, B in [(10, 1), (3, 2), (1, 1), (1, 8), (50, 1)]:
        assert F.pack_flags(T, B, frozen_eval=True) == (True, True)


def test_frozen_short_sequences_split_units_at_small_batch():
    assert not F.splits_units(10, 3, True)                  # a per-call copy to repay
    assert F.splits_units(10, 3, True, frozen_eval=True)    # kept slices: nothing to repay
    assert F.splits_units(10, F.FROZEN_UNITS_MAX_BATCH, True, frozen_eval=True)
    assert not F.splits_units(10, F.FROZEN_UNITS_MAX_BATCH + 1, True, frozen_eval=True)
    assert F.frozen_eval(False, frozen_copy(np.ones((4, 2))), frozen_copy(np.ones((4, 1))))
    assert not F.frozen_eval(True, frozen_copy(np.ones((4, 2))), frozen_copy(np.ones((4, 1))))
    assert not F.frozen_eval(False, frozen_copy(np.ones((4, 2))), np.ones((4, 1)))
    big = frozen_copy(np.ones((8, F.FROZEN_PACK_MAX_BYTES // 64 - 1)))    # 64 bytes short
    assert F.frozen_eval(False, big, frozen_copy(np.ones((8, 1))))         # the bound
    assert not F.frozen_eval(False, big, frozen_copy(np.ones((8, 2))))     # past it


def test_team_only_where_each_step_repays_its_barrier():
    """A hidden-unit split waits at a barrier after every step: below
    UNITS_STEP_MIN_FLOP per step one thread is faster, whatever the call's total."""
    lstm_step = lambda I, H, B: 2 * B * 4 * H * (I + H)      # FLOP of one LSTM step
    # streaming audio: LSTM I=1 H=32, 64-sample chunks, batch 1 (8.4k FLOP a step)
    assert lstm_step(1, 32, 1) < F.UNITS_STEP_MIN_FLOP
    assert not F.use_team(64 * lstm_step(1, 32, 1), 64, 1, False)
    assert F.use_team(64 * lstm_step(1, 64, 1), 64, 1, False)          # 33k a step
    # the same small steps over a large batch split rows: no barrier per step
    assert not F.splits_units(64, 64, True)
    assert F.use_team(64 * lstm_step(1, 32, 64), 64, 64, True)
    # single steps: the call's total decides
    assert F.use_team(lstm_step(128, 128, 1), 1, 1, False)                # 262k
    assert not F.use_team(lstm_step(64, 64, 1), 1, 1, False)              # 66k


def test_rows_not_units_once_every_thread_has_four_and_w_hh_is_small(monkeypatch):
    monkeypatch.setattr(F._cpu_cache, "_l2", 0)        # the L2 size unknown
    small, large = 4 * 512 * 512, 4 * 1024 * 1024      # W_hh values: LSTM H=512, 1024
    assert F.rows_upto(8, small, 4) == 2 and F.rows_upto(7, small, 4) == 1
    assert F.rows_upto(64, small, 4) == 16 and F.rows_upto(8, large, 4) == 0
    assert F.rows_upto(8, small, 8) == 2                # float64: the same values


def test_bf16_inference_splits_units_up_to_a_larger_batch():
    assert F.splits_units(64, F.UNITS_MAX_BATCH, True)
    assert not F.splits_units(64, F.UNITS_MAX_BATCH + 1, True)
    assert F.splits_units(64, F.BF16_UNITS_MAX_BATCH, True, bf16_eval=True)
    assert not F.splits_units(64, F.BF16_UNITS_MAX_BATCH + 1, True, bf16_eval=True)
    assert not F.splits_units(F.UNITS_MIN_STEPS - 1, 8, True, bf16_eval=True)   # short: rows


def test_units_up_to_a_larger_batch_where_w_hh_overflows_l2(monkeypatch):
    """With rows, every thread streams all of W_hh each step; once it overflows a
    core's L2, each thread's slice does better up to UNITS_L2_MAX_BATCH rows."""
    monkeypatch.setattr(F._cpu_cache, "_l2", 2 << 20)
    lstm512, lstm256 = 4 * 512 * 512 * 4, 4 * 256 * 256 * 4      # bytes of float32 W_hh
    assert F.UNITS_MAX_BATCH < 32 <= F.UNITS_L2_MAX_BATCH
    assert F.splits_units(50, 32, True, hh_bytes=lstm512)
    assert F.splits_units(50, F.UNITS_L2_MAX_BATCH, True, hh_bytes=lstm512)
    assert not F.splits_units(50, F.UNITS_L2_MAX_BATCH + 1, True, hh_bytes=lstm512)
    assert not F.splits_units(50, 32, True, hh_bytes=lstm256)      # fits: rows
    assert not F.splits_units(50, 32, True)                        # size not given: rows
    assert not F.splits_units(F.UNITS_MIN_STEPS - 1, 32, True, hh_bytes=lstm512)  # short
    monkeypatch.setattr(F._cpu_cache, "_l2", 0)                    # L2 unknown: rows
    assert not F.splits_units(50, 32, True, hh_bytes=lstm512)


@pytest.mark.parametrize("l2,rows", [(1 << 20, 2), (2 << 20, 1), (4 << 20, 2)])
def test_units_where_their_slices_fit_l2_and_w_hh_does_not(l2, rows, monkeypatch):
    """LSTM H=512 float32 (4 MB of W_hh): with 1 MB of L2 (Zen 4) rows for 2
    threads; with 2 MB (a Xeon) two threads' 2 MB slices fit and units win; with
    4 MB all of W_hh fits and rows do again."""
    monkeypatch.setattr(F._cpu_cache, "_l2", l2)
    assert F.rows_upto(8, 4 * 512 * 512, 4) == rows
    assert F.rows_upto(64, 4 * 512 * 512, 4) == {1 << 20: 3, 2 << 20: 1, 4 << 20: 16}[l2]
    assert F.rows_upto(8, 3 * 512 * 512, 4) == (1 if l2 == 2 << 20 else 2)   # GRU, 3 MB
    assert F.rows_upto(8, 512 * 512, 4) == 2                                 # RNN, 1 MB


def test_gated_cells_at_inference_split_units_once_w_hh_fills_five_eighths_of_l2(monkeypatch):
    """fills_l2: rows until W_hh overflows the L2, except for an LSTM's or GRU's
    eval calls, which split units from 5/8 of it on, up to UNITS_L2_MAX_BATCH rows."""
    monkeypatch.setattr(F._cpu_cache, "_l2", 2 << 20)
    lstm320, lstm256 = 4 * 320 * 320, 4 * 256 * 256         # W_hh values: 1.56 MB, 1 MB
    assert F.fills_l2(lstm320 * 4, gated_eval=True) and not F.fills_l2(lstm320 * 4)
    assert not F.fills_l2(lstm256 * 4, gated_eval=True)
    assert not F.fills_l2(0, gated_eval=True)
    assert F.UNITS_MAX_BATCH < 32 <= F.UNITS_L2_MAX_BATCH
    assert F.splits_units(100, F.UNITS_L2_MAX_BATCH, True, hh_bytes=lstm320 * 4, gated_eval=True)
    assert not F.splits_units(100, F.UNITS_L2_MAX_BATCH + 1, True, hh_bytes=lstm320 * 4,
                              gated_eval=True)
    assert not F.splits_units(100, 32, True, hh_bytes=lstm320 * 4)      # training, or an RNN
    assert not F.splits_units(100, 32, True, hh_bytes=lstm256 * 4, gated_eval=True)
    assert F.rows_upto(8, lstm320, 4, gated=True) == 0 and F.rows_upto(8, lstm320, 4) == 2
    assert F.rows_upto(8, lstm256, 4, gated=True) == 2
    monkeypatch.setattr(F._cpu_cache, "_l2", 0)                         # L2 unknown: rows
    assert not F.fills_l2(lstm320 * 4, gated_eval=True)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_the_gated_eval_split_reaches_the_kernel(cell, monkeypatch):
    """A pretended 18 KB L2, 5/8 of which this W_hh fills (16 KB LSTM, 12 KB GRU; the
    RNN's 4 KB does not): B=32 eval calls of the LSTM and GRU split hidden units on
    the general path and the fast path, their training forward and the RNN rows;
    every split gives the numbers of one thread."""
    monkeypatch.setattr(F._cpu_cache, "_l2", 18 << 10)
    gated = cell != "RNN"
    spy = SplitSpy(F._recurrent)
    monkeypatch.setattr(F, "_recurrent", spy)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        m = getattr(fastrnn, cell)(16, 32, seed=0)
        x = np.random.default_rng(0).standard_normal((20, 32, 16)).astype(np.float32)
        y = m(x)[0]
        assert spy.threads == [2] and spy.by_units == [False]   # training: rows
        m.eval()
        sched = fastrnn._fastpath._plan(m, False).schedule(20, 32)
        assert sched[3] == gated and (sched[4] == 0) == gated
        w = {n: p.data for n, p in m.named_parameters()}
        if cell == "LSTM":
            y_eval = F.lstm_forward(x, None, None, w["weight_ih_l0"], w["weight_hh_l0"],
                                    w["bias_ih_l0"], w["bias_hh_l0"], training=False)[0]
        elif cell == "GRU":
            y_eval = F.gru_forward(x, None, w["weight_ih_l0"], w["weight_hh_l0"],
                                   w["bias_ih_l0"], w["bias_hh_l0"], training=False)[0]
        if gated:
            assert spy.threads[-1] == 2 and spy.by_units[-1]         # the general eval path
        got = m(x)[0]
        with F.thread_share(1):
            want = m(x)[0]
    finally:
        fastrnn.set_num_threads(before)
    assert np.array_equal(y, want) and np.array_equal(got, want)
    if gated:
        assert np.array_equal(y_eval, want)


@pytest.mark.parametrize("B,units,l2", [(6, True, None), (8, False, None), (32, True, 8 << 10)])
def test_the_split_rule_reaches_the_kernel(B, units, l2, monkeypatch):
    """rows_upto at inference (the general path with training=False, and the eval fast
    path's schedule), not in training; every split gives the numbers of one thread.
    l2: a pretended L2 size; 8 KB is below this W_hh's 16 KB, so a batch of 32
    splits units too (splits_units' hh_bytes), in training as well."""
    if l2 is not None:
        monkeypatch.setattr(F._cpu_cache, "_l2", l2)
    spy = SplitSpy(F._recurrent)
    monkeypatch.setattr(F, "_recurrent", spy)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        m = fastrnn.LSTM(16, 32, seed=0)
        x = np.random.default_rng(0).standard_normal((20, B, 16)).astype(np.float32)
        y, _ = m(x)
        assert spy.threads == [2] and spy.by_units == [True]    # training: units
        m.backward(np.ones_like(y))
        y_eval = F.lstm_forward(x, None, None, m.weight_ih_l0.data, m.weight_hh_l0.data,
                                m.bias_ih_l0.data, m.bias_hh_l0.data, training=False)[0]
        assert spy.threads[-1] == 2 and spy.by_units[-1] == units   # the general eval path
        m.eval()
        sched = fastrnn._fastpath._plan(m, False).schedule(20, B)
        assert sched[3] and (sched[4] < 2) == units         # units allowed; rows up to 2?
        key = "unit_teams" if units else "row_teams"
        end = time.monotonic() + 5      # until the pool's worker is awake and a team runs
        while True:
            s0 = _recurrent.pool_stats()
            got = m(x)[0]
            s1 = _recurrent.pool_stats()
            if s1["teams"] > s0["teams"]:
                break
            assert time.monotonic() < end, "no eval call ran on a team"
        assert s1[key] == s0[key] + 1                       # the fast path split as planned
        with F.thread_share(1):
            want = m(x)[0]
    finally:
        fastrnn.set_num_threads(before)
    assert np.array_equal(y, want) and np.array_equal(got, want)
    assert np.array_equal(y_eval, want)


@pytest.mark.parametrize("H,team", [(32, False), (64, True)])
def test_small_steps_run_on_one_thread(H, team, monkeypatch):
    """The rule above reaches the kernel, in training and through the eval fast path."""
    spy = SplitSpy(F._recurrent)
    monkeypatch.setattr(F, "_recurrent", spy)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        m = fastrnn.LSTM(1, H, seed=0)
        x = np.random.default_rng(0).standard_normal((64, 1, 1)).astype(np.float32)
        y, _ = m(x)                                     # training mode: general path
        assert spy.threads == [2 if team else 1]
        m.backward(np.ones_like(y))
        m.eval()
        plan = fastrnn._fastpath._plan(m, False)
        assert plan.schedule(64, 1)[2] == (team,)      # the fast path decides alike
        got = m(x)[0]
    finally:
        fastrnn.set_num_threads(before)
    want = R.lstm_forward(x, None, None, m.weight_ih_l0.data, m.weight_hh_l0.data,
                          m.bias_ih_l0.data, m.bias_hh_l0.data)[0]
    assert rel_err(got, want) <= TOL[np.float32]


@pytest.mark.parametrize("G,H,B,nslices", [(4, 513, 8, 2), (4, 520, 3, 2), (3, 1000, 1, 2),
                                           (1, 1025, 3, 2), (4, 385, 8, 2), (4, 20, 3, 3),
                                           (4, 512, 8, 2)])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_unit_split_threads_share_one_block_schedule(G, H, B, nslices, itemsize):
    """The unit split's threads meet at every step: they take their input-projection
    blocks at the same steps whatever the width of their slices (sized per slice, H=513
    split 264 + 249 units projected at different steps, and eval teams stalled: 2 threads
    ran at one thread's speed)."""
    from fastrnn import _recurrent
    steps = _recurrent._block_steps_of(G, H, B, 100, nslices, itemsize)
    assert len(steps) == nslices and len(set(steps)) == 1, steps
