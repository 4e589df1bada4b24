"""Thread control for the kernels.

The kernels run on `get_num_threads()` threads. Training runs in one OpenMP
team: the time loop, the packing and the GEMMs of backward alike. Eval calls
run on fastrnn's own worker pool instead (src/team_pool.h), whose calling thread
never waits for a worker that is not awake: after an idle spell a call starts
alone and a worker joins when it runs (on a VM, waking an idle vCPU took ~10 ms).
The pool's waiting workers yield their CPU, so they do not spin away an OpenMP
thread's time. The kernels call no BLAS. NumPy's own BLAS (used by
`fastrnn.nn.Linear` and other NumPy code) is left alone; it is reported by
`config()` for information.
"""

import os

from fastrnn import _isa, _openmp, _openmp_wait, _precision, _recurrent

__all__ = ["set_num_threads", "get_num_threads", "config", "show_config"]


MAX_THREADS = 1 << 12   # a team's size is a C int in the kernels; no CPU has more


def _default_threads():
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        first = env.split(",")[0].strip()
        # ASCII digits only, as libgomp reads it (Python's int() also takes "1_0", "٣")
        if first.isascii() and first.isdigit() and 1 <= int(first) <= MAX_THREADS:
            return int(first)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_num_threads = 1


def set_num_threads(n):
    """Use n threads in the kernels (OpenMP, and the eval calls' worker pool). Without
    OpenMP compiled in, always 1."""
    global _num_threads
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    n = int(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n must be in [1, {MAX_THREADS}], got {n}")
    _num_threads = n if _openmp.openmp_enabled() else 1


def get_num_threads():
    """Threads the kernels use (default: OMP_NUM_THREADS, else all usable cores)."""
    return _num_threads


def release_memory():
    """Free the buffers the kernels keep between calls for packed weights (and,
    in the quantised kernels, for their per-call work, and for training caches).

    Each call packs its weights into a buffer that is then kept (up to 256 MB
    idle in all per kernel module), so the next call does not pay for fresh
    pages. Eval (inference) calls also keep the packed weights themselves, found
    again by a digest of the weights' contents (up to 16 copies and 256 MB per
    kernel module; src/pack_cache.h). Training caches and backward's work
    arrays live on memory kept the same way (up to 256 MB idle; src/_buffers.pyx).
    This gives all of it back to the system. Safe at any time: buffers in use by
    a running call or an array are left alone.
    """
    import importlib
    # _quantized: its work buffers; _buffers: the memory of training caches
    for name in _isa.KERNEL_MODULES + ("_quantized", "_buffers"):
        importlib.import_module(f"fastrnn.{name}")._release_scratch()


def config():
    """Build and run-time configuration as a dict."""
    numpy_blas = []
    try:
        from threadpoolctl import ThreadpoolController
        numpy_blas = [{"internal_api": lib.internal_api, "version": lib.version,
                       "num_threads": lib.num_threads, "filepath": lib.filepath}
                      for lib in ThreadpoolController().lib_controllers
                      if lib.user_api == "blas"]
    except ImportError:
        pass
    import numpy
    from fastrnn import __version__, quantization
    return {
        "fastrnn": __version__,
        "numpy": numpy.__version__,
        "openmp": _openmp.openmp_enabled(),
        "num_threads": _num_threads,
        "omp_max_threads": _openmp.omp_max_threads(),
        "kernel_blas": "none: packed micro-kernels (src/recurrent_gemm.h) for every GEMM",
        "numpy_blas": numpy_blas,
        "cpu": _isa.cpu_model(),
        "cpu_vector_flags": _isa.cpu_vector_flags(),
        "isa": _isa.get_isa(),
        "isas_available": _isa.available_isas(),
        "isa_forced": _isa.forced_by(),
        "quantized_isa": quantization.isa(),
        "quantized_bf16_auto": "dynamic" if quantization.bf16_auto_is_dynamic() else "weight_only",
        "matmul_precision": _precision.get_float32_matmul_precision(),
        "medium_runs": "bf16" if _precision.medium_runs_bf16() else "float32",
        # the bf16 GEMMs' instructions at this ISA: AMX tiles, vdpbf16ps, or widened to float32
        "bf16_gemm": _recurrent._bf16_gemm(),
        "pack_cache": _recurrent._pack_cache_enabled(),
        "eval_pool_workers": _recurrent.pool_stats()["workers"],
        "openmp_spin_window_ms": _openmp_spin_window_ms(),
    }


def show_config():
    """Print `config()` in a readable form."""
    cfg = config()
    print(f"fastrnn {cfg['fastrnn']} (numpy {cfg['numpy']})")
    print(f"  OpenMP compiled in: {'yes' if cfg['openmp'] else 'no (single thread)'}")
    print(f"  threads:            {cfg['num_threads']} (eval calls: own worker pool, "
          f"{cfg['eval_pool_workers']} workers started; training: OpenMP)")
    window = cfg["openmp_spin_window_ms"]
    window = "always" if window == float("inf") else f"{window:.1f} ms"
    print(f"  after training:     eval calls run alone while OpenMP may spin ({window}: "
          "OMP_WAIT_POLICY, GOMP_SPINCOUNT)")
    print(f"  BLAS in kernels:    {cfg['kernel_blas']}")
    print(f"  CPU:                {cfg['cpu']}")
    print(f"  CPU vector ISAs:    {' '.join(cfg['cpu_vector_flags']) or 'unknown'}")
    forced = f" (FASTRNN_ISA={cfg['isa_forced']})" if cfg["isa_forced"] else ""
    print(f"  kernel ISA:         {cfg['isa']}{forced}; available: {', '.join(cfg['isas_available'])}")
    print(f"  quantised ISA:      {cfg['quantized_isa']} (bfloat16 mode 'auto' runs "
          f"{cfg['quantized_bf16_auto']})")
    print(f"  matmul precision:   {cfg['matmul_precision']} ('medium' runs "
          f"{cfg['medium_runs']} products here; bf16 GEMMs: {cfg['bf16_gemm']})")
    kept = ("kept between eval calls" if cfg["pack_cache"]
            else "packed per call (FASTRNN_PACK_CACHE=0)")
    print(f"  packed weights:     {kept}")
    for lib in cfg["numpy_blas"]:
        print(f"  NumPy's BLAS:       {lib['internal_api']} {lib['version'] or ''} "
              f"({lib['num_threads']} threads)")


def _openmp_spin_window_ms():
    """The pool's window after an OpenMP team now, in ms (inf: always)."""
    seconds = _recurrent.openmp_spin_window()
    return float("inf") if seconds >= 1e9 else seconds * 1e3


def _init_pack_cache():
    """FASTRNN_PACK_CACHE=0: eval calls do not keep their packed weights (for a
    process that must not hold the extra copies; release_memory())."""
    env = os.environ.get("FASTRNN_PACK_CACHE", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"FASTRNN_PACK_CACHE must be 0 or 1, got {env!r}")
    _recurrent._pack_cache_enable(env != "0")


set_num_threads(_default_threads())
_init_pack_cache()
_openmp_wait.configure()

# A fork child cannot use the OpenMP threads its parent's forking thread kept (GNU
# OpenMP waited for them forever: tests/test_fork.py); ending them just before a fork
# costs the parent's next threaded call a few microseconds to start them again.
if hasattr(os, "register_at_fork") and _openmp.openmp_enabled():
    os.register_at_fork(before=_openmp.pause_for_fork)
