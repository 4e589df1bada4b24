"""A layer's input given as a table and ids (x_ids): the kernels against the reference,
fused (the driver reads rows of x W_ih^T) and gathered alike; the reference's table
gradient against finite differences; modules and the language model."""

import numpy as np
import pytest

import fastrnn
from fastrnn import functional as F
from fastrnn import reference as R
from fastrnn.lm import RNNLanguageModel
from test_kernels import (CELLS, TOL, assert_same_bits_for_thread_counts, make_case, rel_err,
                          run)


def with_ids(case, V, seed):
    """The case with x replaced by a (V, I) table and x_ids (T, B) into it."""
    T, B, I = case["x"].shape
    rng = np.random.default_rng(seed)
    case = dict(case)
    case["x"] = (rng.standard_normal((V, I)) * 0.8).astype(case["x"].dtype)
    case["x_ids"] = rng.integers(0, V, (T, B))
    return case


def gathered(case):
    """The same call with x = table[x_ids] and no ids."""
    case = dict(case)
    case["x"] = case["x"][case.pop("x_ids")]
    return case


def table_gradient(dx_rows, case):
    V, I = case["x"].shape
    out = np.zeros((V, I), dx_rows.dtype)
    np.add.at(out, case["x_ids"], dx_rows)
    return out


# (T, B, I, H, V): V <= T*B takes the fused table, V > T*B the gather
SHAPES = [(1, 1, 3, 5, 1), (4, 1, 6, 3, 2), (5, 3, 4, 7, 9), (3, 7, 9, 17, 30),
          (6, 13, 10, 33, 11), (2, 3, 5, 8, 40)]


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%dV%d" % s)
@pytest.mark.parametrize("variant", ["plain", "lengths_reverse", "no_bias_no_state"])
def test_ids_input_matches_the_reference_and_the_gathered_call(cell, dtype, shape, variant):
    T, B, I, H, V = shape
    case = make_case(cell, dtype, (T, B, I, H), variant != "no_bias_no_state",
                     variant == "lengths_reverse", variant != "no_bias_no_state", seed=7)
    case = with_ids(case, V, seed=8)
    reverse = variant == "lengths_reverse"
    outs, grads = run(F, cell, case, reverse, dy_seed=9)
    ref_outs, ref_grads = run(R, cell, case, reverse, dy_seed=9)
    assert grads[0].shape == (V, I)                        # the table's gradient
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == dtype and a.shape == b.shape
            assert rel_err(a, b) <= TOL[dtype]
    # the same numbers as the call on x[x_ids] (its dx summed by id)
    g_outs, g_grads = run(F, cell, gathered(case), reverse, dy_seed=9)
    g_grads[0] = table_gradient(g_grads[0], case)
    for a, b in zip(outs + grads, g_outs + g_grads):
        if a is not None:
            assert rel_err(a, b) <= TOL[dtype]


def test_reference_table_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    T, B, I, H, V = 4, 3, 2, 3, 5
    x = rng.standard_normal((V, I))
    ids = rng.integers(0, V, (T, B))
    w = [rng.standard_normal(s) * 0.5 for s in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,))]
    dy = rng.standard_normal((T, B, H))

    def loss(table):
        y, _, _, _ = R.lstm_forward(table, None, None, *w, training=False, x_ids=ids)
        return np.sum(y * dy)

    y, h, c, cache = R.lstm_forward(x, None, None, *w, x_ids=ids)
    dx = R.lstm_backward(dy, None, None, cache)[0]
    eps = 1e-6
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (loss(up) - loss(down)) / (2 * eps)
    assert np.abs(dx - numeric).max() <= 1e-6 * np.abs(numeric).max()


@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_rb", "rnn_tanh"])
@pytest.mark.parametrize("split", ["rows", "units", "gathered"])
def test_ids_input_bitwise_the_same_for_any_thread_count(cell, split):
    """G*H not a multiple of the scatter's column blocks (one per thread, ragged), a
    table big enough for the table products to take threads; "gathered": V > T*B."""
    T, B = (20, 2) if split == "units" else (6, 30)    # small batches split hidden units
    V = T * B + 5 if split == "gathered" else 37
    case = with_ids(make_case(cell, np.float32, (T, B, 96, 300), True, True, True, seed=1),
                    V=V, seed=2)
    assert_same_bits_for_thread_counts(cell, case, False, 4, (1, 2, 3))


