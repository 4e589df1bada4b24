"""fastrnn.RNN / LSTM / GRU against torch.nn: outputs, final states and every gradient.

Grid: cell (RNN tanh/relu, LSTM, LSTM+proj, GRU) x 1-3 layers x uni/bidirectional
x batch_first x bias x lengths x float32/float64. Each case copies fastrnn's
weights into the torch module, runs both on the same input and the same output
gradients, and compares out, h_n(, c_n), dx, dh0(, dc0) and every parameter grad.
Tolerance: max abs error <= rel * max abs of torch's value (1e-8 f64, 1e-4 f32).
Sizes stay tiny (T=5, B=3, I=4, H=6) so the ~500 cases run in seconds.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

import fastrnn  # noqa: E402

T, B, I, H, P = 5, 3, 4, 6, 3
LENGTHS = np.array([5, 1, 3])       # unsorted, includes 1 and T
TOL = {np.float32: 1e-4, np.float64: 1e-8}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny problems: torch's OpenMP pool only competes with fastrnn's for the cores
    (idle spinning threads of two runtimes made this file ~3x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_pair(cell, num_layers, bidirectional, batch_first, bias, dtype, merge_mode="concat"):
    """A fastrnn module and a torch module holding the same weights."""
    common = dict(num_layers=num_layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional)
    if cell.startswith("rnn"):
        act = cell.split("_")[1]
        ours = fastrnn.RNN(I, H, nonlinearity=act, dtype=dtype, seed=1, merge_mode=merge_mode,
                           **common)
        theirs = torch.nn.RNN(I, H, nonlinearity=act, **common)
    elif cell.startswith("lstm"):
        proj = P if cell == "lstm_proj" else 0
        ours = fastrnn.LSTM(I, H, proj_size=proj, dtype=dtype, seed=1, merge_mode=merge_mode,
                            **common)
        theirs = torch.nn.LSTM(I, H, proj_size=proj, **common)
    else:
        ours = fastrnn.GRU(I, H, dtype=dtype, seed=1, merge_mode=merge_mode, **common)
        theirs = torch.nn.GRU(I, H, **common)
    theirs = theirs.to(TORCH_DTYPE[dtype])
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    return ours, theirs


def run_torch(theirs, x, hx, lengths, dout, dstate):
    """Forward + backward in torch; returns outputs and gradients as numpy."""
    xt = torch.tensor(x, requires_grad=True)
    hxt = tuple(torch.tensor(h, requires_grad=True) for h in hx)
    inp = xt
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=theirs.batch_first, enforce_sorted=False)
    out, state = theirs(inp, hxt if len(hxt) == 2 else hxt[0])
    if lengths is not None:
        T_steps = x.shape[1 if theirs.batch_first else 0]
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(
            out, batch_first=theirs.batch_first, total_length=T_steps)
    state = state if isinstance(state, tuple) else (state,)
    loss = (out * torch.from_numpy(dout)).sum()
    for s, ds in zip(state, dstate):
        loss = loss + (s * torch.from_numpy(ds)).sum()
    loss.backward()
    grads = {"x": xt.grad.numpy(), "h0": hxt[0].grad.numpy()}
    if len(hxt) == 2:
        grads["c0"] = hxt[1].grad.numpy()
    grads.update({n: p.grad.numpy() for n, p in theirs.named_parameters()})
    return out.detach().numpy(), [s.detach().numpy() for s in state], grads


def assert_close(ours, ref, tol, what):
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != torch's {ref.shape}"
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x {scale:.3g}"


def random_problem(ours, dtype, seed=0):
    """x, hx, dout, dstate for module `ours` (layout-aware)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, I) if ours.batch_first else (T, B, I)).astype(dtype)
    LD = ours.num_layers * ours.num_directions
    hx = [0.5 * rng.standard_normal((LD, B, ours.out_hidden_size)).astype(dtype)]
    if ours.mode == "LSTM":
        hx.append(0.5 * rng.standard_normal((LD, B, H)).astype(dtype))
    out_shape = x.shape[:2] + (ours.output_size,)
    dout = rng.standard_normal(out_shape).astype(dtype)
    dstate = [rng.standard_normal(h.shape).astype(dtype) for h in hx]
    return x, hx, dout, dstate


def compare(cell, ours, theirs, dtype, with_lengths, merge_sum=False):
    tol = TOL[dtype]
    lengths = LENGTHS if with_lengths else None
    x, hx, dout, dstate = random_problem(ours, dtype)
    is_lstm = ours.mode == "LSTM"

    out, state = ours(x, tuple(hx) if is_lstm else hx[0], lengths=lengths)
    state = list(state) if is_lstm else [state]
    dx, dstate0 = ours.backward(dout, tuple(dstate) if is_lstm else dstate[0])
    dstate0 = list(dstate0) if is_lstm else [dstate0]

    # torch has no 'sum' merge: feed it [dout | dout] and sum its two halves
    t_dout = np.concatenate([dout, dout], axis=2) if merge_sum else dout
    t_out, t_state, t_grads = run_torch(theirs, x, hx, lengths, t_dout, dstate)
    if merge_sum:
        O = ours.out_hidden_size
        t_out = t_out[..., :O] + t_out[..., O:]

    assert out.shape == t_out.shape
    assert_close(out, t_out, tol, "out")
    for name, a, b in zip(["h_n", "c_n"], state, t_state):
        assert_close(a, b, tol, name)
    assert_close(dx, t_grads["x"], tol, "dx")
    for name, a in zip(["h0", "c0"], dstate0):
        assert_close(a, t_grads[name], tol, "d" + name)
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in theirs.named_parameters()]
    for n, p in ours.named_parameters():
        assert p.grad.dtype == dtype
        assert_close(p.grad, t_grads[n], tol, "grad " + n)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbi", "bti"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3], ids=["L1", "L2", "L3"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch(cell, num_layers, bidirectional, batch_first, bias, with_lengths, dtype):
    ours, theirs = make_pair(cell, num_layers, bidirectional, batch_first, bias, dtype)
    compare(cell, ours, theirs, dtype, with_lengths)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell", CELLS)
