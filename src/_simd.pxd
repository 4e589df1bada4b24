# Fused-type front end to the C micro-kernels (recurrent_gemm.h). Every function
# here is nogil and single-threaded: callers run it on their own rows inside an
# OpenMP region.
ctypedef fused floating:
    float
    double


cdef extern from "isa.h" nogil:
    int fastrnn_isa_supported(int level)   # 0 baseline, 1 AVX2+FMA, 2 AVX-512 (F/BW/DQ/VL)
    int fastrnn_isa_level()                # the level this module's kernels run at
    int fastrnn_isa_set(int level)         # 0, or -1 if the CPU lacks it


cdef extern from "recurrent_gemm.h" nogil:
    Py_ssize_t fastrnn_panel_width_s()
    Py_ssize_t fastrnn_panel_width_d()
    void fastrnn_pack_s(float *packed, const float *const *rows, Py_ssize_t N, Py_ssize_t K,
                        Py_ssize_t p0, Py_ssize_t p1)
    void fastrnn_pack_d(double *packed, const double *const *rows, Py_ssize_t N, Py_ssize_t K,
                        Py_ssize_t p0, Py_ssize_t p1)
    void fastrnn_pack_t_s(float *packed, const float *const *cols, Py_ssize_t N, Py_ssize_t K,
                          Py_ssize_t k0, Py_ssize_t k1)
    void fastrnn_pack_t_d(double *packed, const double *const *cols, Py_ssize_t N, Py_ssize_t K,
                          Py_ssize_t k0, Py_ssize_t k1)
    void fastrnn_gemm_packed_s(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                               const float *const *A, const float *packed,
                               float *const *C, float beta)
    void fastrnn_gemm_packed_d(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                               const double *const *A, const double *packed,
                               double *const *C, double beta)
    Py_ssize_t FASTRNN_KC   # the GEMMs' K block (recurrent_gemm.h)
    size_t fastrnn_tn_work_size_s(Py_ssize_t M)
    size_t fastrnn_tn_work_size_d(Py_ssize_t M)
    void fastrnn_gemm_packed_tn_s(Py_ssize_t M, Py_ssize_t K, const float *const *A,
                                  Py_ssize_t col0, int nout, const Py_ssize_t *Ns,
                                  const float *const *packs, float ***Cs,
                                  float beta, float *work, float *colsum)
    void fastrnn_gemm_packed_tn_d(Py_ssize_t M, Py_ssize_t K, const double *const *A,
                                  Py_ssize_t col0, int nout, const Py_ssize_t *Ns,
                                  const double *const *packs, double ***Cs,
                                  double beta, double *work, double *colsum)
    void fastrnn_gemm_dot_s(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                            const float *const *A, const float *W, Py_ssize_t ldw,
                            float *const *C, float beta)
    void fastrnn_gemm_dot_d(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                            const double *const *A, const double *W, Py_ssize_t ldw,
                            double *const *C, double beta)
    Py_ssize_t FASTRNN_NN_MAX_ROWS   # rows gemm_nn reads W once for
    void fastrnn_gemm_nn_s(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                           const float *const *A, const float *W, Py_ssize_t ldw,
                           float *const *C, Py_ssize_t c0, float beta)
    void fastrnn_gemm_nn_d(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                           const double *const *A, const double *W, Py_ssize_t ldw,
                           double *const *C, Py_ssize_t c0, double beta)



cdef inline void pack(floating *packed, const floating **rows, Py_ssize_t N, Py_ssize_t K,
                      Py_ssize_t p0, Py_ssize_t p1) noexcept nogil:
    """packed := panels [p0, p1) of the N x K matrix with row n at rows[n]."""
    if floating is float:
        fastrnn_pack_s(packed, rows, N, K, p0, p1)
    else:
        fastrnn_pack_d(packed, rows, N, K, p0, p1)


