# The driver's bf16 GEMMs (bf16_gemm.h): float32 layers under
# set_float32_matmul_precision("medium"). Weights are packed here, per call
# (eval calls: kept while they do not change, _pack_cache.pxd), in the same
# thread slices as the float32 packing (_schedule.pxd).
from cython.parallel cimport prange
from libc.stdint cimport uint16_t, uint64_t
from libc.stdlib cimport malloc, free
from _schedule cimport scratch_alloc, scratch_free, unit_start, slice_rows, task_rows
from _pack_cache cimport (PackLayout, PACK_BF16_GATE_SLICES, find_packed, keep_packed,
                          packed_buffer)

DEF ROW_BLOCK = 48   # most output rows per task in the after-loop GEMMs (task_rows)
DEF BF16_TILE_ROWS = 8   # QG_MR


cdef extern from "bf16_gemm.h" nogil:
    int fastrnn_bf16_level()
    int fastrnn_bf16_amx()
    enum: QG_AVX512_BF16   # fastrnn_bf16_level(): vdpbf16ps (quant_gemm.h)
    size_t fastrnn_bf16_packed_bytes(Py_ssize_t N, Py_ssize_t K)
    Py_ssize_t fastrnn_bf16_panel_values(Py_ssize_t K)
    void fastrnn_bf16_pack(uint16_t *packed, const float *const *rows, Py_ssize_t N,
                           Py_ssize_t K, int transposed, Py_ssize_t p0, Py_ssize_t p1)
    size_t fastrnn_bf16_work_bytes(Py_ssize_t M, Py_ssize_t K)
    const void *const *fastrnn_bf16_prepare_cols(Py_ssize_t M, Py_ssize_t K,
                                                 const float *const *cols, Py_ssize_t col0,
                                                 void *work)
    void fastrnn_bf16_gemm_prepared(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                                    const void *const *arow, const uint16_t *packed,
                                    float *const *C, float beta)
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
                                       int nslices, int n_threads, bint cache=False,
                                       const uint64_t *digest_of_w=NULL) noexcept nogil:
    """gate_slices (_schedule.pxd) in bf16 panels: slice k holds rows g*H + j of
    W (G*H x K) for g < G and j in [unit_start(k), unit_start(k + 1)), gate by
    gate. cache, digest_of_w: as gate_slices'. NULL if out of memory; give it back
    with slices_free."""
    cdef size_t nbytes = bf16_slice_offset(G, H, K, nslices, nslices) * sizeof(uint16_t) + 1
    cdef PackLayout layout
    cdef uint64_t digest = 0
    cdef uint16_t *buf
    buf = <uint16_t *> find_packed(&cache, PACK_BF16_GATE_SLICES, W, sizeof(float), nslices,
                                   G, H, K, n_threads, &layout, &digest, digest_of_w)
    if buf != NULL:
        return buf
    buf = <uint16_t *> packed_buffer(cache, &layout, nbytes)
    cdef const float **rows = <const float **> malloc(G * H * sizeof(void *) + 1)
    cdef Py_ssize_t n
    cdef int k
    if buf == NULL or rows == NULL:
        scratch_free(buf)
        free(rows)
        return NULL
    for k in range(nslices):
        n = slice_rows(rows, W, G, H, K, nslices, k)
        bf16_pack_parallel(buf + bf16_slice_offset(G, H, K, nslices, k), rows, n, K, False,
                           n_threads)
    free(rows)
    if cache:
        keep_packed(buf, nbytes, &layout, digest)
    return buf


cdef inline int bf16_rows_times_packed(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                                       const float **A, const uint16_t *packed, float **C,
                                       int n_threads) noexcept nogil:
    """C[i] (N values) := bf16(A[i]) . W^T for i < M, W (N x K) in bf16 panels.
    0, or -1 if out of memory."""
    cdef Py_ssize_t rb = task_rows(M, BF16_TILE_ROWS, ROW_BLOCK, n_threads)
    cdef Py_ssize_t blk, nblk = (M + rb - 1) // rb, r0, r1
    cdef void *work
    cdef int failed = 0
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        r0 = blk * rb
        r1 = min(M, r0 + rb)
        work = malloc(fastrnn_bf16_work_bytes(ROW_BLOCK, K))   # private to the task
        if work == NULL:
            failed += 1
        else:
            fastrnn_bf16_gemm(r1 - r0, N, K, A + r0, packed, C + r0, 0, work)
        free(work)
    return -1 if failed else 0


cdef inline int bf16_columns_times_packed(Py_ssize_t M, Py_ssize_t K, const float **A, int nout,
                                          const Py_ssize_t *Ns, const uint16_t **packs,
                                          float **Cs, int n_threads,
                                          float beta=0) noexcept nogil:
    """Cs[q] (M x Ns[q], row-major) := beta*Cs[q] + bf16(A)^T . W_q^T for q < nout, W_q in bf16
    panels, A the K x M matrix with rows A[k]: its columns are rounded once for
    all outputs. 0, or -1 if out of memory."""
    cdef Py_ssize_t rb = task_rows(M, BF16_TILE_ROWS, ROW_BLOCK, n_threads)
    cdef Py_ssize_t blk, nblk = (M + rb - 1) // rb, r, r0, r1
    cdef float **c_rows
    cdef void *work
    cdef const void *const *arow
    cdef int q, failed = 0
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        r0 = blk * rb
        r1 = min(M, r0 + rb)
        c_rows = <float **> malloc(ROW_BLOCK * sizeof(void *))
        work = malloc(fastrnn_bf16_work_bytes(ROW_BLOCK, K))
        if c_rows == NULL or work == NULL:
            failed += 1
        else:
            arow = fastrnn_bf16_prepare_cols(r1 - r0, K, A, r0, work)
            for q in range(nout):
                for r in range(r0, r1):
                    c_rows[r - r0] = Cs[q] + r * Ns[q]
                fastrnn_bf16_gemm_prepared(r1 - r0, Ns[q], K, arow, packs[q], c_rows, beta)
        free(c_rows)
        free(work)
    return -1 if failed else 0


cdef inline uint16_t *bf16_packed_columns(const float **rows, Py_ssize_t N, Py_ssize_t K,
                                          int n_threads) noexcept nogil:
    """bf16 panels of the N x K matrix with element (n, k) at rows[k][n] (x^T, h^T
    over the rows that exist). NULL if out of memory; give it back with scratch_free."""
    cdef uint16_t *packed = <uint16_t *> scratch_alloc(fastrnn_bf16_packed_bytes(N, K) + 1)
    if packed != NULL:
        bf16_pack_parallel(packed, rows, N, K, True, n_threads)
    return packed