def test_merge_sum_matches_torch_halves(cell, with_lengths):
    """Single layer 'sum' merge == torch's forward half + reverse half."""
    ours, theirs = make_pair(cell, 1, True, False, True, np.float64, merge_mode="sum")
    compare(cell, ours, theirs, np.float64, with_lengths, merge_sum=True)


@pytest.mark.parametrize("cell", CELLS)
def test_default_state_is_zeros(cell):
    """hx=None behaves like explicit zeros and matches torch's default."""
    ours, theirs = make_pair(cell, 2, True, False, True, np.float64)
    x, hx, _, _ = random_problem(ours, np.float64)
    out, _ = ours(x)
    zeros = tuple(np.zeros_like(h) for h in hx)
    out0, _ = ours(x, zeros if ours.mode == "LSTM" else zeros[0])
    np.testing.assert_array_equal(out, out0)
    t_out, _ = theirs(torch.from_numpy(x))
    assert_close(out, t_out.detach().numpy(), 1e-8, "out")


@pytest.mark.parametrize("mode,proj", [("LSTM", 0), ("LSTM", P), ("GRU", 0), ("RNN", 0)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_unbatched_input_matches_torch(mode, proj, batch_first, training):
    """x (T, I), h0 (L·D, O), c0 (L·D, H) as torch takes them: out (T, D·O), h_n
    (L·D, O); backward takes and returns the same shapes; every gradient as torch's."""
    rng = np.random.default_rng(7)
    kw = dict(num_layers=2, bidirectional=True, batch_first=batch_first)
    if proj:
        kw["proj_size"] = proj
    theirs = getattr(torch.nn, mode)(I, H, **kw).double()
    ours = getattr(fastrnn, mode)(I, H, dtype=np.float64, **kw).train(training)
    ours.load_state_dict(theirs.state_dict())
    O = proj or H
    x = rng.standard_normal((T, I))                               # (T, I)
    h0, c0 = rng.standard_normal((4, O)), rng.standard_normal((4, H))
    xt, h0t, c0t = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    lstm = mode == "LSTM"
    out, state = ours(x, (h0, c0) if lstm else h0)
    t_out, t_state = theirs(xt, (h0t, c0t) if lstm else h0t)
    assert out.shape == (T, 2 * O) and out.flags.c_contiguous
    assert_close(out, t_out.detach().numpy(), 1e-10, "out")
    hn, t_hn = (state[0], t_state[0]) if lstm else (state, t_state)
    assert hn.shape == (4, O)
    assert_close(hn, t_hn.detach().numpy(), 1e-10, "h_n")
    if not training:
        return
    dout, dhn = rng.standard_normal(out.shape), rng.standard_normal(hn.shape)
    ((t_out * torch.tensor(dout)).sum() + (t_hn * torch.tensor(dhn)).sum()).backward()
    dx, dstate = ours.backward(dout, (dhn, None) if lstm else dhn)
    assert dx.shape == (T, I)
    assert_close(dx, xt.grad.numpy(), 1e-10, "dx")
    assert_close(dstate[0] if lstm else dstate, h0t.grad.numpy(), 1e-10, "dh0")
    if lstm:
        assert_close(dstate[1], c0t.grad.numpy(), 1e-10, "dc0")
    for name, p in theirs.named_parameters():
        assert_close(getattr(ours, name).grad, p.grad.numpy(), 1e-10, name)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_state_dict_loads_directly(cell):
    """A torch module's own (randomly initialised) state_dict reproduces its outputs."""
    torch.manual_seed(0)
    ours, _ = make_pair(cell, 2, True, True, True, np.float32)
    theirs = {"rnn_tanh": lambda: torch.nn.RNN(I, H, 2, batch_first=True, bidirectional=True),
              "rnn_relu": lambda: torch.nn.RNN(I, H, 2, nonlinearity="relu", batch_first=True,
                                               bidirectional=True),
              "lstm": lambda: torch.nn.LSTM(I, H, 2, batch_first=True, bidirectional=True),
              "lstm_proj": lambda: torch.nn.LSTM(I, H, 2, batch_first=True, bidirectional=True,
                                                 proj_size=P),
              "gru": lambda: torch.nn.GRU(I, H, 2, batch_first=True, bidirectional=True)}[cell]()
    ours.load_state_dict(theirs.state_dict())  # torch tensors straight in
    ours.eval()
    theirs.eval()
    x = np.random.default_rng(3).standard_normal((B, T, I)).astype(np.float32)
    out, state = ours(x)
    with torch.no_grad():
        t_out, t_state = theirs(torch.from_numpy(x))
    assert_close(out, t_out.numpy(), 1e-5, "out")
    if ours.mode == "LSTM":
        assert_close(state[0], t_state[0].numpy(), 1e-5, "h_n")
        assert_close(state[1], t_state[1].numpy(), 1e-5, "c_n")
    else:
        assert_close(state, t_state.numpy(), 1e-5, "h_n")


def test_torch_bfloat16_state_dict_loads_exactly():
    """torch loads a bfloat16 state_dict into a float32 module; so does fastrnn (bf16 has
    no NumPy dtype: it is read through float32, which holds every bf16 value)."""
    theirs = torch.nn.GRU(I, H).bfloat16()
    ours = fastrnn.GRU(I, H)
    ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k], v.float().numpy())
