"""fastrnn.optim: update rules against torch.optim, state dicts, gradient clipping."""

import io
import math

import numpy as np
import pytest

from fastrnn import optim
from fastrnn.modules.module import Parameter
from fastrnn.nn import Linear

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


SHAPES = [(5, 3), (4,), (2, 2, 2)]


def make_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def grads(step, dtype=np.float64):
    rng = np.random.default_rng(1000 + step)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def run(opt, params, steps, first=0):
    for k in range(first, first + steps):
        for p, g in zip(params, grads(k)):
            p.grad[...] = g
        opt.step()


CASES = [
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.003, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.05)),
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.5, dampening=0.3)),
]


@needs_torch
@pytest.mark.parametrize("name,kw", CASES)
def test_matches_torch_optim(name, kw):
    params = make_params()
    tparams = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in params]
    opt = getattr(optim, name)(params, **kw)
    topt = getattr(torch.optim, name)(tparams, **kw)
    for k in range(25):
        for p, tp, g in zip(params, tparams, grads(k)):
            p.grad[...] = g
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-13)


@needs_torch
def test_adam_float32_matches_torch():
    params = make_params(dtype=np.float32)
    tparams = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in params]
    opt, topt = optim.Adam(params, lr=2e-3), torch.optim.Adam(tparams, lr=2e-3)
    for k in range(10):
        for p, tp, g in zip(params, tparams, grads(k, np.float32)):
            p.grad[...] = g
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    for p, tp in zip(params, tparams):
        assert p.data.dtype == np.float32
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adam_first_step_is_lr_times_sign():
    p = Parameter(np.zeros(3))
    p.grad[...] = [2.0, -0.5, 1e-3]
    optim.Adam([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [-0.1, 0.1, -0.1], rtol=1e-4)


@pytest.mark.parametrize("name,kw", CASES)
def test_state_dict_resume_is_exact(name, kw):
    cls = getattr(optim, name)
    a = make_params()
    opt_a = cls(a, **kw)
    run(opt_a, a, 12)

    b = make_params()
    opt_b = cls(b, **kw)
    run(opt_b, b, 5)
    buf = io.BytesIO()
    np.savez(buf, **opt_b.state_dict())                      # plain arrays, no pickle
    saved_params = [p.data.copy() for p in b]
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        sd = {k: z[k] for k in z.files}
    c = [Parameter(d) for d in saved_params]
    opt_c = cls(c, lr=123.0)                                 # hyper-parameters come from sd
    opt_c.load_state_dict(sd)
    assert opt_c.step_count == 5
    run(opt_c, c, 7, first=5)
    for pa, pc in zip(a, c):
        np.testing.assert_array_equal(pa.data, pc.data)


def test_load_state_dict_checks():
    params = make_params()
    opt = optim.Adam(params)
    run(opt, params, 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="Adam"):
        optim.SGD(make_params()).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameters"):
        optim.Adam(make_params()[:2]).load_state_dict(sd)
    bad = dict(sd)
    bad["state.0.exp_avg"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="shape"):
        optim.Adam(make_params()).load_state_dict(bad)
    with pytest.raises(ValueError):
        optim.Adam([])


def test_accepts_module_and_zero_grad():
    lin = Linear(3, 2, rng=0)
    opt = optim.SGD(lin, lr=0.1)
    assert len(opt.params) == 2
    lin.weight.grad[...] = 1.0
    opt.zero_grad()
    assert np.all(lin.weight.grad == 0)


def test_sgd_fits_linear_regression():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 3))
    true_w = np.array([[1.5, -2.0, 0.5]])
    y = X @ true_w.T + 0.3
    lin = Linear(3, 1, dtype=np.float64, rng=1)
    opt = optim.SGD(lin, lr=0.1, momentum=0.9)
    for _ in range(200):
        lin.zero_grad()
        pred = lin(X)
        lin.backward(2 * (pred - y) / len(X))
        opt.step()
    np.testing.assert_allclose(lin.weight.data, true_w, atol=1e-4)
    np.testing.assert_allclose(lin.bias.data, [0.3], atol=1e-4)


# -- clipping ------------------------------------------------------------------------------
@needs_torch
def test_clip_grad_norm_matches_torch_and_returns_pre_clip_norm():
    params = make_params()
    for p, g in zip(params, grads(0)):
        p.grad[...] = g * 3
    tparams = [torch.nn.Parameter(torch.tensor(p.data)) for p in params]
    for tp, p in zip(tparams, params):
        tp.grad = torch.tensor(p.grad.copy())
    expected = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    total = optim.clip_grad_norm(params, 1.0)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
    assert total == pytest.approx(expected, rel=1e-12)
    assert total == pytest.approx(float(ttotal), rel=1e-12)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-12)
    assert optim.grad_norm(params) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_leaves_small_gradients_alone_and_inf_norm():
    params = make_params()
    for p, g in zip(params, grads(1)):
        p.grad[...] = g * 1e-3
    before = [p.grad.copy() for p in params]
    total = optim.clip_grad_norm(params, 10.0)
    assert total < 10
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.grad, b)
    inf_total = optim.clip_grad_norm(params, 1e-4, norm_type=float("inf"))
    assert inf_total == pytest.approx(max(np.abs(b).max() for b in before))
    assert max(np.abs(p.grad).max() for p in params) == pytest.approx(1e-4, rel=1e-3)  # eps 1e-6 in the scale


