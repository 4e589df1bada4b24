"""Timing for the benchmarks: the same threads for every engine, the sgemm peak,
and interleaved medians (docs/benchmarks.md). Used by the runner and by its
--lengths and --memory reports, which import it rather than the runner."""

import gc
import math
import os
import time
from contextlib import contextmanager, nullcontext

import numpy as np

MIN_SAMPLE_DEFAULT = 0.02  # seconds one sample should last at least
QUIET_GAP_DEFAULT = 0.15   # seconds of sleep before each sample (see time_interleaved)
MIN_ROUNDS, MAX_ROUNDS = 3, 15


# ---------------------------------------------------------------------------
# threads and the sgemm peak
# ---------------------------------------------------------------------------

@contextmanager
def set_threads(n, peers):
    """Within the block, every engine uses ``n`` threads: fastrnn
    (``set_num_threads``), torch (when a peer) and NumPy's BLAS (threadpoolctl).
    The previous settings come back afterwards. ONNX Runtime takes its thread
    count per session (:class:`~fastrnn.benchmark.engines.OnnxEngine`)."""
    import fastrnn
    restore = []
    setter = getattr(fastrnn, "set_num_threads", None)
    if setter is not None:
        getter = getattr(fastrnn, "get_num_threads", None)
        if getter is not None:
            restore.append((setter, getter()))
        setter(n)
    if "torch" in peers:
        import torch
        restore.append((torch.set_num_threads, torch.get_num_threads()))
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(limits=n, user_api="blas")
    except ImportError:
        limits = nullcontext()
    try:
        with limits:
            yield n
    finally:
        for set_, old in reversed(restore):
            set_(old)


def measure_sgemm_peak(n=2048, repeats=5, dtype=np.float32):
    """GFLOP/s of an n x n NumPy matmul in ``dtype`` (float32: sgemm; float64, for
    float64 runs: dgemm, half the rate): the best of ``repeats`` after a warm-up
    (a peak, so the fastest call, not the median). NumPy's BLAS on this machine,
    not the FMA units' peak, which OpenBLAS nears but a kernel can pass."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def machine_load():
    """(1-minute load average, CPU count), or (None, CPU count) where unknown."""
    try:
        return os.getloadavg()[0], os.cpu_count()
    except (AttributeError, OSError):
        return None, os.cpu_count()


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

def _calls(engine):
    """The engine's context for a run of calls (torch: inference mode), if any."""
    timed_calls = getattr(engine, "timed_calls", None)
    return timed_calls() if timed_calls is not None else nullcontext()


def _sample(engine, number):
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with _calls(engine):
            t0 = time.perf_counter()
            for _ in range(number):
                engine.run()
            return (time.perf_counter() - t0) / number
    finally:
        if gc_was_enabled:
            gc.enable()


def _seconds_per_call(engine, min_sample):
    """Median seconds of back-to-back calls filling ``min_sample`` (at least
    one call): what sizes the samples. Sized from one call, a call that
    happened to wait for a waking worker thread (10 ms on the Zen 4 KVM guest,
    docs/benchmarks.md) made samples of a few calls, all just after the cold
    call: a 9 us LSTM step then read 38 us. The median, not the mean: one such
    call in the window would still count."""
    times = []
    with _calls(engine):
        start = time.perf_counter()
        while not times or time.perf_counter() - start < min_sample:
            t0 = time.perf_counter()
            engine.run()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_interleaved(engines, budget, repeats=None, warmup=1, min_sample=MIN_SAMPLE_DEFAULT,
                     first=None, quiet_gap=QUIET_GAP_DEFAULT):
    """Median seconds per call of each engine, timed round-robin.

    ``engines`` have each been called once already (the check call, whose
    durations ``first`` may give). ``warmup`` untimed warm-ups follow, each as
    many calls as fill ``min_sample`` (at least one), and the last one's median
    call sets the calls per sample (_seconds_per_call); with ``warmup=0`` the
    check calls' durations do. Before
    each sample the process sleeps ``quiet_gap`` seconds: every engine leaves
    worker threads that busy-wait for a while after a call (torch's OpenMP,
    ONNX Runtime's pool, OpenBLAS for up to ~0.1 s), and on a 2-core machine
    they would otherwise take cores from whichever engine is timed next.

    After that sleep the engine's worker threads are asleep, and on a virtual
    machine their idle vCPU must first be scheduled again by the host: the
    first call after idle paid 1-15 ms more than the next ones on the 2-core
    KVM guests measured (docs/benchmarks.md). Counted into the sample, that one
    call weighed by how many calls the sample has, i.e. by the call's length.
    So the first call after the gap is timed on its own (the *cold* call) and
    the sample is the warm calls after it.

    Returns ``{name: (median_seconds, rounds, number, cold_median_seconds)}``;
    ``cold_median_seconds`` is None without a quiet gap.
    """
    first = dict(first or {})
    for e in engines:
        if warmup > 0 or e.name not in first:
            for _ in range(max(1, warmup)):
                first[e.name] = _seconds_per_call(e, min_sample)
    number = {name: max(1, min(10000, math.ceil(min_sample / max(t, 1e-7))))
              for name, t in first.items()}
    cold_calls = 1 if quiet_gap > 0 else 0
    # a round: per engine the quiet gap, the cold call and the sample. The gap was
    # left out, so cases took several times their share of the budget and the last
    # rows of a grid had one sample (found by an audit)
    per_round = sum(quiet_gap + (number[n] + cold_calls) * first[n] for n in first)
    if repeats is not None:
        rounds = max(1, repeats)
    else:
        # at least MIN_ROUNDS whatever the budget: a median of fewer is not one (a
        # late case overruns the budget rather than print a one-sample figure)
        rounds = int(budget / per_round) if per_round > 0 else MAX_ROUNDS
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, rounds))
    times = {e.name: [] for e in engines}
    cold = {e.name: [] for e in engines}
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for e in order:
            if quiet_gap > 0:
                time.sleep(quiet_gap)
                cold[e.name].append(_sample(e, 1))
            times[e.name].append(_sample(e, number[e.name]))
    return {name: (float(np.median(ts)), rounds, number[name],
                   float(np.median(cold[name])) if cold[name] else None)
            for name, ts in times.items()}
