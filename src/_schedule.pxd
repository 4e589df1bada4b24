# How a layer's batch is walked, and its weights packed: shared by the RNN, LSTM
# and GRU kernels.
#
# Two splits (fastrnn.functional decides which): by rows, where the Python side
# sorts batch rows by decreasing length and cuts them into one contiguous chunk
# per thread (balanced by total length), and each thread owns its chunk for the
# whole sequence, so the time loop needs no barrier; or, at small batch, by hidden
# units (unit_start), each thread its slice of every gate and its slice of the
# weights (gate_slices), one barrier per step. Either way, at step s the rows
# still running are a prefix: finished sequences drop out of the GEMM and cost
# nothing.
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.stdint cimport uint64_t
from _simd cimport floating, pack, pack_t, n_panels, panel_width
from _pack_cache cimport (PackLayout, PACK_GATE_SLICES, find_packed, keep_packed,
                          packed_buffer)


cdef extern from "scratch.h" nogil:
    # Packed copies live in buffers kept between calls (no page faults per call):
    # allocate with scratch_alloc, give back with scratch_free.
    void *scratch_alloc "fastrnn_scratch_alloc"(size_t nbytes)
    void scratch_free "fastrnn_scratch_free"(void *ptr)
    void scratch_release "fastrnn_scratch_release"()


cdef enum:
    PACK_T_ROWS = 64       # source rows per task of a transposed pack
    BLOCK_ROWS = 256       # rows per input-projection GEMM (time steps x a thread's rows) ...
    BLOCK_VALUES = 32768   # ... and values of a_t it writes (128 KB float32, 256 KB float64)


