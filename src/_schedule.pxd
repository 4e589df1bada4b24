# How a layer's batch is walked: shared by the RNN, LSTM and GRU kernels.
#
# The Python side sorts batch rows by decreasing length and cuts them into one
# contiguous chunk per thread (balanced by total length). A thread owns its
# chunk for the whole sequence, so the time loop needs no barrier, and at step
# s the rows still running are a prefix of the chunk: finished sequences drop
# out of the GEMM and cost nothing.
from cython.parallel cimport prange
from _simd cimport floating, pack, n_panels


cdef inline Py_ssize_t time_index(Py_ssize_t s, Py_ssize_t length, bint reverse) noexcept nogil:
    """Time index read at step s by a sequence of this length.

    Forward runs t = 0..length-1; reverse runs t = length-1..0, so each
    sequence starts at its own last valid step.
    """
    return length - 1 - s if reverse else s


cdef inline Py_ssize_t n_active(const Py_ssize_t *rows, Py_ssize_t nrows,
                                const Py_ssize_t *lengths, Py_ssize_t s) noexcept nogil:
    """Rows (a prefix of `rows`, sorted by decreasing length) still running at step s."""
    cdef Py_ssize_t n = nrows
    while n > 0 and lengths[rows[n - 1]] <= s:
        n -= 1
    return n


cdef inline void pack_parallel(floating *packed, const floating *W, Py_ssize_t N,
                               Py_ssize_t K, Py_ssize_t rs, Py_ssize_t cs,
                               int n_threads) noexcept nogil:
    """packed := panel layout of W (N x K, W[n][k] at W + n*rs + k*cs), panels split over threads."""
    cdef Py_ssize_t p, npan = n_panels(packed, N)
    for p in prange(npan, schedule='static', num_threads=n_threads):
        pack(packed, W, N, K, rs, cs, p, p + 1)


cdef extern from "omp_helpers.h" nogil:
    int fastrnn_thread_num()
    int fastrnn_team_size()
    void fastrnn_barrier()


cdef inline void unit_range(Py_ssize_t H, int tid, int nthr, Py_ssize_t *j0, Py_ssize_t *j1) noexcept nogil:
    """Hidden units [j0, j1) owned by thread tid of nthr (contiguous, multiples of 8 where possible)."""
    cdef Py_ssize_t per = (H + nthr - 1) // nthr
    per = ((per + 7) // 8) * 8
    j0[0] = min(H, tid * per)
    j1[0] = min(H, j0[0] + per)
