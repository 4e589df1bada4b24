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
from _simd cimport floating, gemm_rows_strided
from _schedule cimport pack_transpose

DEF ROW_BLOCK = 48   # output rows per task: a multiple of the 6-row micro-tile


cdef inline int gemm_parallel(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating *A,
                              Py_ssize_t row_step, Py_ssize_t k_step, const floating *packed,
                              floating *C, int n_threads) noexcept nogil:
    """C (M x N) := A . W^T, A[i][k] at A + i*row_step + k*k_step, W (N x K) given packed.

    0, or -1 if out of memory. (row_step, k_step) = (K, 1) reads A as stored,
    (1, lda) reads it transposed without a copy.
    """
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
                a_rows[r - r0] = A + r * row_step
                c_rows[r - r0] = C + r * N
            gemm_rows_strided(r1 - r0, N, K, a_rows, k_step, packed, c_rows, 0)
        free(a_rows)
        free(c_rows)
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
    cdef int status = -1
    if w_ih_t != NULL and x_t != NULL and h_t != NULL:
        # dgx^T and dgh^T are read in place: row i is column i, TB values GH apart
        status = (gemm_parallel(TB, I, GH, dgx, GH, 1, w_ih_t, dx, n_threads)
                  + gemm_parallel(GH, I, TB, dgx, 1, GH, x_t, dw_ih, n_threads)
                  + gemm_parallel(GH, H, TB, dgh, 1, GH, h_t, dw_hh, n_threads))
        status = -1 if status != 0 else 0
    free(w_ih_t); free(x_t); free(h_t)
    return status
