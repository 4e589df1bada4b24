# cython: language_level=3
"""What the kernels were built with: OpenMP or not, and OpenMP's view of threads."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fastrnn_openmp_enabled(void) { return 1; }
    static int fastrnn_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int fastrnn_openmp_enabled(void) { return 0; }
    static int fastrnn_omp_max_threads(void) { return 1; }
    #endif
    /* GNU OpenMP keeps the threads of the calling thread's parallel regions and is not
     * fork-safe: a child's first region of 2+ threads waits for threads it does not
     * have. Pausing (OpenMP 5.0; libgomp from GCC 9) ends them; the next region starts
     * new ones. LLVM's libomp handles a fork itself. -1: not available here. */
    #if defined(_OPENMP) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
    static int fastrnn_omp_pause(void) { return omp_pause_resource_all(omp_pause_soft); }
    #else
    static int fastrnn_omp_pause(void) { return -1; }
    #endif
    """
    int fastrnn_openmp_enabled()
    int fastrnn_omp_max_threads()
    int fastrnn_omp_pause()


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(fastrnn_openmp_enabled())


def omp_max_threads():
    """omp_get_max_threads() (honours OMP_NUM_THREADS), or 1 without OpenMP."""
    return fastrnn_omp_max_threads()


def pause_for_fork():
    """End the calling thread's OpenMP worker threads (GNU OpenMP), so that a process
    forked next can start its own: os.register_at_fork(before=...) in fastrnn._config.
    0 when done, else nonzero (no OpenMP, or a runtime without omp_pause_resource_all)."""
    return fastrnn_omp_pause()


cdef extern from "isa.h":
    int fastrnn_isa_supported(int level)
    int fastrnn_isa_best()


def isa_supported(int level):
    """Does this CPU support ISA `level` (0 baseline, 1 AVX2+FMA, 2 AVX-512; src/isa.h)?"""
    return bool(fastrnn_isa_supported(level))


def isa_best():
    """The best ISA level this CPU supports."""
    return fastrnn_isa_best()
