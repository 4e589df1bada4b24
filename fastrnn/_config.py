"""Thread control: one number for the OpenMP kernels and the BLAS they call.

The time loop runs in OpenMP threads, each owning batch rows for the whole
sequence; the one-off GEMMs of backward run in scipy's BLAS. Both use
`get_num_threads()` threads. The BLAS limit is set here once, when the number
changes, because entering threadpoolctl costs about 0.6 ms: never on a hot path.
Only scipy's BLAS is limited (the kernels link it); NumPy's is left alone.
"""

import os

import scipy
import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS the kernels call)

from fastrnn import _openmp

__all__ = ["set_num_threads", "get_num_threads", "config", "show_config"]


def _default_threads():
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env.split(",")[0])
            if n >= 1:
                return n
        except ValueError:
            pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_num_threads = 1


def _scipy_blas(controller):
    """threadpoolctl entries for the BLAS shipped with scipy (the one the kernels call)."""
    scipy_dir = os.path.dirname(os.path.dirname(scipy.__file__))
    return [lib for lib in controller.lib_controllers
            if lib.user_api == "blas" and "scipy" in os.path.relpath(lib.filepath, scipy_dir)]


def set_num_threads(n):
    """Use n threads in the kernels (OpenMP) and in scipy's BLAS. Without OpenMP, 1."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _num_threads = n if _openmp.openmp_enabled() else 1
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional at run time: BLAS then keeps its own setting
        return
    for lib in _scipy_blas(ThreadpoolController()):
        lib.set_num_threads(_num_threads)


def get_num_threads():
    """Threads the kernels use (default: OMP_NUM_THREADS, else all usable cores)."""
    return _num_threads


def config():
    """Build and run-time configuration as a dict."""
    blas = []
    try:
        from threadpoolctl import ThreadpoolController
        blas = [{"internal_api": lib.internal_api, "version": lib.version,
                 "num_threads": lib.num_threads, "filepath": lib.filepath}
                for lib in _scipy_blas(ThreadpoolController())]
    except ImportError:
        pass
    import numpy
    from fastrnn import __version__
    return {
        "fastrnn": __version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "openmp": _openmp.openmp_enabled(),
        "num_threads": _num_threads,
        "omp_max_threads": _openmp.omp_max_threads(),
        "blas": blas,
        "simd_dispatch": "x86-64-v3 (AVX2+FMA) or baseline, chosen at load time",
    }


def show_config():
    """Print `config()` in a readable form."""
    cfg = config()
    print(f"fastrnn {cfg['fastrnn']} (numpy {cfg['numpy']}, scipy {cfg['scipy']})")
    print(f"  OpenMP compiled in: {'yes' if cfg['openmp'] else 'no (single thread)'}")
    print(f"  threads:            {cfg['num_threads']}")
    for lib in cfg["blas"] or [{"internal_api": "unknown", "version": "", "num_threads": "?",
                                "filepath": ""}]:
        print(f"  BLAS:               {lib['internal_api']} {lib['version'] or ''} "
              f"({lib['num_threads']} threads) {lib['filepath']}")
    print(f"  micro-kernels:      {cfg['simd_dispatch']}")


set_num_threads(_default_threads())
