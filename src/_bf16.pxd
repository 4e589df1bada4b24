# The driver's bf16 GEMMs (bf16_gemm.h): float32 layers under
# set_float32_matmul_precision("medium"). Weights are packed here, once per
# call, in the same thread slices as the float32 packing (_schedule.pxd).
from cython.parallel cimport prange
from libc.stdint cimport uint16_t
from libc.stdlib cimport malloc, free
from _schedule cimport scratch_alloc, scratch_free, unit_start


cdef extern from "bf16_gemm.h" nogil:
    int fastrnn_bf16_level()
    size_t fastrnn_bf16_packed_bytes(Py_ssize_t N, Py_ssize_t K)
    Py_ssize_t fastrnn_bf16_panel_values(Py_ssize_t K)
    void fastrnn_bf16_pack(uint16_t *packed, const float *const *rows, Py_ssize_t N,
                           Py_ssize_t K, int transposed, Py_ssize_t p0, Py_ssize_t p1)
    size_t fastrnn_bf16_work_bytes(Py_ssize_t M, Py_ssize_t K)
    void fastrnn_bf16_gemm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float *const *A,
                           const uint16_t *packed, float *const *C, float beta, void *work)
    enum: FASTRNN_BF16_NR


cdef inline void bf16_pack_parallel(uint16_t *packed, const float **rows, Py_ssize_t N,
                                    Py_ssize_t K, bint transposed, int n_threads) noexcept nogil:
    """packed := the N x K matrix with element (n, k) at rows[n][k] (rows[k][n] when
    `transposed`) in bf16 panels; panels split over threads."""
    cdef Py_ssize_t p, npan = (N + FASTRNN_BF16_NR - 1) // FASTRNN_BF16_NR
    for p in prange(npan, schedule='static', num_threads=n_threads):
        fastrnn_bf16_pack(packed, rows, N, K, transposed, p, p + 1)


cdef inline uint16_t *bf16_pack_matrix(const float *W, Py_ssize_t N, Py_ssize_t K,
                                       bint transposed, int n_threads) noexcept nogil:
    """bf16 panels of W (N x K, row-major) or, when `transposed`, of W^T (K x N).
    NULL if out of memory; give it back with scratch_free."""
    cdef Py_ssize_t R = K if transposed else N, C = N if transposed else K, r
    cdef const float **rows = <const float **> malloc(N * sizeof(void *) + 1)
    cdef uint16_t *packed = <uint16_t *> scratch_alloc(fastrnn_bf16_packed_bytes(R, C) + 1)
    if rows == NULL or packed == NULL:
        free(rows)
        scratch_free(packed)
        return NULL
    for r in range(N):
        rows[r] = W + r * K
    bf16_pack_parallel(packed, rows, R, C, transposed, n_threads)
    free(rows)
    return packed


cdef inline Py_ssize_t bf16_slice_offset(Py_ssize_t G, Py_ssize_t H, Py_ssize_t K,
                                         int nslices, int k) noexcept nogil:
    """Where slice k starts in the buffer of bf16_gate_slices (in uint16 values)."""
    cdef Py_ssize_t off = 0, hk
    cdef int q
    for q in range(k):
        hk = unit_start(H, q + 1, nslices) - unit_start(H, q, nslices)
        off += (G * hk + FASTRNN_BF16_NR - 1) // FASTRNN_BF16_NR * fastrnn_bf16_panel_values(K)
    return off


cdef inline uint16_t *bf16_gate_slices(const float *W, Py_ssize_t G, Py_ssize_t H, Py_ssize_t K,
                                       int nslices, int n_threads) noexcept nogil:
    """gate_slices (_schedule.pxd) in bf16 panels: slice k holds rows g*H + j of
    W (G*H x K) for g < G and j in [unit_start(k), unit_start(k + 1)), gate by
    gate. NULL if out of memory; give it back with scratch_free."""
    cdef uint16_t *buf = <uint16_t *> scratch_alloc(
        bf16_slice_offset(G, H, K, nslices, nslices) * sizeof(uint16_t) + 1)
    cdef const float **rows = <const float **> malloc(G * H * sizeof(void *) + 1)
    cdef Py_ssize_t j0, j1, g, j, n
    cdef int k
    if buf == NULL or rows == NULL:
        scratch_free(buf)
        free(rows)
        return NULL
    for k in range(nslices):
        j0 = unit_start(H, k, nslices)
        j1 = unit_start(H, k + 1, nslices)
        n = 0
        for g in range(G):
            for j in range(j0, j1):
                rows[n] = W + (g * H + j) * K
                n = n + 1
        bf16_pack_parallel(buf + bf16_slice_offset(G, H, K, nslices, k), rows, n, K, False,
                           n_threads)
    free(rows)
    return buf
