"""Shared pieces of the benchmarks: the config grid, FLOP counts, weights, checks.

Used by the side-by-side runner (:mod:`fastrnn.benchmark.runner`) and by the
pytest-benchmark suite in ``bench/``. Shape letters as in docs/DESIGN.md:
T steps, B batch, I input size, H hidden size, G gates (RNN 1, GRU 3, LSTM 4).

FLOP count (multiply-adds count 2, element-wise work is ignored)::

    forward          2 * T * B * G * H * (I + H)      per layer and direction
    forward+backward 3 * forward                       (dx/dh and dW GEMMs)

A deeper layer's input size is H times the number of directions.
"""

import numpy as np

__all__ = ["CELLS", "GATES", "GRID", "STEP_SIZES", "DEFAULT_CONFIG", "TOLERANCE", "flop_count",
           "weight_names", "make_weights", "make_inputs", "max_rel_err", "compare",
           "kernel_forward", "kernel_backward", "kernel_run"]

#: Cells benchmarked, by their names in the runner's ``--cell`` option.
CELLS = ("rnn_tanh", "lstm", "gru")

#: Gates per cell (G).
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}

#: The config grid, as (I, H, T, B) tuples, or (I, H, T, B, layers, bidirectional)
#: for the stacked and bidirectional rows.
GRID = (
    (128, 1024, 30, 20),
    (256, 256, 100, 64),
    (512, 512, 50, 128),
    (64, 128, 200, 32),
    (256, 256, 100, 1),
    (1024, 1024, 25, 16),
    (512, 512, 50, 2),       # small batches: bound by streaming the weights
    (512, 512, 50, 4),
    (512, 512, 50, 8),
    (256, 256, 100, 32, 1, True),    # bidirectional
    (256, 256, 100, 32, 2, False),   # two layers
)

#: (I, H) pairs of ``--mode step`` (batch-1 single steps through the cells).
STEP_SIZES = ((64, 64), (128, 128), (256, 256), (512, 512), (1024, 1024))

#: The config used when only some of I, H, T, B are given on the command line.
DEFAULT_CONFIG = (256, 256, 100, 64)

#: Largest accepted relative error (max |a - b| / max |b|) when two engines'
#: results are compared, by dtype.
TOLERANCE = {np.dtype(np.float32): 2e-3, np.dtype(np.float64): 1e-9}


def flop_count(cell, I, H, T, B, mode="forward", layers=1, bidirectional=False):
    """Floating-point operations of one call: 2*T*B*G*H*(I+H) per layer and
    direction for the forward pass, three times that for forward+backward
    (``mode="train"``). ``mode="step"`` is a forward pass with T = 1."""
    G = GATES[cell]
    D = 2 if bidirectional else 1
    if mode == "step":
        T = 1
    total = 0
    for layer in range(layers):
        layer_in = I if layer == 0 else H * D
        total += D * 2 * T * B * G * H * (layer_in + H)
    return 3 * total if mode == "train" else total


