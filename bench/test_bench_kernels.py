"""Benchmarks of the single-layer kernels in ``fastrnn.functional``.

Every cell (rnn_tanh, lstm, gru) x {inference forward, training forward+backward}
x the config grid, in float32, and a subset in float64. Each case first checks
the kernel's outputs (and gradients) against the NumPy reference
``fastrnn.reference`` and only then times it. GFLOP/s counts
2*T*B*G*H*(I+H) for a forward pass and three times that for forward+backward.

    python -m pytest bench/ --benchmark-only
    python -m pytest bench/test_bench_kernels.py --benchmark-only -k "lstm and forward"
"""

import numpy as np
import pytest

import fastrnn
from fastrnn.benchmark.common import (CELLS, GRID, TOLERANCE, compare, flop_count,
                                      kernel_run, make_inputs, make_weights)

#: configs (I, H, T, B) also run in float64
FLOAT64_GRID = ((256, 256, 100, 64), (64, 128, 200, 32))

MODES = ("forward", "train")


def _params():
    out = []
    single = tuple(c for c in GRID if len(c) == 4)   # the pytest suite times one-layer cases
    for dtype, grid in (("float32", single), ("float64", FLOAT64_GRID)):
        for config in grid:
            for mode in MODES:
                for cell in CELLS:
                    I, H, T, B = config
                    out.append(pytest.param(cell, mode, config, dtype,
                                            id=f"{cell}-{mode}-I{I}-H{H}-T{T}-B{B}-{dtype}"))
    return out


def setup_case(cell, config, dtype, seed=0):
    """Weights tuple (w_ih, w_hh, b_ih, b_hh), x (T,B,I) and dy (T,B,H)."""
    I, H, T, B = config
    weights = make_weights(cell, I, H, dtype=np.dtype(dtype), seed=seed)
    w = tuple(weights[k + "_l0"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    x, dy = make_inputs(I, H, T, B, 1, np.dtype(dtype), seed=seed + 1)
    return w, x, dy


def check_against_reference(cell, mode, x, w, dy, lengths=None):
    """One call of fastrnn.functional and of fastrnn.reference, compared."""
    got = kernel_run(fastrnn.functional, cell, mode, x, w, dy, lengths=lengths)
    want = kernel_run(fastrnn.reference, cell, mode, x, w, dy, lengths=lengths)
    ok, key, err, n = compare(got, want, TOLERANCE[x.dtype])
    assert ok, (f"fastrnn.functional differs from fastrnn.reference: max rel err {err:.3g} "
                f"in {key!r} ({n} arrays compared, tolerance {TOLERANCE[x.dtype]:g})")


@pytest.mark.parametrize("cell, mode, config, dtype", _params())
def test_kernel(benchmark, record_gflops, cell, mode, config, dtype):
    I, H, T, B = config
    w, x, dy = setup_case(cell, config, dtype)
    check_against_reference(cell, mode, x, w, dy)
    benchmark.group = f"{mode} {dtype} I={I} H={H} T={T} B={B}"
    # fastrnn.functional is looked up on every call: the benchmark follows the package
    benchmark(lambda: kernel_run(fastrnn.functional, cell, mode, x, w, dy))
    record_gflops(flop_count(cell, I, H, T, B, mode), cell=cell, mode=mode, dtype=dtype,
                  I=I, H=H, T=T, B=B)
