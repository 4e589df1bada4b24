"""pytest-benchmark set-up for the fastrnn benchmark suite.

Run with ``python -m pytest bench/ --benchmark-only`` from the repository root
(``tests/`` is the default test path, so a plain ``pytest`` never collects
these). Options added here:

    --fastrnn-threads N   threads for fastrnn and NumPy's BLAS (default 2)

Every benchmark stores its FLOP count, GFLOP/s and % of the sgemm peak in
``benchmark.extra_info`` (so they land in ``--benchmark-json``), and a GFLOP/s
table is printed at the end of the session.
"""

import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # benchmark the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

_RECORDS = []   # one dict per finished benchmark, for the terminal summary
_PEAK = {}      # the sgemm peak, measured once per session


def pytest_addoption(parser):
    group = parser.getgroup("fastrnn benchmarks")
    group.addoption("--fastrnn-threads", type=int, default=2,
                    help="threads for fastrnn and NumPy's BLAS in bench/ (default 2)")


@pytest.fixture(scope="session", autouse=True)
def fastrnn_threads(request):
    """Set fastrnn's and BLAS's thread count for the whole session."""
    import fastrnn
    n = request.config.getoption("--fastrnn-threads")
    setter = getattr(fastrnn, "set_num_threads", None)
    if setter is not None:
        setter(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield n
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield n


@pytest.fixture(scope="session")
def sgemm_peak(fastrnn_threads):
    """GFLOP/s of a float32 2048x2048 NumPy matmul with the session's threads."""
    if "gflops" not in _PEAK:
        from fastrnn.benchmark.runner import measure_sgemm_peak
        _PEAK["gflops"] = measure_sgemm_peak()
    return _PEAK["gflops"]


@pytest.fixture
def record_gflops(benchmark, sgemm_peak):
    """Call as ``record_gflops(flop)`` after ``benchmark(...)``: stores GFLOP/s
    (from the median and from the fastest round) and % of peak in extra_info."""
    def record(flop, **extra):
        info = benchmark.extra_info
        info["flop"] = int(flop)
        info["sgemm_peak_gflops"] = sgemm_peak
        info.update(extra)
        stats = getattr(benchmark, "stats", None)
        stats = getattr(stats, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return None
        info["gflops"] = flop / stats.median / 1e9
        info["gflops_best"] = flop / stats.min / 1e9
        info["pct_peak"] = 100.0 * info["gflops"] / sgemm_peak
        _RECORDS.append(dict(info, name=benchmark.name, median_ms=stats.median * 1e3))
        return info["gflops"]
    return record


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastrnn_threads"] = config.getoption("--fastrnn-threads")
    if "gflops" in _PEAK:
        machine_info["sgemm_peak_gflops"] = _PEAK["gflops"]


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return
    tr = terminalreporter
    tr.write_sep("-", f"fastrnn GFLOP/s (sgemm peak {_PEAK.get('gflops', 0):.1f} GFLOP/s)")
    tr.write_line(f"{'benchmark':<58}{'median ms':>11}{'GFLOP/s':>9}{'% peak':>8}")
    for r in _RECORDS:
        tr.write_line(f"{r['name'][:58]:<58}{r['median_ms']:>11.3f}{r['gflops']:>9.1f}"
                      f"{r['pct_peak']:>8.1f}")
    # mixed lengths: time ratio against length ratio
    by_key = {}
    for r in _RECORDS:
        if "lengths" in r:
            by_key.setdefault((r["cell"], r["mode"], r["dtype"]), {})[r["lengths"]] = r
    pairs = [(k, v) for k, v in by_key.items() if "full" in v and "mixed" in v]
    if pairs:
        tr.write_sep("-", "mixed lengths: time ratio should follow the length ratio")
        tr.write_line(f"{'cell':<10}{'mode':<9}{'dtype':<9}{'time ratio':>11}"
                      f"{'length ratio':>14}{'efficiency':>12}")
        for (cell, mode, dtype), v in pairs:
            time_ratio = v["mixed"]["median_ms"] / v["full"]["median_ms"]
            length_ratio = v["mixed"]["length_ratio"]
            tr.write_line(f"{cell:<10}{mode:<9}{dtype:<9}{time_ratio:>11.2f}"
                          f"{length_ratio:>14.2f}{length_ratio / time_ratio:>12.2f}")
