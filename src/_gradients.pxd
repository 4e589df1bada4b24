# The one-off GEMMs of backward, after the reverse loop, on the same packed
# micro-kernel and the same OpenMP threads as the time loop:
#
#     dx = dgx W_ih,   dw_ih = dgx^T x,   dw_hh = dgh^T h_prev
#
# or, when forward took the input projections from a table by id (x_ids),
# dtable[id] = sum of dgx's rows with that id (rows_scatter_add) in place of the first two.
#
# over the (t, b) rows that exist: with variable lengths, padded steps are left
# out of all three (their dx rows are the caller's zeros), so training costs
# about the sum of the lengths.
#
# Why not BLAS: handing the cores back and forth between a BLAS thread pool
# and the kernels' OpenMP threads every layer call left one pool spinning
# while the other worked (measured: LSTM backward 145 ms with scipy's
# OpenBLAS against 91 ms once its spinning was cut short). Each output row is
# summed alone, in the same order however the rows are cut into tasks, so results
# do not depend on the thread count.
#
# Under matmul precision "medium" (bf16=True, float32 only) the same three GEMMs
# run on bf16 operands (_bf16.pxd): only the packing and the GEMM calls differ.
from cython.parallel cimport prange
from libc.stdint cimport uint16_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from _simd cimport floating, gemm_rows, gemm_columns, gemm_nn, tn_work_size, FASTRNN_KC
from _schedule cimport (pack_matrix, packed_copy, row_pointers, scratch_free, task_rows,
                        even_task_rows)
from _bf16 cimport (bf16_pack_matrix, bf16_packed_columns, bf16_rows_times_packed,
                    bf16_columns_times_packed)

DEF ROW_BLOCK = 48   # most output rows per task (dX: task_rows; dW: at least this)
DEF TILE_ROWS = 12  # AVX-512's float tile; a multiple of AVX2's 6
DEF SCATTER_ALIGN = 16   # column blocks are whole multiples of 16 values (64 bytes of float)

cdef extern from *:
    """
    /* A core's L2 in bytes (0: unknown), per kernel module: its _set_l2_bytes sets it. */
    static Py_ssize_t fastrnn_dw_l2_bytes = 0;
    static void fastrnn_dw_set_l2_bytes(Py_ssize_t b) { fastrnn_dw_l2_bytes = b > 0 ? b : 0; }
    """
    Py_ssize_t dw_l2_bytes "fastrnn_dw_l2_bytes"
    void dw_set_l2_bytes "fastrnn_dw_set_l2_bytes"(Py_ssize_t b)


cdef inline Py_ssize_t dw_task_rows(Py_ssize_t M, int n_threads, size_t itemsize) noexcept nogil:
    """Output rows per task of the dW GEMMs (columns_times_packed): tasks as large as
    a quarter of a core's L2 holds of their columns' micro-panels (a K block of
    FASTRNN_KC values each), at least ROW_BLOCK rows, cut evenly (even_task_rows).

    Why large: every task streams all of the packed x^T and h^T (T*B columns) again
    and copies its columns of da row by row, and a longer run of columns per row
    keeps more of those reads in flight. 2-core Xeon KVM guest (2 MB L2, AVX-512,
    2 threads), C := a^T b with K = 6400, this GEMM alone (a temporary C timing
    loop, seven interleaved rounds, medians), GFLOP/s, 48 -> 128 rows: M x N = 256 x
    256 249 -> 270, 768 x 256 257 -> 273, 1024 x 256 271 -> 285, 256 x 512 274 -> 291,
    1024 x 512 268 -> 281 (64 and 96 in between; 256 no better). Through Linear's
    backward, which also runs dx (`python bench/training_step.py dw`): 1.00-1.06x.
    Whole training steps (I=H=256, T=100, B=64, three alternating process pairs,
    medians of 3 s, ms): RNN 24.52-24.74 -> 24.27-24.54, GRU two layers 140.5-141.6 ->
    139.1-140.0, LSTM within noise (83.8-85.1 -> 84.5-85.4). On a 1 MB L2 (Zen 4) that
    is 64 rows, on 512 KB the 48 of before (not measured there). Each output row is
    summed alone, so any cut gives the same numbers (tests/test_kernels.py)."""
    cdef Py_ssize_t most = dw_l2_bytes // 4 // (FASTRNN_KC * <Py_ssize_t> itemsize)
    return even_task_rows(M, most if most > ROW_BLOCK else ROW_BLOCK, n_threads)


