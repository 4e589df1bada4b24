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
    #if defined(_OPENMP) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
    #include <dlfcn.h>
    /* Looked up at run time in the libgomp that is loaded (found by one of its symbols):
     * a link-time reference would need its OMP_5.0 symbol version, and a libgomp older
     * than GCC 9's would then stop the module from loading. */
    static int fastrnn_omp_pause(void)
    {
        static int (*pause_all)(int);
        static int looked;
        if (!looked) {
            Dl_info info;
            if (dladdr((void *)omp_get_max_threads, &info) && info.dli_fname) {
                void *lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
                if (lib) {
                    pause_all = (int (*)(int))dlsym(lib, "omp_pause_resource_all");
                    dlclose(lib);    /* (NOLOAD: the library stays, as it was loaded) */
                }
            }
            looked = 1;
        }
        return pause_all ? pause_all(1 /* omp_pause_soft */) : -1;
    }
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