def test_clip_grad_value_clamps_and_returns_pre_clip_norm():
    params = make_params()
    for p, g in zip(params, grads(2)):
        p.grad[...] = g
    expected = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    total = optim.clip_grad_value(params, 0.5)
    assert total == pytest.approx(expected, rel=1e-12)
    for p, g in zip(params, grads(2)):
        np.testing.assert_array_equal(p.grad, np.clip(g, -0.5, 0.5))


def _params(*grads):
    ps = []
    for g in grads:
        p = Parameter(np.zeros(len(g)))
        p.grad[...] = g
        ps.append(p)
    return ps


def test_norms_of_every_order_as_torch_takes_them():
    """inf: largest |g|, -inf: smallest, 0: count of non-zeros; NaN in any parameter,
    not only the first, gives NaN (Python's max() skipped it)."""
    ps = _params([-5.0, 7.0], [0.0, 2.0])
    assert optim.grad_norm(ps, float("inf")) == 7.0
    assert optim.grad_norm(ps, -float("inf")) == 0.0
    assert optim.grad_norm(_params([-5.0, 7.0]), -float("inf")) == 5.0
    assert optim.grad_norm(ps, 0) == 3.0
    nan = _params([3.0, 2.0], [np.nan, 1.0])
    for order in (float("inf"), -float("inf"), 0, 1, 2):
        assert math.isnan(optim.grad_norm(nan, order)), order
    with pytest.raises(RuntimeError, match="nan"):
        optim.clip_grad_norm(nan, 1.0, norm_type=float("inf"), error_if_nonfinite=True)


@needs_torch
def test_clip_grad_norm_of_order_0_counts_parameters_as_torch():
    """torch's clip_grad_norm_ takes the norm of the per-parameter norms: for order 0
    the parameters with a non-zero gradient (NaN counts), here 2 of 3; grad_norm (one
    long vector) counts the 3 non-zero elements."""
    gs = [[1.0, 0.0, 2.0], [0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    for nan in (False, True):
        if nan:
            gs[1][0] = np.nan
        ps = _params(*gs)
        tps = [torch.nn.Parameter(torch.zeros(len(g), dtype=torch.float64)) for g in gs]
        for tp, g in zip(tps, gs):
            tp.grad = torch.tensor(g, dtype=torch.float64)
        total = optim.clip_grad_norm(ps, 1.0, norm_type=0)
        assert total == float(torch.nn.utils.clip_grad_norm_(tps, 1.0, norm_type=0)) == 2.0
        for p, tp in zip(ps, tps):
            np.testing.assert_array_equal(p.grad, tp.grad.numpy())   # scaled by 1 / (2 + 1e-6)
    assert optim.grad_norm(_params([1.0, 0.0, 2.0], [0.5, 0.0]), 0) == 3.0   # elements


def test_clip_scales_non_finite_gradients_as_torch():
    ps = _params([1.0, np.inf, 2.0])
    total = optim.clip_grad_norm(ps, 1.0)
    assert total == math.inf
    np.testing.assert_array_equal(ps[0].grad, [0.0, np.nan, 0.0])   # scaled by 0, as torch
    ps = _params([1.0, np.nan])
    assert math.isnan(optim.clip_grad_norm(ps, 1.0))
    assert np.isnan(ps[0].grad).all()


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_adam_updates_a_parameter_whose_data_is_not_c_contiguous(cls):
    """A Fortran-order p.data was left unchanged: the fused step wrote into a copy."""
    a = Parameter(np.arange(12.0).reshape(3, 4))
    b = Parameter(np.arange(12.0).reshape(3, 4))
    b.data = np.asfortranarray(b.data)
    for p in (a, b):
        p.grad[...] = 1.0
        cls([p], lr=0.1).step()
    np.testing.assert_array_equal(b.data, a.data)
    assert not np.array_equal(a.data, np.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("make,named", [
    (lambda ps: optim.Adam(ps, lr=float("nan")), "lr: expected a number >= 0, got nan"),
    (lambda ps: optim.AdamW(ps, eps=-1e-8), "eps: expected a number >= 0"),
    (lambda ps: optim.Adam(ps, betas=(0.9, 1.0)), r"betas: expected two numbers in \[0, 1\)"),
    (lambda ps: optim.SGD(ps, lr=0.1, weight_decay=float("nan")), "weight_decay: expected"),
    (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), "nesterov=True: expected momentum > 0"),
    (lambda ps: optim.clip_grad_value(ps, float("nan")), "clip_value: expected a number >= 0"),
])
def test_bad_hyper_parameters_are_named(make, named):
    """Each message names the argument and its value (Adam said only 'invalid Adam
    hyper-parameters'), and NaN, which `< 0` let through, is refused."""
    with pytest.raises(ValueError, match=named):
        make(_params([1.0]))