def test_ids_input_accumulates_into_out_like_the_other_gradients():
    case = with_ids(make_case("lstm", np.float64, (5, 4, 3, 6), True, False, True, seed=5),
                    V=7, seed=6)
    c = case
    y, h, cc, cache = F.lstm_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"], c["b_ih"],
                                     c["b_hh"], x_ids=c["x_ids"])
    dy = np.ones_like(y)
    fresh = F.lstm_backward(dy, None, None, cache)
    y, h, cc, cache = F.lstm_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"], c["b_ih"],
                                     c["b_hh"], x_ids=c["x_ids"])
    out = (np.full_like(c["w_ih"], 2.0), np.full_like(c["w_hh"], 3.0))
    acc = F.lstm_backward(dy, None, None, cache, out=out, accumulate=True)
    assert acc[3] is out[0] and acc[4] is out[1]
    np.testing.assert_allclose(out[0], fresh[3] + 2.0, rtol=1e-12)
    np.testing.assert_allclose(out[1], fresh[4] + 3.0, rtol=1e-12)
    np.testing.assert_allclose(acc[0], fresh[0], rtol=1e-12)


@pytest.mark.parametrize("x_ids, error, match", [
    (np.zeros((3, 2), np.float32), TypeError, "x_ids must be integers"),
    (np.zeros(6, np.int64), ValueError, r"x_ids must have shape \(T, B\)"),
    (np.zeros((0, 2), np.int64), ValueError, r"x_ids must have shape \(T, B\)"),
    (np.full((3, 2), 5), ValueError, r"x_ids must lie in \[0, 5\).*got 5"),
    (np.full((3, 2), -1), ValueError, r"x_ids must lie in \[0, 5\).*got -1"),
])
def test_bad_ids_are_named(x_ids, error, match):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5, 4)).astype(np.float32)
    w_ih = rng.standard_normal((9, 4)).astype(np.float32)     # GRU, H = 3
    w_hh = rng.standard_normal((9, 3)).astype(np.float32)
    with pytest.raises(error, match=match):
        F.gru_forward(table, None, w_ih, w_hh, None, None, x_ids=x_ids)
    with pytest.raises(ValueError, match=r"x must have shape \(V, 4\)"):
        F.gru_forward(table[:, :3], None, w_ih, w_hh, None, None, x_ids=np.zeros((3, 2), int))


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layout", ["plain", "batch_first_bidirectional_2_layers"])
def test_module_with_ids_is_the_module_on_gathered_rows(mode, layout):
    plain = layout == "plain"
    kw = dict(num_layers=1 if plain else 2, bidirectional=not plain, batch_first=not plain,
              dtype=np.float64, seed=3)
    a = getattr(fastrnn, mode)(6, 10, **kw)
    b = getattr(fastrnn, mode)(6, 10, **kw)
    rng = np.random.default_rng(1)
    table = rng.standard_normal((9, 6))
    ids = rng.integers(0, 9, (7, 5))                       # (B, T) when batch_first
    out_a, _ = a(table, x_ids=ids)
    out_b, _ = b(table[ids])
    np.testing.assert_allclose(out_a, out_b, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out_a.shape)
    da, _ = a.backward(dout)
    dx, _ = b.backward(dout)
    assert da.shape == table.shape
    np.testing.assert_allclose(da, table_gradient(dx, dict(x=table, x_ids=ids)),
                               rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12, err_msg=name)


def test_module_with_ids_errors():
    lstm = fastrnn.LSTM(4, 8, proj_size=3)
    with pytest.raises(ValueError, match="x_ids: not with proj_size"):
        lstm(np.zeros((5, 4), np.float32), x_ids=np.zeros((2, 3), int))
    gru = fastrnn.GRU(4, 8)
    with pytest.raises(ValueError, match=r"x: with x_ids, expected a table \(V, I = "):
        gru(np.zeros((2, 3, 4), np.float32), x_ids=np.zeros((2, 3), int))


@pytest.mark.parametrize("cell, weight_drop", [("lstm", 0.0), ("gru", 0.0), ("gru_rb", 0.0),
                                               ("rnn_tanh", 0.0), ("lstm", 0.3)])
