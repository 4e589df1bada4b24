# The one-off GEMMs of backward, after the reverse loop, on the same packed
# micro-kernel and the same OpenMP threads as the time loop:
#
#     dx = dgx W_ih,   dw_ih = dgx^T x,   dw_hh = dgh^T h_prev
#
# Why not BLAS: handing the cores back and forth between a BLAS thread pool
# and the kernels' OpenMP threads every layer call left one pool spinning
# while the other worked (measured: LSTM backward 145 ms with scipy's
# OpenBLAS against 91 ms once its spinning was cut short). Output rows are cut
# into fixed blocks, so results do not depend on the thread count.
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from _simd cimport floating, gemm_rows, gemm_columns, tn_work_size
from _schedule cimport pack_transpose

DEF ROW_BLOCK = 48   # output rows per task: a multiple of the 6-row micro-tile


cdef inline int rows_times_packed(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating *A,
                                  const floating *packed, floating *C,
                                  int n_threads) noexcept nogil:
    """C (M x N) := A (M x K) . W^T, W (N x K) given packed. 0, or -1 if out of memory."""
    cdef Py_ssize_t blk, nblk = (M + ROW_BLOCK - 1) // ROW_BLOCK, r, r0, r1
    cdef const floating **a_rows
    cdef floating **c_rows
    cdef int failed = 0
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        r0 = blk * ROW_BLOCK
        r1 = min(M, r0 + ROW_BLOCK)
        a_rows = <const floating **> malloc(ROW_BLOCK * sizeof(void *))
        c_rows = <floating **> malloc(ROW_BLOCK * sizeof(void *))
        if a_rows == NULL or c_rows == NULL:
            failed += 1
        else:
            for r in range(r0, r1):
                a_rows[r - r0] = A + r * K
                c_rows[r - r0] = C + r * N
            gemm_rows(r1 - r0, N, K, a_rows, packed, NULL, 0, c_rows, 0)
        free(a_rows)
        free(c_rows)
    return -1 if failed else 0


cdef inline int columns_times_packed(Py_ssize_t M, Py_ssize_t K, const floating *A,
                                     int nout, const Py_ssize_t *Ns, const floating **packs,
                                     floating **Cs, int n_threads) noexcept nogil:
    """Cs[q] (M x Ns[q]) := A^T . W_q^T for q < nout (at most 2), A (K x M), W_q packed.

    A's columns are read once for all outputs. 0, or -1 if out of memory.
    """
    cdef Py_ssize_t blk, nblk = (M + ROW_BLOCK - 1) // ROW_BLOCK, r, r0, r1
    cdef floating **c_rows
    cdef floating ***c_sets
    cdef floating *work
    cdef int q, failed = 0
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        r0 = blk * ROW_BLOCK
        r1 = min(M, r0 + ROW_BLOCK)
        # per-task buffers (assigned inside prange, so private to the thread)
        c_rows = <floating **> malloc(nout * ROW_BLOCK * sizeof(void *))
        c_sets = <floating ***> malloc(nout * sizeof(void *))
        work = <floating *> malloc(tn_work_size(A, ROW_BLOCK) * sizeof(floating))
        if c_rows == NULL or c_sets == NULL or work == NULL:
            failed += 1
        else:
            for q in range(nout):
                c_sets[q] = c_rows + q * ROW_BLOCK
                for r in range(r0, r1):
                    c_rows[q * ROW_BLOCK + r - r0] = Cs[q] + r * Ns[q]
            gemm_columns(r1 - r0, K, A + r0, M, nout, Ns, packs, c_sets, 0, work)
        free(c_rows)
        free(c_sets)
        free(work)
    return -1 if failed else 0


cdef inline int input_and_weight_gradients(
        floating *dx,               # OUT (TB, I)
        floating *dw_ih,            # OUT (GH, I)
        floating *dw_hh,            # OUT (GH, H)
        const floating *dgx,        # IN  (TB, GH) dL/d(x W_ih^T)
        const floating *dgh,        # IN  (TB, GH) dL/d(h W_hh^T); the same array for RNN and LSTM
        const floating *x,          # IN  (TB, I)
        const floating *h_prev,     # IN  (TB, H) the state each step read
        const floating *w_ih,       # IN  (GH, I)
        Py_ssize_t TB, Py_ssize_t GH, Py_ssize_t I, Py_ssize_t H,
        int n_threads) noexcept nogil:
    """dx = dgx W_ih; dw_ih = dgx^T x; dw_hh = dgh^T h_prev. 0, or -1 if out of memory."""
    cdef floating *w_ih_t = pack_transpose(w_ih, GH, I, n_threads)   # W_ih^T (I x GH) packed
    cdef floating *x_t = pack_transpose(x, TB, I, n_threads)         # x^T (I x TB) packed
    cdef floating *h_t = pack_transpose(h_prev, TB, H, n_threads)    # h_prev^T (H x TB) packed
    cdef Py_ssize_t Ns[2]
    cdef const floating *packs[2]
    cdef floating *Cs[2]
    cdef int status = -1
    if w_ih_t != NULL and x_t != NULL and h_t != NULL:
        Ns[0] = I
        Ns[1] = H
        packs[0] = x_t
        packs[1] = h_t
        Cs[0] = dw_ih
        Cs[1] = dw_hh
        status = rows_times_packed(TB, I, GH, dgx, w_ih_t, dx, n_threads)
        if dgx == dgh:   # RNN, LSTM: one pass over da's columns for both weights
            status += columns_times_packed(GH, TB, dgx, 2, Ns, packs, Cs, n_threads)
        else:
            status += columns_times_packed(GH, TB, dgx, 1, Ns, packs, Cs, n_threads)
            status += columns_times_packed(GH, TB, dgh, 1, Ns + 1, packs + 1, Cs + 1, n_threads)
        status = -1 if status != 0 else 0
    free(w_ih_t); free(x_t); free(h_t)
    return status
