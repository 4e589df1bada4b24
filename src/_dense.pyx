# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dense layer kernels (fastrnn.nn.Linear): `forward` and `backward`.

Shapes: M rows (all leading axes flattened), K in features, N out features.

    y = x W^T + b                                   (M, N)
    dx = dy W,   dW^T = x^T dy                      (M, K), (K, N)

Why not NumPy: a language model's decoder runs between the recurrent kernels
every step. On NumPy's BLAS it either gets one core (its thread pool would
otherwise spin and take cores from the kernels' OpenMP team) or costs that
spinning; here it runs on the same packed micro-kernel and the same OpenMP
threads, and the result does not depend on the thread count.

Callers (fastrnn.nn.Linear) pass C-contiguous arrays of one dtype with
M, K, N >= 1 and check them first with messages naming the user's arguments; the
shape checks here only keep a caller's slip from reaching the kernels, which run
without the GIL.
"""
from libc.stdlib cimport free

from _simd cimport fastrnn_isa_set, fastrnn_isa_level, floating, gemm_rows
from _schedule cimport pack_matrix, row_pointers, scratch_free, scratch_release
from _gradients cimport rows_times_packed, columns_times_packed, dw_set_l2_bytes


def forward(floating[:, ::1] y, const floating[:, ::1] x, const floating[:, ::1] w,
            const floating[::1] bias, int n_threads, bint pack=True):
    """y (M, N) := x (M, K) W^T + bias; w (N, K), bias (N,) or None.

    pack=False reads W in place with the dot-product kernel on this thread: for a few
    rows (a decoder step in generation) packing W costs more than the product."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], N = w.shape[0], i, j
    cdef const floating *p_bias = &bias[0] if bias is not None else NULL
    cdef floating *packed_w = NULL
    cdef const floating **x_rows = NULL
    cdef floating **y_rows = NULL
    cdef int failed = 0
    if M < 1 or N < 1 or K < 1 or y.shape[0] != M or y.shape[1] != N or w.shape[1] != K or (
            bias is not None and bias.shape[0] != N):
        raise ValueError(f"dense forward: y ({y.shape[0]}, {y.shape[1]}), x ({M}, {K}), "
                         f"w ({N}, {w.shape[1]}), bias {None if bias is None else bias.shape[0]} "
                         f"do not match")
    with nogil:
        if pack:
            packed_w = pack_matrix(&w[0, 0], N, K, False, n_threads)      # W (N x K) packed
        x_rows = row_pointers(&x[0, 0], NULL, M, K)
        y_rows = <floating **> row_pointers(&y[0, 0], NULL, M, N)
        if (pack and packed_w == NULL) or x_rows == NULL or y_rows == NULL:
            failed = 1
        else:
            if pack:
                rows_times_packed(M, N, K, x_rows, packed_w, y_rows, n_threads)
            else:
                gemm_rows(M, N, K, x_rows, NULL, &w[0, 0], K, y_rows, 0)
            if p_bias != NULL:
                for i in range(M):
                    for j in range(N):
                        y[i, j] = y[i, j] + p_bias[j]
        scratch_free(packed_w); free(x_rows); free(y_rows)
    if failed:
        raise MemoryError("fastrnn dense forward: out of memory")


def backward(floating[:, ::1] dx, floating[:, ::1] dw_t, const floating[:, ::1] dy,
             const floating[:, ::1] x, const floating[:, ::1] w, int n_threads):
    """dx (M, K) := dy W;  dw_t (K, N) := x^T dy  (the transpose of dW, so that
    the K rows, usually many more than N, are what the threads share)."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], N = w.shape[0]
    cdef floating *packed_wt = NULL
    cdef floating *packed_dyt = NULL
    cdef const floating **dy_rows = NULL
    cdef const floating **x_rows = NULL
    cdef floating **dx_rows = NULL
    cdef const floating *packs[1]
    cdef floating *outs[1]
    cdef Py_ssize_t Ns[1]
    cdef int failed = 0
    if M < 1 or N < 1 or K < 1 or w.shape[1] != K or dx.shape[0] != M or dx.shape[1] != K \
            or dw_t.shape[0] != K or dw_t.shape[1] != N or dy.shape[0] != M or dy.shape[1] != N:
        raise ValueError(f"dense backward: dx ({dx.shape[0]}, {dx.shape[1]}), dw_t "
                         f"({dw_t.shape[0]}, {dw_t.shape[1]}), dy ({dy.shape[0]}, {dy.shape[1]}), "
                         f"x ({M}, {K}), w ({N}, {w.shape[1]}) do not match")
    with nogil:
        packed_wt = pack_matrix(&w[0, 0], N, K, True, n_threads)     # W^T (K x N) packed
        packed_dyt = pack_matrix(&dy[0, 0], M, N, True, n_threads)   # dy^T (N x M) packed
        dy_rows = row_pointers(&dy[0, 0], NULL, M, N)
        x_rows = row_pointers(&x[0, 0], NULL, M, K)
        dx_rows = <floating **> row_pointers(&dx[0, 0], NULL, M, K)
        if (packed_wt == NULL or packed_dyt == NULL or dy_rows == NULL or x_rows == NULL
                or dx_rows == NULL):
            failed = 1
        else:
            Ns[0] = N
            packs[0] = packed_dyt
            outs[0] = &dw_t[0, 0]
            rows_times_packed(M, K, N, dy_rows, packed_wt, dx_rows, n_threads)
            failed = columns_times_packed(K, M, x_rows, 1, Ns, packs, outs, n_threads) != 0
        scratch_free(packed_wt); scratch_free(packed_dyt); free(dy_rows); free(x_rows); free(dx_rows)
    if failed:
        raise MemoryError("fastrnn dense backward: out of memory")


def _set_l2_bytes(Py_ssize_t l2):
    """Size the dW GEMM's tasks for a core's L2 of l2 bytes (0: unknown; _gradients.pxd)."""
    dw_set_l2_bytes(l2)


def _set_isa(int level):
    """Run this module's kernels at ISA `level` (src/isa.h); False if the CPU lacks it.
    Called by fastrnn._isa for every kernel module at once."""
    return fastrnn_isa_set(level) == 0


def _release_scratch():
    """Free the packed-weight buffers this module keeps between calls (src/scratch.h)."""
    scratch_release()


def _isa_level():
    """The ISA level this module's kernels run at."""
    return fastrnn_isa_level()