cdef inline void rows_times_packed(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating **A,
                                   const floating *packed, floating **C,
                                   int n_threads) noexcept nogil:
    """C[i] (N values) := A[i] (K values) . W^T for i < M (row pointers), W (N x K) packed."""
    cdef Py_ssize_t rb = task_rows(M, TILE_ROWS, ROW_BLOCK, n_threads)
    cdef Py_ssize_t blk, nblk = (M + rb - 1) // rb, r0, r1
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        r0 = blk * rb
        r1 = min(M, r0 + rb)
        gemm_rows(r1 - r0, N, K, A + r0, packed, NULL, 0, C + r0, 0)


cdef inline int columns_times_packed(Py_ssize_t M, Py_ssize_t K, const floating **A,
                                     int nout, const Py_ssize_t *Ns, const floating **packs,
                                     floating **Cs, int n_threads,
                                     floating beta=0, floating *colsum=NULL) noexcept nogil:
    """Cs[q] (M x Ns[q], row-major) := beta*Cs[q] + A^T . W_q^T for q < nout, W_q
    packed, where A is the K x M matrix with rows A[k]: its columns are read once
    for all outputs. beta 1 adds into Cs (a parameter's .grad). colsum (M,) or
    NULL: := A's column sums, read on the same pass. 0, or -1 if out of memory
    (with beta 1, rows of Cs may then hold the sum already).
    """
    cdef Py_ssize_t rb = dw_task_rows(M, n_threads, sizeof(floating))
    cdef Py_ssize_t blk, nblk = (M + rb - 1) // rb, r, r0, r1
    cdef floating **c_rows
    cdef floating ***c_sets
    cdef floating *work
    cdef int q, failed = 0
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        r0 = blk * rb
        r1 = min(M, r0 + rb)
        # per-task buffers (assigned inside prange, so private to the thread)
        c_rows = <floating **> malloc(nout * rb * sizeof(void *))
        c_sets = <floating ***> malloc(nout * sizeof(void *))
        work = <floating *> malloc(tn_work_size(Cs[0], rb) * sizeof(floating))
        if c_rows == NULL or c_sets == NULL or work == NULL:
            failed += 1
        else:
            for q in range(nout):
                c_sets[q] = c_rows + q * rb
                for r in range(r0, r1):
                    c_rows[q * rb + r - r0] = Cs[q] + r * Ns[q]
            gemm_columns(r1 - r0, K, A, r0, nout, Ns, packs, c_sets, beta, work,
                         colsum + r0 if colsum != NULL else NULL)
        free(c_rows)
        free(c_sets)
        free(work)
    return -1 if failed else 0


cdef inline void *packed_transpose(const floating *W, Py_ssize_t N, Py_ssize_t K, bint bf16,
                                   int n_threads) noexcept nogil:
    """W^T (K x N) of W (N x K, row-major), in bf16 panels when bf16, else float."""
    if floating is float:
        if bf16:
            return bf16_pack_matrix(W, N, K, True, n_threads)
    return pack_matrix(W, N, K, True, n_threads)


cdef inline void *packed_columns(const floating **rows, Py_ssize_t N, Py_ssize_t K, bint bf16,
                                 int n_threads) noexcept nogil:
    """The N x K matrix with element (n, k) at rows[k][n], in bf16 panels when bf16."""
    if floating is float:
        if bf16:
            return bf16_packed_columns(rows, N, K, n_threads)
    return packed_copy(rows, N, K, True, n_threads)


cdef inline int rows_times(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating **A,
                           const void *packed, floating **C, bint bf16,
                           int n_threads) noexcept nogil:
    """rows_times_packed, or its bf16 twin. 0, or -1 if out of memory."""
    if floating is float:
        if bf16:
            return bf16_rows_times_packed(M, N, K, A, <const uint16_t *> packed, C, n_threads)
    rows_times_packed(M, N, K, A, <const floating *> packed, C, n_threads)
    return 0


cdef inline Py_ssize_t column_block_width(Py_ssize_t N, int n_threads) noexcept nogil:
    """Columns of each thread's block when N columns are shared by n_threads (>= 1):
    whole multiples of SCATTER_ALIGN, so that no cache line has two owners."""
    cdef Py_ssize_t width = (N + n_threads - 1) // n_threads
    return (width + SCATTER_ALIGN - 1) // SCATTER_ALIGN * SCATTER_ALIGN


