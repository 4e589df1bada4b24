"""Mixed-lengths benchmark: a batch of mixed lengths should cost about the sum
of its lengths, not B*T.

For each cell and mode the kernel runs once with all lengths T ("full") and
once with lengths uniform in [1, T] ("mixed"), after a check against the NumPy
reference. GFLOP/s counts only the useful work (the FLOP count scaled by
sum(lengths) / (B*T)), so equal GFLOP/s for "full" and "mixed" means the cost
follows the sum of lengths; the session summary prints the time ratio next to
the length ratio.

    python -m pytest bench/test_bench_lengths.py --benchmark-only
"""

import numpy as np
import pytest

import fastrnn
from fastrnn.benchmark.common import CELLS, DEFAULT_CONFIG, flop_count, kernel_run
from fastrnn.benchmark.lengths import mixed_lengths

from bench.test_bench_kernels import check_against_reference, setup_case

CONFIG = DEFAULT_CONFIG  # (I, H, T, B) = (256, 256, 100, 64)


@pytest.mark.parametrize("lengths_kind", ["full", "mixed"])
@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("cell", CELLS)
def test_lengths(benchmark, record_gflops, cell, mode, lengths_kind):
    I, H, T, B = CONFIG
    dtype = "float32"
    w, x, dy = setup_case(cell, CONFIG, dtype)
    if lengths_kind == "full":
        lengths = np.full(B, T, dtype=np.int64)
    else:
        lengths = mixed_lengths(T, B, seed=0)
    check_against_reference(cell, mode, x, w, dy, lengths=lengths)
    length_ratio = float(lengths.sum()) / (B * T)
    benchmark.group = f"lengths {cell} {mode} I={I} H={H} T={T} B={B}"
    benchmark(lambda: kernel_run(fastrnn.functional, cell, mode, x, w, dy, lengths=lengths))
    record_gflops(flop_count(cell, I, H, T, B, mode) * length_ratio, cell=cell, mode=mode,
                  dtype=dtype, I=I, H=H, T=T, B=B, lengths=lengths_kind,
                  length_ratio=length_ratio, tokens=int(lengths.sum()))