def weight_names(layers=1, bidirectional=False, cell_only=False):
    """torch.nn's parameter names: ``weight_ih_l0``, ..., ``bias_hh_l1_reverse``
    for layers; ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` for cells."""
    if cell_only:
        return ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    names = []
    for layer in range(layers):
        for suffix in ([""] + (["_reverse"] if bidirectional else [])):
            names += [f"{kind}_l{layer}{suffix}"
                      for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return names


def make_weights(cell, I, H, layers=1, bidirectional=False, dtype=np.float32, seed=0,
                 cell_only=False):
    """Random weights named and shaped as torch.nn's (a dict name -> array),
    drawn like torch's default init, uniform in [-1/sqrt(H), 1/sqrt(H)]."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    D = 2 if bidirectional else 1
    bound = 1.0 / np.sqrt(H)
    weights = {}
    for name in weight_names(layers, bidirectional, cell_only):
        layer = 0 if cell_only else int(name.split("_l")[1].split("_")[0])
        layer_in = I if layer == 0 else H * D
        if name.startswith("weight_ih"):
            shape = (G * H, layer_in)
        elif name.startswith("weight_hh"):
            shape = (G * H, H)
        else:
            shape = (G * H,)
        weights[name] = rng.uniform(-bound, bound, size=shape).astype(dtype)
    return weights


def make_inputs(I, H, T, B, D=1, dtype=np.float32, seed=1):
    """x (T, B, I) and an output gradient dy (T, B, D*H), both random."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(T, B, I)).astype(dtype)
    dy = rng.standard_normal(size=(T, B, D * H)).astype(dtype)
    return x, dy


def max_rel_err(a, b):
    """max |a - b| / max |b| (absolute error when b is all zeros)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        if a.size != b.size:
            return float("inf")
        a = a.reshape(b.shape)
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    err = float(np.max(np.abs(a - b)))
    if not np.isfinite(err):
        return float("inf")
    return err / scale if scale > 0 else err


def compare(got, want, tol):
    """Compare a peer's arrays (got) with fastrnn's (want), key by key.

    Returns ``(ok, worst_key, worst_err, n_keys)``: ``ok`` when the peer gives
    every array fastrnn gives and each is within ``tol`` relative error. A key
    the peer lacks fails (error inf): only common keys were compared, so a peer
    returning no gradients at all passed on its output alone (found by an audit).
    """
    missing = [k for k in want if want[k] is not None and got.get(k) is None]
    if missing:
        return False, missing[0], float("inf"), 0
    worst_key, worst = None, 0.0
    keys = [k for k in want if want[k] is not None]
    for key in keys:
        err = max_rel_err(got[key], want[key])
        if worst_key is None or err > worst:
            worst_key, worst = key, err
    return (bool(keys) and worst <= tol), worst_key, worst, len(keys)


# ---------------------------------------------------------------------------
# The single-layer functional API, called through a module (fastrnn.functional
# or fastrnn.reference) looked up at call time.
# ---------------------------------------------------------------------------

def kernel_forward(F, cell, x, w, h0=None, c0=None, lengths=None, reverse=False,
                   training=True):
    """Run ``F.<cell>_forward`` with weights ``w`` = (w_ih, w_hh, b_ih, b_hh).

    Returns ``(outputs, cache)`` with outputs a dict: ``y``, ``h_n`` (and ``c_n``).
    """
    w_ih, w_hh, b_ih, b_hh = w
    if cell == "lstm":
        y, h_n, c_n, cache = F.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                            lengths=lengths, reverse=reverse,
                                            training=training)
        return {"y": y, "h_n": h_n, "c_n": c_n}, cache
    if cell == "gru":
        y, h_n, cache = F.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths,
                                      reverse=reverse, training=training)
    else:
        y, h_n, cache = F.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh,
                                      nonlinearity=cell.split("_", 1)[1],
                                      lengths=lengths, reverse=reverse,
                                      training=training)
    return {"y": y, "h_n": h_n}, cache


_GRAD_NAMES = {
    "lstm": ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"),
    "gru": ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"),
    "rnn": ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"),
}


def kernel_backward(F, cell, dy, cache):
    """Run ``F.<cell>_backward(dy, None[, None], cache)``; returns a dict of the
    gradients named ``dx``, ``dh0``, (``dc0``), ``dw_ih``, ``dw_hh``, ``db_ih``,
    ``db_hh``."""
    if cell == "lstm":
        grads = F.lstm_backward(dy, None, None, cache)
    elif cell == "gru":
        grads = F.gru_backward(dy, None, cache)
    else:
        grads = F.rnn_backward(dy, None, cache)
    return dict(zip(_GRAD_NAMES[cell if cell in _GRAD_NAMES else "rnn"], grads))


def kernel_run(F, cell, mode, x, w, dy=None, h0=None, c0=None, lengths=None):
    """One inference forward (``mode="forward"``) or one forward+backward
    (``mode="train"``) through ``F``; returns every output and gradient in one dict."""
    out, cache = kernel_forward(F, cell, x, w, h0, c0, lengths=lengths,
                                training=(mode == "train"))
    if mode == "train":
        out.update(kernel_backward(F, cell, dy, cache))
    return out