cdef inline void column_sums(floating *colsum, Py_ssize_t M, Py_ssize_t K, const floating **A,
                             int n_threads) noexcept nogil:
    """colsum[i] := sum_k A[k][i] for i < M, each thread owning a block of columns:
    per block of FASTRNN_KC rows from zero, in k order, then added, the sums
    gemm_columns takes on its copy (so bf16 runs get the same bias gradients)."""
    cdef Py_ssize_t width, blk, nblk, c0, c1, i, k, k0, k1
    cdef floating *part     # (c1 - c0,) a block's sums
    cdef floating *acc
    cdef const floating *src
    if n_threads < 1:
        n_threads = 1
    width = column_block_width(M, n_threads)
    nblk = (M + width - 1) // width if width > 0 else 0
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        c0 = blk * width
        c1 = min(M, c0 + width)
        part = <floating *> malloc((c1 - c0) * sizeof(floating))
        acc = part if part != NULL else colsum + c0   # without memory: straight into the sums
        for i in range(c0, c1):
            colsum[i] = 0
        k0 = 0
        while k0 < K:
            k1 = min(K, k0 + FASTRNN_KC)
            if part != NULL:
                for i in range(c1 - c0):
                    part[i] = 0
            for k in range(k0, k1):
                src = A[k]
                for i in range(c0, c1):
                    acc[i - c0] += src[i]
            if part != NULL:
                for i in range(c0, c1):
                    colsum[i] += part[i - c0]
            k0 = k1
        free(part)


cdef inline int columns_times(Py_ssize_t M, Py_ssize_t K, const floating **A, int nout,
                              const Py_ssize_t *Ns, const void **packs, floating **Cs,
                              bint bf16, int n_threads, floating beta,
                              floating *colsum) noexcept nogil:
    """columns_times_packed, or its bf16 twin; colsum (M,) or NULL := A's column
    sums. 0, or -1 if out of memory."""
    if floating is float:
        if bf16:
            if colsum != NULL:
                column_sums(colsum, M, K, A, n_threads)
            return bf16_columns_times_packed(M, K, A, nout, Ns, <const uint16_t **> packs, Cs,
                                             n_threads, beta)
    return columns_times_packed(M, K, A, nout, Ns, <const floating **> packs, Cs, n_threads,
                                beta, colsum)


cdef inline int input_gradient(
        floating *dx,               # OUT (TB, I) rows in `valid`; the others are left alone
        const floating *dgx,        # IN  (TB, GH) dL/d(x W_ih^T)
        const floating *w_ih,       # IN  (GH, I)
        const Py_ssize_t *valid,    # IN  (V,) the rows t*B + b that exist, ascending; NULL: all TB
        Py_ssize_t V, Py_ssize_t GH, Py_ssize_t I, int n_threads, bint bf16,
        bint in_place=False) noexcept nogil:
    """dx = dgx W_ih over the V rows in `valid`, on bf16 operands when bf16 (float32
    only). in_place (the caller's choice, _recurrent.pyx reads_in_place; not with
    bf16): W_ih read as it is, each thread a block of dx's columns (gemm_nn: the same
    numbers as W_ih^T packed), for one step's rows, which would not repay the packing.
    0, or -1 if out of memory."""
    cdef const floating **gx_rows = row_pointers(dgx, valid, V, GH)
    cdef floating **dx_rows = <floating **> row_pointers(dx, valid, V, I)
    cdef void *w_ih_t = NULL
    cdef int status = -1
    cdef Py_ssize_t width, blk, nblk, c0
    if in_place:
        if gx_rows != NULL and dx_rows != NULL:
            width = column_block_width(I, n_threads if n_threads > 1 else 1)
            nblk = (I + width - 1) // width
            for blk in prange(nblk, schedule='static', num_threads=n_threads):
                c0 = blk * width
                gemm_nn(V, min(I, c0 + width) - c0, GH, gx_rows, w_ih + c0, I, dx_rows, c0, 0)
            status = 0
        free(gx_rows); free(dx_rows)
        return status
    w_ih_t = packed_transpose(w_ih, GH, I, bf16, n_threads)                 # W_ih^T (I x GH)
    if gx_rows != NULL and dx_rows != NULL and w_ih_t != NULL:
        status = rows_times(V, I, GH, gx_rows, w_ih_t, dx_rows, bf16, n_threads)
    free(gx_rows); free(dx_rows)
    scratch_free(w_ih_t)
    return status


