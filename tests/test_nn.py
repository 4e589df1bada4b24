"""fastrnn.nn building blocks: gradients by finite differences, torch equivalence,
error messages, seeded dropout, containers."""

import numpy as np
import pytest

from fastrnn import nn
from fastrnn.modules.module import Module

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to array x (modified in place)."""
    g = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def check_module_grads(module, inputs, loss_of_output, rtol=1e-5, atol=1e-7):
    """Compare module.backward (input and parameter grads) with finite differences.

    loss_of_output(y) -> (scalar, dL/dy)."""
    module.zero_grad()
    y = module(inputs)
    _, dy = loss_of_output(y)
    dx = module.backward(dy)

    def f():
        return loss_of_output(module(inputs))[0]

    for name, p in module.named_parameters():
        num = numeric_grad(f, p.data)
        np.testing.assert_allclose(p.grad, num, rtol=rtol, atol=atol, err_msg=name)
    if dx is not None:
        num = numeric_grad(f, inputs)
        np.testing.assert_allclose(dx, num, rtol=rtol, atol=atol, err_msg="input")


def weighted_sum(w):
    return lambda y: (float((y * w).sum()), w.astype(y.dtype))


# -- Embedding -------------------------------------------------------------------------------
def test_embedding_gradient_finite_differences():
    rng = np.random.default_rng(0)
    emb = nn.Embedding(7, 3, dtype=np.float64, rng=1)
    ids = np.array([[1, 2, 1], [6, 0, 1]])               # repeated id 1 accumulates
    w = rng.standard_normal((2, 3, 3))
    emb.zero_grad()
    y = emb(ids)
    assert y.shape == (2, 3, 3)
    assert emb.backward(w) is None
    num = numeric_grad(lambda: float((emb(ids) * w).sum()), emb.weight.data)
    np.testing.assert_allclose(emb.weight.grad, num, rtol=1e-6, atol=1e-8)
    assert np.all(emb.weight.grad[[3, 4, 5]] == 0)       # unused rows get nothing


def test_embedding_out_of_range_names_the_id():
    emb = nn.Embedding(10, 4, rng=0)
    with pytest.raises(IndexError, match=r"\b12\b.*\[0, 10\)"):
        emb(np.array([[1, 12], [3, 4]]))
    with pytest.raises(IndexError, match=r"-1"):
        emb(np.array([0, -1]))
    with pytest.raises(TypeError):
        emb(np.array([0.5, 1.0]))


def test_embedding_padding_idx_and_accumulation():
    emb = nn.Embedding(5, 2, padding_idx=0, rng=0)
    assert np.all(emb.weight.data[0] == 0)
    emb(np.array([0, 0, 3]))
    emb.backward(np.ones((3, 2), np.float32))
    emb(np.array([3]))
    emb.backward(np.ones((1, 2), np.float32))
    assert np.all(emb.weight.grad[0] == 0)
    np.testing.assert_array_equal(emb.weight.grad[3], [2, 2])   # backward accumulates


@needs_torch
def test_embedding_matches_torch_init_distribution_and_lookup():
    emb = nn.Embedding(1000, 16, rng=0)
    assert abs(emb.weight.data.std() - 1.0) < 0.02             # N(0, 1) like torch
    t = torch.nn.Embedding(1000, 16)
    t.weight.data = torch.tensor(emb.weight.data)
    ids = np.array([[5, 999], [0, 5]])
    np.testing.assert_array_equal(emb(ids), t(torch.tensor(ids)).detach().numpy())


# -- Linear ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradient_finite_differences(bias):
    rng = np.random.default_rng(1)
    lin = nn.Linear(4, 3, bias=bias, dtype=np.float64, rng=2)
    x = rng.standard_normal((2, 5, 4))
    check_module_grads(lin, x, weighted_sum(rng.standard_normal((2, 5, 3))))


@needs_torch
def test_linear_matches_torch():
    rng = np.random.default_rng(3)
    lin = nn.Linear(6, 4, rng=0)
    t = torch.nn.Linear(6, 4)
    t.load_state_dict({k: torch.tensor(v) for k, v in lin.state_dict().items()})
    x = rng.standard_normal((3, 6)).astype(np.float32)
    dy = rng.standard_normal((3, 4)).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = t(tx)
    ty.backward(torch.tensor(dy))
    y = lin(x)
    dx = lin.backward(dy)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.weight.grad, t.weight.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.bias.grad, t.bias.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_linear_init_bound_and_shape_error():
    lin = nn.Linear(100, 50, rng=0)
    assert np.abs(lin.weight.data).max() <= 0.1 and np.abs(lin.bias.data).max() <= 0.1
    with pytest.raises(ValueError, match="last dim 100"):
        lin(np.zeros((2, 99), np.float32))


# -- Dropout -------------------------------------------------------------------------------------
def test_dropout_seeded_scaled_and_eval_identity():
    x = np.ones((200, 100), np.float32)
    a, b = nn.Dropout(0.3, rng=7), nn.Dropout(0.3, rng=7)
    ya, yb = a(x), b(x)
    np.testing.assert_array_equal(ya, yb)                     # same seed, same mask
    assert set(np.unique(ya)) <= {0.0, np.float32(1 / 0.7)}
    assert abs((ya == 0).mean() - 0.3) < 0.02
    assert abs(ya.mean() - 1.0) < 0.03                        # inverted scaling keeps the mean
    assert not np.array_equal(a(x), ya)                       # the stream moves on
    dy = np.arange(x.size, dtype=np.float32).reshape(x.shape)
    np.testing.assert_array_equal(a.backward(dy), dy * a._mask)
    a.eval()
    np.testing.assert_array_equal(a(x), x)
    np.testing.assert_array_equal(a.backward(dy), dy)
    assert np.all(nn.Dropout(1.0, rng=0)(x) == 0)
    with pytest.raises(ValueError):
        nn.Dropout(1.5)


def test_dropout_rng_state_roundtrip():
    d = nn.Dropout(0.5, rng=3)
    d(np.ones(10))
    state = d.get_rng_state()
    first = d(np.ones(50))
    d.set_rng_state(state)
    np.testing.assert_array_equal(d(np.ones(50)), first)


# -- Sequential ------------------------------------------------------------------------------
def test_sequential_gradients_names_and_state_dict():
    rng = np.random.default_rng(4)
    net = nn.Sequential(nn.Linear(3, 5, dtype=np.float64, rng=0),
                        nn.Dropout(0.0),
                        nn.Linear(5, 2, dtype=np.float64, rng=1))
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(net) == 3 and isinstance(net[2], nn.Linear)
    check_module_grads(net, rng.standard_normal((4, 3)), weighted_sum(rng.standard_normal((4, 2))))
    other = nn.Sequential(nn.Linear(3, 5, dtype=np.float64, rng=9), nn.Dropout(0.0),
                          nn.Linear(5, 2, dtype=np.float64, rng=8))
    other.load_state_dict(net.state_dict())
    x = rng.standard_normal((2, 3))
    np.testing.assert_array_equal(other(x), net(x))


def test_sequential_with_dropout_backward_uses_the_forward_mask():
    rng = np.random.default_rng(5)
    net = nn.Sequential(nn.Linear(4, 8, dtype=np.float64, rng=0), nn.Dropout(0.5, rng=1),
                        nn.Linear(8, 3, dtype=np.float64, rng=2))
    x = rng.standard_normal((6, 4))
    w = rng.standard_normal((6, 3))
    net.zero_grad()
    net(x)
    dx = net.backward(w)
    mask = net[1]._mask
    # with the mask frozen the network is linear in x: check dx against the frozen map
    W1, W2 = net[0].weight.data, net[2].weight.data
    expected = ((w @ W2) * mask) @ W1
    np.testing.assert_allclose(dx, expected, rtol=1e-12)


def test_sequential_named_and_modulelist():
    from collections import OrderedDict
    net = nn.Sequential(OrderedDict(enc=nn.Linear(2, 2, rng=0), dec=nn.Linear(2, 1, rng=1)))
    assert [n for n, _ in net.named_parameters()] == ["enc.weight", "enc.bias",
                                                     "dec.weight", "dec.bias"]
    ml = nn.ModuleList([nn.Linear(1, 1, rng=0), nn.Linear(1, 1, rng=1)])
    assert len(ml) == 2 and len(ml.parameters()) == 4
    with pytest.raises(TypeError):
        ml.append(3)
    assert isinstance(net, Module)


# -- losses ----------------------------------------------------------------------------------
def test_cross_entropy_gradient_finite_differences_with_ignore_index():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((3, 4, 5))
    targets = rng.integers(0, 5, (3, 4))
    targets[0, 1] = targets[2, 3] = -1
    loss, grad = nn.softmax_cross_entropy(logits, targets, ignore_index=-1)
    num = numeric_grad(lambda: nn.softmax_cross_entropy(logits, targets, ignore_index=-1)[0],
                       logits)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)
    assert np.all(grad[0, 1] == 0) and np.all(grad[2, 3] == 0)
    # mean over the 10 valid targets only
    lsm = nn.log_softmax(logits)
    valid = targets != -1
    manual = -lsm[valid, targets[valid]].mean()
    assert loss == pytest.approx(manual, rel=1e-12)
    s, gs = nn.softmax_cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
    assert s == pytest.approx(manual * 10, rel=1e-12)
    np.testing.assert_allclose(gs, grad * 10, rtol=1e-12)


def test_cross_entropy_is_numerically_stable():
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4 + 1, -1e4]], dtype=np.float32)
    loss, grad = nn.softmax_cross_entropy(logits, np.array([1, 1]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    # row 0: log-sum-exp is 1e4 (exactly), target logit 0 -> 1e4; row 1: log(1 + 2e^-1)
    expected = (1e4 + (np.log(np.exp(-1) * 2 + 1))) / 2
    assert loss == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_all_ignored_and_bad_targets():
    loss, grad = nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([-100, -100]))
    assert loss == 0.0 and np.all(grad == 0)
    with pytest.raises(IndexError, match="target 3"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))


@needs_torch
def test_cross_entropy_module_matches_torch():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6, 4, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (6, 4))
    targets[1, :2] = 5
    targets[3, 1] = -100
    crit = nn.CrossEntropyLoss()
    loss = crit(logits, targets)
    dl = crit.backward(2.0)
    tl = torch.tensor(logits, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tl.reshape(-1, 11), torch.tensor(targets).reshape(-1),
                                              ignore_index=-100)
    (2.0 * tloss).backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-6)
    np.testing.assert_allclose(dl, tl.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert dl.dtype == np.float32


def test_mse_gradient_and_module():
    rng = np.random.default_rng(8)
    pred = rng.standard_normal((4, 3))
    target = rng.standard_normal((4, 3))
    loss, grad = nn.mse(pred, target)
    assert loss == pytest.approx(((pred - target) ** 2).mean())
    num = numeric_grad(lambda: nn.mse(pred, target)[0], pred)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)
    crit = nn.MSELoss(reduction="sum")
    assert crit(pred, target) == pytest.approx(((pred - target) ** 2).sum())
    np.testing.assert_allclose(crit.backward(), 2 * (pred - target))
    with pytest.raises(ValueError):
        nn.mse(pred, target[:2])


def test_cross_entropy_ignored_rows_do_not_reach_loss_or_gradient_even_as_nan():
    logits = np.array([[0.0, 0.0, 0.0], [np.nan, np.inf, 1.0]], np.float32)
    targets = np.array([1, -100])
    loss, grad = nn.softmax_cross_entropy(logits, targets)
    assert loss == pytest.approx(np.log(3.0))
    assert np.isfinite(grad).all() and not grad[1].any()
    per, _ = nn.softmax_cross_entropy(logits, targets, reduction="none")
    assert per[1] == 0 and per[0] == pytest.approx(np.log(3.0))


# -- session 25's audit of fastrnn.nn: each test fails without its fix ------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_linear_checks_parameters_replaced_through_data(mode):
    # a Keras-style (in, out) kernel left untransposed segfaulted in training mode
    lin = getattr(nn.Linear(512, 64, rng=0), mode)()
    lin.weight.data = np.ones((512, 64), np.float32)
    with pytest.raises(ValueError, match=r"Linear.weight: expected shape \(64, 512\).*got "
                                         r"\(512, 64\)"):
        lin(np.ones((1000, 512), np.float32))
    lin = getattr(nn.Linear(4, 3, rng=0), mode)()
    lin.bias.data = np.ones(1, np.float32)                 # was read out of bounds
    with pytest.raises(ValueError, match=r"Linear.bias: expected shape \(3,\)"):
        lin(np.ones((2, 4), np.float32))
    lin.bias.data = np.ones(3, np.float64)
    with pytest.raises(TypeError, match="Linear.bias: expected dtype float32"):
        lin(np.ones((2, 4), np.float32))


def test_linear_refuses_other_dtypes_and_backward_after_eval():
    lin = nn.Linear(4, 3, rng=0)
    with pytest.raises(TypeError, match="x: expected dtype float32.*got float64"):
        lin(np.ones((2, 4)))                               # was cast silently
    with pytest.raises(TypeError, match="got int64"):
        lin(np.ones((2, 4), np.int64))
    lin(np.ones((2, 4), np.float32))                       # training: a cache
    lin.eval()
    lin(np.ones((2, 4), np.float32))                       # eval: none kept
    with pytest.raises(RuntimeError, match="Linear.backward: no forward cache"):
        lin.backward(np.ones((2, 3), np.float32))
    assert not lin.weight.grad.any()


def test_tied_parameters_are_listed_and_stepped_once():
    from fastrnn import optim
    emb = nn.Embedding(5, 4, rng=0)
    dec = nn.Linear(4, 5, rng=1)
    dec.weight = emb.weight                                # tied, as torch's weight tying
    m = nn.ModuleList([emb, dec])
    assert len(m.parameters()) == 2                        # was 3: stepped twice
    assert [n for n, _ in m.named_parameters()] == ["0.weight", "1.bias"]
    assert set(m.state_dict()) == {"0.weight", "1.weight", "1.bias"}   # as torch's
    emb.weight.grad[...] = 1
    w0 = emb.weight.data.copy()
    optim.SGD(m, lr=0.1).step()
    np.testing.assert_allclose(emb.weight.data, w0 - 0.1, rtol=1e-6)
    sd = m.state_dict()
    m.load_state_dict(sd)                                  # strict: every name is known
    np.testing.assert_array_equal(m.state_dict()["1.weight"], sd["0.weight"])


def test_sequential_refuses_a_module_twice_in_training():
    lin = nn.Linear(3, 3, rng=0)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"module '1' \(Linear\) appears twice"):
        nn.Sequential(lin, lin)(x)                         # the first call's dW was lost
    inner = nn.Sequential(nn.Linear(3, 3, rng=1), lin)
    with pytest.raises(ValueError, match="appears twice"):
        nn.Sequential(lin, inner)(x)
    twice = nn.Sequential(lin, lin).eval()                 # eval keeps no cache: fine
    np.testing.assert_allclose(twice(x), lin(lin(x)), rtol=1e-6)
    a, b = nn.Linear(3, 3, rng=0), nn.Linear(3, 3, rng=1)
    b.weight = a.weight                                    # shared weights: two modules
    s = nn.Sequential(a, b)
    s.backward(np.ones_like(s(x)))
    assert len(s.parameters()) == 3


def test_sequential_names_slices_and_tuple_outputs():
    from collections import OrderedDict
    import fastrnn
    for name in ("forward", "training", "a.b", ""):
        with pytest.raises(KeyError, match=repr(name)):
            nn.Sequential(OrderedDict([(name, nn.Linear(2, 2))]))
    s = nn.Sequential(OrderedDict([("enc", nn.Linear(2, 3, rng=0)),
                                   ("dec", nn.Linear(3, 2, rng=1))]))
    assert list(s[1:].state_dict()) == ["dec.weight", "dec.bias"]   # torch keeps names
    assert s[1] is s.dec
    bare = nn.Sequential(fastrnn.LSTM(2, 3, seed=0), nn.Linear(3, 2, rng=0))
    with pytest.raises(TypeError, match=r"module '0' \(LSTM\) returned a tuple.*Recurrent"):
        bare(np.ones((4, 1, 2), np.float32))


def test_embedding_refuses_bool_ids_and_misshaped_dout():
    emb = nn.Embedding(2, 3, rng=0)
    with pytest.raises(TypeError, match="integer ids, got dtype bool"):
        emb(np.array([True, True]))                        # NumPy read it as a mask
    emb(np.array([[0, 1, 1]]))
    with pytest.raises(ValueError, match=r"dout: expected shape \(1, 3, 3\).*got \(3, 3\)"):
        emb.backward(np.ones((3, 3), np.float32))          # same size: was accepted
    emb.eval()
    emb(np.array([0]))
    with pytest.raises(RuntimeError, match="Embedding.backward: no forward cache"):
        emb.backward(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"padding_idx: .*\[-10, 10\), got -11"):
        nn.Embedding(10, 2, padding_idx=-11)               # said 'padding_idx -1'
    with pytest.raises(ValueError, match="num_embeddings: expected an integer >= 1, got 3.7"):
        nn.Embedding(3.7, 2)                               # built 3 rows


def test_dropout_refuses_integer_input_and_loss_message():
    with pytest.raises(TypeError, match="floating-point input, got dtype int64"):
        nn.Dropout(0.3, rng=0)(np.ones((10, 10), np.int64))   # scale 1/0.7 truncated to 1
    np.testing.assert_array_equal(nn.Dropout(0.3).eval()(np.ones(3, np.int64)), 1)
    crit = nn.CrossEntropyLoss().eval()
    crit(np.zeros((2, 3), np.float32), np.array([0, 1]))
    with pytest.raises(RuntimeError, match="CrossEntropyLoss.backward: no forward cache"):
        crit.backward()                                    # said 'called before forward'
    with pytest.raises(ValueError, match=r"C >= 1 classes, got \(3, 0\)"):
        nn.CrossEntropyLoss()(np.zeros((3, 0)), np.zeros(3, int))


def test_sequential_slice_append_and_blocks_holding_a_child_twice():
    a, b, c, d = (nn.Linear(3, 3, rng=k) for k in range(4))
    t = nn.Sequential(a, b, c)[1:]                       # names '1', '2' kept
    t.append(d)                                         # replaced '2' (c) silently
    assert [n for n, _ in t.named_children()] == ["1", "2", "3"] and list(t) == [b, c, d]

    class Block(Module):                                # one child under two names,
        def __init__(self):                             # called once: not a repeat
            super().__init__()
            self.lin = nn.Linear(3, 3, rng=5)
            self.alias = self.lin

        def forward(self, x):
            return self.lin(x)

        def backward(self, dout):
            return self.lin.backward(dout)

    s = nn.Sequential(Block(), nn.Linear(3, 2, rng=6))
    y = s(np.ones((2, 3), np.float32))
    assert s.backward(np.ones_like(y)).shape == (2, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0,), (7,), (3, 65537), (2, 1 << 16)])
def test_weights_drawn_by_pieces_are_the_whole_draw(dtype, shape):
    """Initialisers draw piece by piece (no float64 temporary of the whole weight);
    the numbers are bitwise those of one whole-array draw, cast, so a seed gives the
    weights it gave before."""
    from fastrnn.modules.module import fill_normal, fill_uniform
    from fastrnn.nn.init import normal_, uniform_
    want_u = np.random.default_rng(5).uniform(-0.3, 0.3, shape).astype(dtype)
    want_n = (np.random.default_rng(6).standard_normal(shape) * 0.02).astype(dtype)
    out = np.full(shape, np.nan, dtype)
    fill_uniform(out, 0.3, np.random.default_rng(5))
    assert np.array_equal(out, want_u)
    fill_normal(out, 0.02, np.random.default_rng(6))
    assert np.array_equal(out, want_n)
    if len(shape) == 2:                    # a strided view: filled in C order too
        wide = np.full((shape[1], shape[0]), np.nan, dtype)
        fill_uniform(wide.T, 0.3, np.random.default_rng(5))
        assert np.array_equal(wide.T, want_u)
    got = uniform_(shape, 0.3, 5, dtype)
    assert got.dtype == dtype and np.array_equal(got, want_u)
    got = normal_(shape, 0.02, 6, dtype)
    assert got.dtype == dtype and np.array_equal(got, want_n)


def test_a_layer_seed_gives_the_whole_draw():
    """A recurrent layer's init (torch's U(-1/sqrt(H), 1/sqrt(H)), in registration
    order) is one stream drawn by pieces: the same numbers as whole-array draws."""
    import fastrnn
    m = fastrnn.LSTM(5, 300, seed=3)              # W_hh: 360,000 values, 6 pieces
    rng = np.random.default_rng(np.random.SeedSequence(3).spawn(2)[0])
    bound = 1.0 / np.sqrt(m.hidden_size)
    for name, p in m.named_parameters():
        want = rng.uniform(-bound, bound, p.data.shape).astype(p.data.dtype)
        assert np.array_equal(p.data, want), name