def test_language_model_reads_its_embeddings_by_id_and_trains_the_same(cell, weight_drop):
    """Training without embedding dropout takes the by-id path; its loss, gradients
    and state match the model's gathered path (dropout 0 either way) in float64."""
    V, T, B = 13, 9, 4
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (T, B))
    kw = dict(cell="gru", reset_after=False) if cell == "gru_rb" else dict(cell=cell)
    models = [RNNLanguageModel(V, 5, 7, num_layers=2, dtype=np.float64, seed=1,
                               weight_drop=weight_drop, **kw) for _ in range(2)]
    models[1]._embeddings_by_id = lambda T, B: False        # the gathered path
    results = []
    for m in models:
        m.train()
        logits, state = m(x)
        dstate0 = m.backward(np.cos(logits))
        results.append((logits, state, dstate0, [p.grad.copy() for p in m.parameters()]))
    assert models[0]._by_id and not models[1]._by_id
    (la, sa, da, ga), (lb, sb, db, gb) = results
    np.testing.assert_allclose(la, lb, rtol=1e-12)
    flat = lambda s: list(s) if isinstance(s, tuple) else [s]      # noqa: E731
    for u, v in zip(flat(sa) + flat(da), flat(sb) + flat(db)):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-13)
    for u, v in zip(ga, gb):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-13)
    models[0].eval()
    models[0](x)
    assert not models[0]._by_id                              # eval keeps the gathered path
    models[0].train()
    models[0](x[:1, :2])                                     # V = 13 > T*B = 2 rows
    assert not models[0]._by_id


@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_rb", "rnn_tanh"])
def test_out_may_not_overlap_the_table(cell):
    """`out` is checked against the whole table x (and its x W_ih^T), not only the view
    standing for x[x_ids]: a training call's out overlapping the table's other rows
    would change x before backward's products read it."""
    T, B, I, H, V = 3, 4, 5, 6, 9
    case = with_ids(make_case(cell, np.float64, (T, B, I, H), True, False, True, seed=3),
                    V=V, seed=4)
    big = np.zeros((V * I + T * B * H,))
    table = big[:V * I].reshape(V, I)
    table[...] = case["x"]
    out = big[V * I - 2 * H:][:T * B * H].reshape(T, B, H)   # its first row: the table's end
    kw = dict(x_ids=case["x_ids"], out=out)
    args = (table, case["h0"]) + ((case["c0"],) if cell == "lstm" else ()) + (
        case["w_ih"], case["w_hh"], case["b_ih"], case["b_hh"])
    with pytest.raises(ValueError, match="out must not share memory"):
        if cell == "lstm":
            F.lstm_forward(*args, **kw)
        elif cell.startswith("gru"):
            F.gru_forward(*args, reset_after=cell == "gru", **kw)
        else:
            F.rnn_forward(*args, "tanh", **kw)
    assert np.array_equal(table, case["x"])          # nothing was written


@pytest.mark.parametrize("N", [1, 17, 1000])
def test_scatter_rows_adds_in_row_order_for_any_thread_count(N):
    """np.add.at adds rows in index order, one after the other: the same float sums
    in the same order, so the same bits, whatever the column blocks."""
    from fastrnn import _recurrent
    rng = np.random.default_rng(N)
    src = rng.standard_normal((37, N)).astype(np.float32)
    ids = rng.integers(0, 5, 37).astype(np.intp)
    want = np.zeros((6, N), np.float32)   # row 5 gets nothing: zeros
    np.add.at(want, ids, src)
    for threads in (1, 2, 3):
        out = np.full((6, N), np.nan, np.float32)
        _recurrent.scatter_rows(out, src, ids, threads)
        np.testing.assert_array_equal(out, want)


def test_scatter_rows_checks_its_ids_and_shapes():
    from fastrnn import _recurrent
    out = np.empty((3, 4))
    src = np.ones((5, 4))
    _recurrent.scatter_rows(out, src, np.array([0, 2, 2, 0, 2], np.intp), 2)
    np.testing.assert_array_equal(out, [[2] * 4, [0] * 4, [3] * 4])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\), got 3"):
        _recurrent.scatter_rows(out, src, np.array([0, 1, 3, 0, 0], np.intp), 2)
    with pytest.raises(ValueError, match="do not match"):
        _recurrent.scatter_rows(out, src, np.zeros(4, np.intp), 2)