cdef inline int weight_gradients_of_rows(
        floating *dw_ih,            # OUT (GH, I), added into when accumulate
        floating *dw_hh,            # OUT (GH, H), added into when accumulate
        const floating **gx_rows,   # IN  (V,) rows of dL/d(x W_ih^T), GH values each
        const floating **gh_rows,   # IN  (V,) rows of dL/d(h W_hh^T); gx_rows itself for RNN, LSTM
        const floating **x_rows,    # IN  (V,) rows of x, I values each
        const floating **h_rows,    # IN  (V,) rows of the state each step read, H values each
        Py_ssize_t V, Py_ssize_t GH, Py_ssize_t I, Py_ssize_t H,
        int n_threads, bint bf16, bint accumulate,
        floating *db_x,             # OUT (GH,) dL/d(x W_ih^T)'s column sums, or NULL
        floating *db_h) noexcept nogil:   # OUT (GH,) the other's, or NULL; not when gh_rows is gx_rows
    """dw_ih (+)= dgx^T x; dw_hh (+)= dgh^T h_prev over V rows given by pointers (from
    one sequence's arrays, or from a cell's steps kept apart), on bf16 operands when
    bf16 (float32 only). accumulate: add into dw_ih, dw_hh (a parameter's .grad: no
    temporary, no extra pass). db_x, db_h: the column sums, taken while the dW GEMM
    copies the columns. 0, or -1 if out of memory."""
    cdef void *x_t = packed_columns(x_rows, I, V, bf16, n_threads)           # x^T (I x V)
    cdef void *h_t = NULL
    cdef Py_ssize_t Ns[2]
    cdef const void *packs[2]
    cdef floating *Cs[2]
    cdef int status = -1
    cdef floating beta = 1 if accumulate else 0
    if x_t != NULL:
        h_t = packed_columns(h_rows, H, V, bf16, n_threads)                   # h_prev^T (H x V)
    if x_t != NULL and h_t != NULL:
        Ns[0] = I
        Ns[1] = H
        packs[0] = x_t
        packs[1] = h_t
        Cs[0] = dw_ih
        Cs[1] = dw_hh
        if gx_rows == gh_rows:   # RNN, LSTM: one pass over da's columns for both weights
            status = columns_times(GH, V, gx_rows, 2, Ns, packs, Cs, bf16, n_threads, beta,
                                   db_x)
        else:
            status = columns_times(GH, V, gx_rows, 1, Ns, packs, Cs, bf16, n_threads, beta,
                                   db_x)
            status += columns_times(GH, V, gh_rows, 1, Ns + 1, packs + 1, Cs + 1, bf16,
                                    n_threads, beta, db_h)
        status = -1 if status != 0 else 0
    scratch_free(x_t); scratch_free(h_t)
    return status


cdef inline int reset_before_weight_gradients(
        floating *dw_ih,            # OUT (3H, I), added into when accumulate; or NULL (x
                                    #   read by id: the table took dL/d(x W_ih^T))
        floating *dw_hh,            # OUT (3H, H), added into when accumulate
        const floating *dga,        # IN  (TB, 3H) dL/da_t, blocks r, z, n
        const floating *x,          # IN  (TB, I), or NULL with dw_ih
        const floating *h_prev,     # IN  (TB, H) the state each step read
        const floating *rh,         # IN  (TB, H) r * h_{t-1}, the n block's product's input
        const Py_ssize_t *valid,    # IN  (V,) the rows t*B + b that exist, ascending; NULL: all TB
        Py_ssize_t V, Py_ssize_t H, Py_ssize_t I, int n_threads, bint accumulate,
        floating *db) noexcept nogil:   # OUT (3H,) dL/da's column sums (b_ih's and b_hh's), or NULL
    """The reset-before GRU's weight gradients: W_hn multiplies r * h_{t-1}, not h_{t-1}:
        dw_ih (+)= da^T x,   dw_hh[:2H] (+)= [da_r, da_z]^T h_prev,   dw_hh[2H:] (+)= da_n^T rh
    in two passes over da's columns (r, z; then n), each feeding both weights.
    0, or -1 if out of memory."""
    cdef const floating **ga_rows = row_pointers(dga, valid, V, 3 * H)
    cdef const floating **n_rows = <const floating **> malloc(V * sizeof(void *) + 1)
    cdef const floating **x_rows = row_pointers(x, valid, V, I) if x != NULL else NULL
    cdef const floating **h_rows = row_pointers(h_prev, valid, V, H)
    cdef const floating **rh_rows = row_pointers(rh, valid, V, H)
    cdef void *x_t = NULL
    cdef void *h_t = NULL
    cdef void *rh_t = NULL
    cdef Py_ssize_t Ns[2]
    cdef const void *packs[2]
    cdef floating *Cs[2]
    cdef floating beta = 1 if accumulate else 0
    cdef int status = -1, q = 0 if dw_ih != NULL else 1   # outputs from q: x's, then h's
    cdef Py_ssize_t i
    if (ga_rows != NULL and n_rows != NULL and (x_rows != NULL or dw_ih == NULL)
            and h_rows != NULL and rh_rows != NULL):
        for i in range(V):
            n_rows[i] = ga_rows[i] + 2 * H
        if dw_ih != NULL:
            x_t = packed_columns(x_rows, I, V, False, n_threads)      # x^T (I x V)
        h_t = packed_columns(h_rows, H, V, False, n_threads)          # h_prev^T (H x V)
        rh_t = packed_columns(rh_rows, H, V, False, n_threads)        # rh^T (H x V)
    if (x_t != NULL or dw_ih == NULL) and h_t != NULL and rh_t != NULL:
        Ns[0] = I
        Ns[1] = H
        packs[0] = x_t
        packs[1] = h_t
        Cs[0] = dw_ih
        Cs[1] = dw_hh
        status = columns_times(2 * H, V, ga_rows, 2 - q, Ns + q, packs + q, Cs + q, False,
                               n_threads, beta, db)
        if status == 0:
            packs[1] = rh_t
            Cs[0] = dw_ih + 2 * H * I if dw_ih != NULL else NULL
            Cs[1] = dw_hh + 2 * H * H
            status = columns_times(H, V, n_rows, 2 - q, Ns + q, packs + q, Cs + q, False,
                                   n_threads, beta, db + 2 * H if db != NULL else NULL)
        status = -1 if status != 0 else 0
    free(ga_rows); free(n_rows); free(x_rows); free(h_rows); free(rh_rows)
    scratch_free(x_t); scratch_free(h_t); scratch_free(rh_t)
    return status