cdef inline void pack_t(floating *packed, const floating **cols, Py_ssize_t N, Py_ssize_t K,
                        Py_ssize_t k0, Py_ssize_t k1) noexcept nogil:
    """packed := rows [k0, k1) of every panel of the N x K matrix with element (n, k)
    at cols[k][n] (each cols[k] read once, start to end)."""
    if floating is float:
        fastrnn_pack_t_s(packed, cols, N, K, k0, k1)
    else:
        fastrnn_pack_t_d(packed, cols, N, K, k0, k1)


cdef inline Py_ssize_t panel_width(floating *dtype_tag) noexcept nogil:
    """Output columns per packed panel: two vector registers of the current ISA
    (32 floats / 16 doubles on AVX-512, 16 / 8 on AVX2 and baseline)."""
    if floating is float:
        return fastrnn_panel_width_s()
    else:
        return fastrnn_panel_width_d()


cdef inline Py_ssize_t n_panels(floating *dtype_tag, Py_ssize_t N) noexcept nogil:
    """Panels of output columns in a packed matrix with N rows."""
    cdef Py_ssize_t nr = panel_width(dtype_tag)
    return (N + nr - 1) // nr


cdef inline void gemm_rows(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                           const floating **A, const floating *packed,
                           const floating *W, Py_ssize_t ldw,
                           floating **C, floating beta) noexcept nogil:
    """C[i] := beta*C[i] + A[i] . W^T for i < M (row pointers); W (N x K).

    Uses the packed copy when given, else the unpacked dot-product kernel.
    """
    if M <= 0:
        return
    if floating is float:
        if packed != NULL:
            fastrnn_gemm_packed_s(M, N, K, A, packed, C, beta)
        else:
            fastrnn_gemm_dot_s(M, N, K, A, W, ldw, C, beta)
    else:
        if packed != NULL:
            fastrnn_gemm_packed_d(M, N, K, A, packed, C, beta)
        else:
            fastrnn_gemm_dot_d(M, N, K, A, W, ldw, C, beta)


cdef inline void gemm_nn(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating **A,
                         const floating *W, Py_ssize_t ldw, floating **C, Py_ssize_t c0,
                         floating beta) noexcept nogil:
    """C[i][c0:c0+N] := beta*C[i][c0:c0+N] + A[i] . W for i < M, W row-major (K x N,
    row stride ldw) read in place: bitwise gemm_rows of W^T packed."""
    if M <= 0 or N <= 0:
        return
    if floating is float:
        fastrnn_gemm_nn_s(M, N, K, A, W, ldw, C, c0, beta)
    else:
        fastrnn_gemm_nn_d(M, N, K, A, W, ldw, C, c0, beta)


cdef inline size_t tn_work_size(floating *dtype_tag, Py_ssize_t M) noexcept nogil:
    """Workspace values gemm_columns needs for M output rows."""
    if floating is float:
        return fastrnn_tn_work_size_s(M)
    else:
        return fastrnn_tn_work_size_d(M)


cdef inline void gemm_columns(Py_ssize_t M, Py_ssize_t K, const floating **A, Py_ssize_t col0,
                              int nout, const Py_ssize_t *Ns, const floating **packs,
                              floating ***Cs, floating beta, floating *work,
                              floating *colsum) noexcept nogil:
    """Cs[q][i] := beta*Cs[q][i] + sum_k A[k][col0 + i] W_q[:, k] for i < M, q < nout:
    columns of the K x (col0 + M) matrix with rows A[k], read once for all
    outputs; W_q (Ns[q] x K) packed. colsum (or NULL): colsum[i] := sum_k A[k][col0 + i]."""
    if M <= 0:
        return
    if floating is float:
        fastrnn_gemm_packed_tn_s(M, K, A, col0, nout, Ns, packs, Cs, beta, work, colsum)
    else:
        fastrnn_gemm_packed_tn_d(M, K, A, col0, nout, Ns, packs, Cs, beta, work, colsum)