cdef inline Py_ssize_t steps_per_block(Py_ssize_t nrows, Py_ssize_t GK, Py_ssize_t maxlen,
                                       Py_ssize_t block_values) noexcept nogil:
    """Time steps whose input projection one GEMM computes ahead of the recurrence,
    for a thread with nrows rows and GK gate columns: at most BLOCK_ROWS rows and
    block_values values of a_t (BLOCK_VALUES when the thread owns every hidden
    unit; see units_block_bytes in _recurrent.pyx for the unit split), at
    least one step, at most maxlen.

    The recurrence adds h W_hh^T into those a_t rows steps later, so they should
    still be near in cache then; W_hh streams through L2 in between. 256 rows
    alone made a 1 MB float32 block at LSTM (256, 256, 100, 64) (2 MB float64),
    the whole L2 of a Zen 4 core. There (Zen 4, AVX-512, eval, bench/float64.py,
    two runs against the 256-row rule) float64 took 67.0-68.0 ms instead of
    70.5-71.6, float32 32.9-33.3 instead of 33.3-33.7; the GRU 49.3-50.3 against
    51.2-51.8 in float64; the RNN, training and small batches within noise."""
    cdef Py_ssize_t n = nrows if nrows > 0 else 1
    cdef Py_ssize_t g = GK if GK > 0 else 1
    cdef Py_ssize_t tb = min((BLOCK_ROWS + n - 1) // n, block_values // (n * g))
    return max(1, min(tb, maxlen))


cdef inline Py_ssize_t task_rows(Py_ssize_t M, Py_ssize_t unit, Py_ssize_t most,
                                int n_threads) noexcept nogil:
    """Rows per task when M output rows are cut into equal tasks for n_threads:
    the multiple of `unit` (a micro-tile's rows) up to `most` that leaves the
    busiest thread the fewest rows (ties: the larger, fewer re-reads of the
    weights). Fixed 48-row tasks gave one thread 96 of 100 rows (LSTM
    backward's dx at T=50, B=2). Any cut gives the same numbers: each output
    row is summed alone."""
    cdef Py_ssize_t blk, nblk, load, best = most, best_load = M + most + 1
    cdef int nthr = n_threads if n_threads > 0 else 1
    blk = most
    while blk >= unit:
        nblk = (M + blk - 1) // blk
        load = min(M, ((nblk + nthr - 1) // nthr) * blk)
        if load < best_load:
            best, best_load = blk, load
        blk -= unit
    return best


cdef inline Py_ssize_t even_task_rows(Py_ssize_t M, Py_ssize_t most,
                                      int n_threads) noexcept nogil:
    """Rows per task when M output rows are cut into n_threads * k tasks of
    (about) equal size, k the smallest that keeps a task at most `most` rows.

    For the dW GEMMs (columns_times_packed: the layers' dW_ih and dW_hh, the
    projection's dW_hr, Dense's dW), where every task streams all of the packed
    x^T and h^T (T*B columns) again: task_rows, which only balances rows,
    cut an RNN's 256 rows and an LSTM's 1024 (H=256) into 12-row tasks. Backward
    (functional, T=100 B=64, 2-core Xeon, process pairs, medians): RNN 14.63 ->
    13.99 ms, LSTM 54.2 -> 50.6; the GRU's sizes get the same tasks as before.
    Each output row is summed alone, so any cut gives the same numbers."""
    cdef Py_ssize_t nthr = n_threads if n_threads > 0 else 1
    cdef Py_ssize_t k = 1
    if M <= 0:
        return 1
    if most < 1:
        most = 1
    while (M + nthr * k - 1) // (nthr * k) > most:
        k += 1
    return (M + nthr * k - 1) // (nthr * k)


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


cdef inline void pack_parallel(floating *packed, const floating **rows, Py_ssize_t N,
                               Py_ssize_t K, bint transposed, int n_threads) noexcept nogil:
    """packed := panel layout of the N x K matrix with row n at rows[n] (panels split
    over threads) or, when `transposed`, with element (n, k) at rows[k][n] (blocks of
    PACK_T_ROWS source rows split over threads, each row read once)."""
    cdef Py_ssize_t p, npan = n_panels(packed, N)
    cdef Py_ssize_t c, nchunks = (K + PACK_T_ROWS - 1) // PACK_T_ROWS
    if transposed:
        for c in prange(nchunks, schedule='static', num_threads=n_threads):
            pack_t(packed, rows, N, K, c * PACK_T_ROWS, min(K, (c + 1) * PACK_T_ROWS))
    else:
        for p in prange(npan, schedule='static', num_threads=n_threads):
            pack(packed, rows, N, K, p, p + 1)


cdef inline const floating **row_pointers(const floating *base, const Py_ssize_t *index,
                                          Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    """n pointers base + index[i]*stride (index NULL: i*stride). Free with free(); NULL if out of memory."""
    cdef const floating **rows = <const floating **> malloc(n * sizeof(void *) + 1)
    cdef Py_ssize_t i
    if rows != NULL:
        for i in range(n):
            rows[i] = base + (index[i] if index != NULL else i) * stride
    return rows


cdef inline floating *packed_copy(const floating **rows, Py_ssize_t N, Py_ssize_t K,
                                  bint transposed, int n_threads) noexcept nogil:
    """Packed copy of the N x K matrix with row n at rows[n] or, when `transposed`,
    with element (n, k) at rows[k][n] (the transpose of a matrix given by its rows).
    NULL if out of memory; give it back with scratch_free."""
    cdef floating *packed = <floating *> scratch_alloc(
        n_panels(<floating *> NULL, N) * panel_width(<floating *> NULL) * K * sizeof(floating) + 1)
    if packed != NULL:
        pack_parallel(packed, rows, N, K, transposed, n_threads)
    return packed


cdef inline floating *pack_matrix(const floating *W, Py_ssize_t N, Py_ssize_t K, bint transposed,
                                  int n_threads) noexcept nogil:
    """Packed copy of W (N x K, row-major) or, when `transposed`, of W^T (K x N):
    a dense layer's y = x W^T, backward's dh = da W. NULL if out of memory;
    give it back with scratch_free."""
    cdef const floating **rows = row_pointers(W, NULL, N, K)
    cdef floating *packed = NULL
    if rows != NULL:
        if transposed:
            packed = packed_copy(rows, K, N, True, n_threads)
        else:
            packed = packed_copy(rows, N, K, False, n_threads)
    free(rows)
    return packed


cdef extern from "omp_helpers.h" nogil:
    int fastrnn_team_size()
    void fastrnn_barrier()


cdef inline Py_ssize_t unit_start(Py_ssize_t H, int k, int nslices) noexcept nogil:
    """First hidden unit of slice k of nslices; slice k is [unit_start(k), unit_start(k + 1)).

    Slices are contiguous and multiples of 8 units where possible. (A function
    returning a value, not writing through pointers: Cython makes variables
    assigned inside a parallel block private, but not ones passed by address.)
    """
    cdef Py_ssize_t per = (H + nslices - 1) // nslices
    per = ((per + 7) // 8) * 8
    return min(H, k * per)



cdef inline Py_ssize_t slice_offset(const floating *W, Py_ssize_t G, Py_ssize_t H, Py_ssize_t K,
                                    int nslices, int k) noexcept nogil:
    """Where slice k starts in the buffer made by gate_slices (in elements)."""
    cdef Py_ssize_t off = 0, hk
    cdef int q
    for q in range(k):
        hk = unit_start(H, q + 1, nslices) - unit_start(H, q, nslices)
        off += n_panels(<floating *> W, G * hk) * panel_width(<floating *> W) * K
    return off


cdef inline Py_ssize_t slice_rows(const floating **rows, const floating *W, Py_ssize_t G,
                                  Py_ssize_t H, Py_ssize_t K, int nslices, int k) noexcept nogil:
    """rows := pointers to the rows of slice k of W (G*H x K): g*H + j for g < G and
    j in [unit_start(k), unit_start(k + 1)), gate by gate. Returns their number."""
    cdef Py_ssize_t j0 = unit_start(H, k, nslices), j1 = unit_start(H, k + 1, nslices), g, j
    cdef Py_ssize_t n = 0
    for g in range(G):
        for j in range(j0, j1):
            rows[n] = W + (g * H + j) * K
            n = n + 1
    return n


cdef inline Py_ssize_t gate_panels(const floating *W, Py_ssize_t G, Py_ssize_t H,
                                   int nslices) noexcept nogil:
    """Panels of the packed buffer gate_slices makes: every slice's, in order."""
    cdef Py_ssize_t n = 0
    cdef int k
    for k in range(nslices):
        n += n_panels(<floating *> W, G * (unit_start(H, k + 1, nslices) - unit_start(H, k, nslices)))
    return n


cdef inline void pack_gate_panel(floating *buf, const floating *W, Py_ssize_t G, Py_ssize_t H,
                                 Py_ssize_t K, int nslices, Py_ssize_t c) noexcept nogil:
    """Panel c (of gate_panels) of gate_slices' packed buffer: any panel alone, so
    that threads may take them in any order (the bytes do not depend on it)."""
    cdef Py_ssize_t NR = panel_width(<floating *> W), np_k, j0, hk, n, first, g, j
    cdef const floating *rows[64]      # a panel's rows: NR <= 32
    cdef int k = 0
    while True:        # the slice that panel c is in, and c's place in it
        j0 = unit_start(H, k, nslices)
        hk = unit_start(H, k + 1, nslices) - j0
        np_k = n_panels(<floating *> W, G * hk)
        if c < np_k or k == nslices - 1:
            break
        buf += np_k * NR * K
        c -= np_k
        k += 1
    first = c * NR
    n = min(NR, G * hk - first)
    for j in range(n):          # slice row first + j is gate g's unit j0 + (first + j) % hk
        g = (first + j) // hk
        rows[j] = W + (g * H + j0 + (first + j) - g * hk) * K
    pack(buf + first * K, rows, n, K, 0, 1)


cdef inline floating *gate_slices(const floating *W, Py_ssize_t G, Py_ssize_t H, Py_ssize_t K,
                                  int nslices, int n_threads,
                                  bint cache=False, const uint64_t *digest_of_w=NULL) noexcept nogil:
    """Copy of W (G*H x K, gates stacked) regrouped by thread: slice k holds rows
    g*H + j for g < G and j in [unit_start(k), unit_start(k + 1)), gate by gate, packed
    into panels (one pack_gate_panel per panel, over n_threads).
    Thread k then reads one contiguous block and
    its GEMM output is [gate 0 | gate 1 | ...] for its own hidden units.
    cache (eval calls, single training steps): the copy made earlier for the same
    contents, if kept
    (_pack_cache.pxd); digest_of_w: W's digest if the caller has it. NULL if out
    of memory; give it back with slices_free.
    """
    cdef size_t nbytes = (slice_offset(W, G, H, K, nslices, nslices) + 1) * sizeof(floating)
    cdef PackLayout layout
    cdef uint64_t digest = 0
    cdef floating *buf
    cdef Py_ssize_t c
    buf = <floating *> find_packed(&cache, PACK_GATE_SLICES, W,
                                   sizeof(floating), nslices, G, H, K, n_threads, &layout, &digest,
                                   digest_of_w)
    if buf != NULL:
        return buf
    buf = <floating *> packed_buffer(cache, &layout, nbytes)
    if buf == NULL:
        return NULL
    for c in prange(gate_panels(W, G, H, nslices), schedule='static', num_threads=n_threads):
        pack_gate_panel(buf, W, G, H, K, nslices, c)
    if cache:
        keep_packed(buf, nbytes, &layout, digest)
    return buf