cdef inline int weight_gradients(
        floating *dw_ih,            # OUT (GH, I), added into when accumulate
        floating *dw_hh,            # OUT (GH, H), added into when accumulate
        const floating *dgx,        # IN  (TB, GH) dL/d(x W_ih^T)
        const floating *dgh,        # IN  (TB, GH) dL/d(h W_hh^T); the same array for RNN and LSTM
        const floating *x,          # IN  (TB, I)
        const floating *h_prev,     # IN  (TB, H) the state each step read
        const Py_ssize_t *valid,    # IN  (V,) the rows t*B + b that exist, ascending; NULL: all TB
        Py_ssize_t V, Py_ssize_t GH, Py_ssize_t I, Py_ssize_t H,
        int n_threads, bint bf16, bint accumulate,
        floating *db_x,             # OUT (GH,) dgx's column sums (the biases' gradient), or NULL
        floating *db_h) noexcept nogil:   # OUT (GH,) dgh's, or NULL; not when dgh is dgx
    """weight_gradients_of_rows over the V rows in `valid` of these arrays."""
    cdef const floating **gx_rows = row_pointers(dgx, valid, V, GH)
    cdef const floating **gh_rows = gx_rows if dgh == dgx else row_pointers(dgh, valid, V, GH)
    cdef const floating **x_rows = row_pointers(x, valid, V, I)
    cdef const floating **h_rows = row_pointers(h_prev, valid, V, H)
    cdef int status = -1
    if gx_rows != NULL and gh_rows != NULL and x_rows != NULL and h_rows != NULL:
        status = weight_gradients_of_rows(dw_ih, dw_hh, gx_rows, gh_rows, x_rows, h_rows, V, GH,
                                          I, H, n_threads, bf16, accumulate, db_x, db_h)
    if gh_rows != gx_rows:
        free(gh_rows)
    free(gx_rows); free(x_rows); free(h_rows)
    return status


cdef inline int input_and_weight_gradients(
        floating *dx,               # OUT (TB, I) rows in `valid`; the others are left alone
        floating *dw_ih,            # OUT (GH, I), added into when accumulate
        floating *dw_hh,            # OUT (GH, H), added into when accumulate
        const floating *dgx,        # IN  (TB, GH) dL/d(x W_ih^T)
        const floating *dgh,        # IN  (TB, GH) dL/d(h W_hh^T); the same array for RNN and LSTM
        const floating *x,          # IN  (TB, I)
        const floating *h_prev,     # IN  (TB, H) the state each step read
        const floating *w_ih,       # IN  (GH, I)
        const Py_ssize_t *valid,    # IN  (V,) the rows t*B + b that exist, ascending; NULL: all TB
        Py_ssize_t V, Py_ssize_t GH, Py_ssize_t I, Py_ssize_t H,
        int n_threads, bint bf16, bint accumulate,
        floating *db_x,             # OUT (GH,) dgx's column sums, or NULL
        floating *db_h,             # OUT (GH,) dgh's, or NULL; not when dgh is dgx
        bint in_place=False) noexcept nogil:
    """input_gradient (in_place: see there), then weight_gradients. 0, or -1 if out
    of memory."""
    if input_gradient(dx, dgx, w_ih, valid, V, GH, I, n_threads, bf16, in_place) != 0:
        return -1
    return weight_gradients(dw_ih, dw_hh, dgx, dgh, x, h_prev, valid, V, GH, I, H, n_threads,
                            bf16, accumulate, db_x, db_h)


cdef inline int weight_gradient(
        floating *dw,               # OUT (N, K), added into when accumulate
        const floating *da,         # IN  (TB, N) dL/d(output) of the product out = in W^T
        const floating *inp,        # IN  (TB, K) its input
        const Py_ssize_t *valid,    # IN  (V,) the rows that exist, ascending; NULL: all
        Py_ssize_t V, Py_ssize_t N, Py_ssize_t K, int n_threads,
        bint accumulate) noexcept nogil:
    """dw (+)= da^T inp over the V rows in `valid` (the LSTM projection's dW_hr).
    0, or -1 if out of memory."""
    cdef const floating **a_rows = row_pointers(da, valid, V, N)
    cdef const floating **in_rows = row_pointers(inp, valid, V, K)
    cdef floating *in_t = NULL
    cdef Py_ssize_t Ns[1]
    cdef const floating *packs[1]
    cdef floating *Cs[1]
    cdef int status = -1
    if a_rows != NULL and in_rows != NULL:
        in_t = packed_copy(in_rows, K, V, True, n_threads)             # inp^T (K x V)
    if in_t != NULL:
        Ns[0] = K
        packs[0] = in_t
        Cs[0] = dw
        status = columns_times_packed(N, V, a_rows, 1, Ns, packs, Cs, n_threads,
                                      1 if accumulate else 0)
    free(a_rows); free(in_rows); scratch_free(in_t)
    return status


cdef inline void rows_scatter_add(
        floating *out,              # OUT (V_out, N) := zeros, then the sums
        Py_ssize_t V_out,
        const floating *src,        # IN  (TB, N)
        const Py_ssize_t *ids,      # IN  (TB,) row of `out` each row of src adds into, in [0, V_out)
        const Py_ssize_t *valid,    # IN  (V,) the rows of src that exist, ascending; NULL: all
        Py_ssize_t V, Py_ssize_t N, int n_threads) noexcept nogil:
    """out[ids[r]] += src[r] over the V rows r in `valid`, out zeroed first.

    Each thread owns one contiguous block of columns and adds the rows into it in
    ascending order, so every sum is taken in the same order for any thread count.
    One block per thread, not many narrow ones: src (a layer's gate gradients, 16 MB
    in the char-LM step) comes from DRAM, where a long run per row streams best. The
    sums build in a private buffer, copied out at the end: written in place, the
    line where two threads' blocks meet in every row of `out` went back and forth
    between the cores at every row of src. Without memory for that buffer a block is
    summed in place (the same sums in the same order)."""
    cdef Py_ssize_t width, blk, nblk, c0, n, i, r, j, ld
    cdef floating *acc      # (V_out, n) this thread's sums, row stride ld
    cdef floating *o
    cdef const floating *s
    if n_threads < 1:
        n_threads = 1
    width = column_block_width(N, n_threads)
    nblk = (N + width - 1) // width if width > 0 else 0
    for blk in prange(nblk, schedule='static', num_threads=n_threads):
        c0 = blk * width
        n = min(N, c0 + width) - c0
        acc = <floating *> calloc(V_out * n + 1, sizeof(floating))
        ld = n
        if acc == NULL:     # in place
            ld = N
            for i in range(V_out):
                memset(out + i * N + c0, 0, n * sizeof(floating))
        for i in range(V):
            r = valid[i] if valid != NULL else i
            o = (acc if acc != NULL else out + c0) + ids[r] * ld
            s = src + r * N + c0
            for j in range(n):
                o[j] += s[j]
        if acc != NULL:
            for i in range(V_out):
                memcpy(out + i * N + c0, acc + i * n, n * sizeof(floating))
        free(acc)
