# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The recurrence driver: one layer, one direction, any cell (`forward`, `backward`).

Shapes: T steps, B batch, I input, H hidden, G gates (1 RNN, 4 LSTM, 3 GRU).

The driver owns everything but the cell's arithmetic: the split of the work
over threads, the blocks of steps whose input projection is one GEMM, the
time loop with its recurrent GEMM, and backward's reverse loop followed by
the dX / dW GEMMs. A cell (_cells.pxd) contributes its gate count, its
pointwise passes (rnn_pointwise.h, lstm_pointwise.h, gru_pointwise.h) and,
for the GRU, that the recurrent product lands apart from a_t.

    a_t = x_t W_ih^T [+ h_{t-1} W_hh^T]        one GEMM per block of steps, then per step
    h_t, state_t = cell_pointwise(a_t, ...)    one fused pass per row

Callers (fastrnn.functional) validate every shape and dtype first; these
functions trust their arguments and run without the GIL.
"""
cimport numpy as cnp
cdef extern from *:
    """
    #undef I  /* <complex.h>, through NumPy's headers; Plan has a field I */
    """
from libc.stdint cimport uint16_t, uint64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from cython.parallel cimport prange, parallel, threadid

from _bf16 cimport (fastrnn_bf16_gemm, fastrnn_bf16_work_bytes, fastrnn_bf16_panel_values,
                    bf16_pack_matrix, bf16_gate_slices, bf16_slice_offset, FASTRNN_BF16_NR,
                    fastrnn_bf16_amx, fastrnn_bf16_level, QG_AVX512_BF16)
from _cells cimport (CELL_LSTM, CELL_GRU, CELL_GRU_RESET_BEFORE, cell_gates, product_apart,
                     forward_pointwise, backward_pointwise, gru_reset_before_gates,
                     gru_reset_before_state, gru_reset_before_backward_state,
                     gru_reset_before_backward_gates)
from _gradients cimport (input_and_weight_gradients, input_gradient, weight_gradient,
                         reset_before_weight_gradients,
                         weight_gradients_of_rows, rows_scatter_add,
                        dw_set_l2_bytes)
from _pack_cache cimport (DIGEST_CHUNK, digest_chunk, digest_combine, digest_serial,
                          count_digested, digested,
                          slices_free, pack_cache_clear, pack_cache_set_off, pack_cache_is_off,
                          pack_cache_stats, weights_digest, PackLayout, PACK_GATE_SLICES,
                          find_packed, keep_packed, packed_buffer)
from _plan cimport Plan
from _simd cimport (fastrnn_isa_set, fastrnn_isa_level, floating, gemm_rows, gemm_nn,
                   panel_width, n_panels, FASTRNN_NN_MAX_ROWS)
from _schedule cimport (BLOCK_VALUES, steps_per_block, time_index, n_active, pack_matrix,
                        pack_parallel,
                        unit_start, task_rows,
                        gate_slices, gate_panels, pack_gate_panel, slice_offset,
                        fastrnn_barrier, fastrnn_team_size, scratch_alloc, scratch_free,
                        scratch_release)

from _team_pool cimport (FASTRNN_POOL_MAX, fastrnn_pool_barrier, fastrnn_pool_enter, fastrnn_pool_leave,
                         fastrnn_pool_ready, fastrnn_pool_try_run, fastrnn_pool_stats,
                         fastrnn_pool_hold, fastrnn_pool_refuse, fastrnn_pool_for,
                         fastrnn_pool_pretend_colocated,
                         fastrnn_pool_note_openmp, fastrnn_pool_openmp_spinning,
                         fastrnn_pool_set_openmp_window, fastrnn_pause_ns,
                         fastrnn_pool_openmp_window, fastrnn_pool_contended,
                         fastrnn_pool_busy_only,
                         fastrnn_pool_pretend_stall, fastrnn_pool_clear_backoff,
                         fastrnn_pool_pretend_busy,
                         fastrnn_pool_watch_on, fastrnn_cpu_now, fastrnn_now_ns,
                         fastrnn_spin_pause, sched_yield)

cnp.import_array()


cdef object frozen_known(bint cache_weights, object w_ih, object w_hh):
    """(digest of w_ih, of w_hh) when an eval call's weights are both frozen
    (fastrnn._frozen: memory of an immutable bytes object, hashed once), else None:
    the call then hashes them itself. Taken here, never from a caller."""
    if not cache_weights:
        return None
    from fastrnn._frozen import frozen_digests   # (a Python module importing this one)
    return frozen_digests(w_ih, w_hh)


cdef inline bint team_barrier(const Plan *p) noexcept nogil:
    """Wait for the other threads of this call's team: team_pool.h's or OpenMP's.
    True: the team is to stop here (a pool team that may stop and has stalled), the
    same answer in every thread."""
    if p.pool_team:
        return fastrnn_pool_barrier()
    fastrnn_barrier()
    return False


cdef inline void panels_back_to_front(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                                      const floating **A, const floating *packed,
                                      floating **C, floating **Cs, floating beta) noexcept nogil:
    """gemm_rows(M, N, K, A, packed, ...) with W's packed panels read last to first, two
    at a time (as gemm_rows pairs them): each output column is the same sum, taken in
    the other order of columns (see zigzag_bytes). Cs: M scratch pointers."""
    cdef Py_ssize_t i, n, chunk = 2 * panel_width(<floating *> NULL)
    cdef Py_ssize_t c0 = (N - 1) // chunk * chunk
    while c0 >= 0:
        n = min(chunk, N - c0)
        for i in range(M):
            Cs[i] = C[i] + c0
        gemm_rows(M, n, K, A, packed + c0 * K, NULL, 0, Cs, beta)
        c0 = c0 - chunk


cdef inline bint zigzag_for(Py_ssize_t nbytes) noexcept nogil:
    """Is a packed weight slice of nbytes, read at every step, to be swept back and forth?"""
    return zigzag_bytes > 0 and nbytes > zigzag_bytes


cdef inline void gate_gemm(const Plan *p, Py_ssize_t M, Py_ssize_t K, const floating **A,
                           const floating *w_slice, const uint16_t *w_bf16, const floating *w,
                           Py_ssize_t j0, Py_ssize_t hk, floating **C, floating **Cg,
                           floating beta, void *work, bint flip=False) noexcept nogil:
    """C[i][g*hk + j] := beta*C[i][g*hk + j] + A[i] . W[g*H + j0 + j] for g < G, j < hk, i < M.

    W (G*H x K) is this thread's slice in bf16 panels when w_bf16 is given (work:
    fastrnn_bf16_work_bytes(M, K)), else its packed slice when given; else it is
    read in place, one gate block at a time when the thread owns only some units
    (no copy: what lets a batch-1 step use every core). Cg: M scratch pointers.
    flip: a packed slice's panels are read last to first (see zigzag_bytes); each
    output column is the same sum either way.
    """
    cdef Py_ssize_t g, i, G = p.G
    if M <= 0 or hk <= 0:
        return
    if floating is float:
        if w_bf16 != NULL:
            fastrnn_bf16_gemm(M, G * hk, K, A, w_bf16, C, beta, work)
            return
    if w_slice != NULL and flip:
        panels_back_to_front(M, G * hk, K, A, w_slice, C, Cg, beta)
    elif w_slice != NULL:
        gemm_rows(M, G * hk, K, A, w_slice, NULL, 0, C, beta)
    elif hk == p.H:
        gemm_rows(M, G * hk, K, A, NULL, w, K, C, beta)
    else:
        for g in range(G):
            for i in range(M):
                Cg[i] = C[i] + g * hk
            gemm_rows(M, hk, K, A, NULL, w + (g * p.H + j0) * K, K, Cg, beta)


cdef inline void gather_gate_rows(const Plan *p, Py_ssize_t M, const floating **A,
                                  Py_ssize_t j0, Py_ssize_t hk, floating **C) noexcept nogil:
    """C[i][g*hk + j] := A[i][g*H + j0 + j] for g < G, j < hk, i < M: this thread's units
    of rows of a table of input projections (p.x_ids), in place of gate_gemm's product."""
    cdef Py_ssize_t g, i, G = p.G, H = p.H
    for i in range(M):
        if hk == H:
            memcpy(C[i], A[i], G * H * sizeof(floating))
        else:
            for g in range(G):
                memcpy(C[i] + g * hk, A[i] + g * H + j0, hk * sizeof(floating))


cdef inline Py_ssize_t block_steps(const Plan *p, Py_ssize_t nrows, Py_ssize_t hk,
                                   Py_ssize_t maxlen, size_t itemsize) noexcept nogil:
    """Steps per input-projection block (steps_per_block) of a forward_thread with
    nrows rows and hk hidden units. The unit split's threads meet at every step, so
    they take their blocks' projections at the same steps: blocks sized from the
    widest slice (slice 0), not each thread's own. Sized by its own slice, a thread
    whose slice was narrower (H = 513: 264 and 249 units) projected at other steps,
    each thread then waited at those steps for the other's long GEMM, and an eval
    team took that for a stalled teammate and went on alone: LSTM I=300 H=513 B=8
    T=100 eval 26.8 ms on 2 threads, 27.1 on one, against 10.3 at H=512; 10.3 after
    (2-core Xeon, AVX-512; LSTM I=H=1000 B=1 63 -> 34 ms, torch 36)."""
    if hk == p.H:
        return steps_per_block(nrows, p.G * hk, maxlen, BLOCK_VALUES)
    return steps_per_block(nrows, p.G * (unit_start(p.H, 1, p.nslices)
                                         - unit_start(p.H, 0, p.nslices)), maxlen,
                           max(<Py_ssize_t> BLOCK_VALUES,
                               units_block_bytes // <Py_ssize_t> itemsize))


def _block_steps_of(int G, Py_ssize_t H, Py_ssize_t B, Py_ssize_t T, int nslices,
                    int itemsize=4):
    """Test hook: block_steps of each of the nslices threads of a unit split (G gates,
    H units, B rows, T steps), a list; they must be equal."""
    cdef Plan p
    memset(&p, 0, sizeof(Plan))
    p.G, p.H, p.nslices = G, H, nslices
    return [block_steps(&p, B, unit_start(H, k + 1, nslices) - unit_start(H, k, nslices), T,
                        itemsize) for k in range(nslices)]


cdef floating *pack_reset_before_rows(const floating *w_hh, Py_ssize_t H, Py_ssize_t j0,
                                      Py_ssize_t hk, floating **w_n) noexcept nogil:
    """This thread's rows of the reset-before GRU's w_hh (3H x H), packed on this thread
    into one buffer (returned; scratch_free; NULL if out of memory): rows g*H + j0 + j
    of the r and z blocks (2hk rows, g < 2), then at *w_n the n block's hk rows. One
    buffer, not two: a buffer of 1 MB or more is whole huge pages (scratch.h), so all
    of the slice, not only its larger part, is physically contiguous. (It did not
    remove the spread of H=512 B=1 calls between processes: 1.55-2.10 ms in four runs
    of bench/gru_reset_before.py, 1.46-2.07 with two buffers.)"""
    cdef Py_ssize_t g, j, n_rz = n_panels(<floating *> NULL, 2 * hk) * panel_width(
        <floating *> NULL) * H
    cdef const floating **rows = <const floating **> malloc(3 * hk * sizeof(void *) + 1)
    cdef floating *packed = NULL
    if rows != NULL:
        packed = <floating *> scratch_alloc(
            (n_rz + n_panels(<floating *> NULL, hk) * panel_width(<floating *> NULL) * H + 1)
            * sizeof(floating))
    if packed != NULL:
        for g in range(3):
            for j in range(hk):
                rows[g * hk + j] = w_hh + (g * H + j0 + j) * H
        pack_parallel(packed, rows, 2 * hk, H, False, 1)
        pack_parallel(packed + n_rz, rows + 2 * hk, hk, H, False, 1)
        w_n[0] = packed + n_rz
    free(rows)
    return packed


cdef inline bint packs_hh_slices(const Plan *p) noexcept nogil:
    """Is W_hh read as packed gate slices (p.pack_hh)? Not the reset-before GRU's: its
    threads pack their own rows of it per call (pack_reset_before_rows)."""
    return p.pack_hh and p.cell != CELL_GRU_RESET_BEFORE


cdef inline void gru_reset_before_step(
        const Plan *p,
        Py_ssize_t nact,            # rows running this step
        Py_ssize_t j0, Py_ssize_t hk,   # this thread's hidden units [j0, j0 + hk)
        const floating *w_rz,       # its rows of w_hh's r and z blocks packed (2hk x H), or NULL
        const floating *w_n,        # and of the n block (hk x H), or NULL: read in place
        const floating **h_rows,    # IN  (nact) h_{t-1}, whole rows (H)
        floating **a_rows,          # IN/OUT (nact) a_t, this thread's gate blocks (3hk): x W_ih^T
                                    #   in, the activated gates r, z, n out
        floating **rh_rows,         # OUT (nact) r * h_{t-1}, whole rows (H) shared by the team:
                                    #   this thread writes its units, reads them all (p.rh,
                                    #   or a training call's aux rows, kept for backward)
        floating **tmp_rows,        # SCRATCH (nact) pointers
        floating **h_out,           # OUT (nact) h_t, this thread's units (in y)
        const floating *bias,       # (3hk) this thread's units of b_ih + b_hh
        bint sync) noexcept nogil:  # a unit split: wait for every thread's r * h_{t-1}
    """One step of the reset-before GRU (reset_after=False). The reset gate scales
    h_{t-1} before its product, so the step runs h_{t-1} W_h{r,z}^T, the gates pass,
    (r * h_{t-1}) W_hn^T, the state pass; split by units, the second product reads
    every thread's r * h_{t-1}: one barrier more a step. Never on a pool team
    (forward() gives this cell none), so the barrier has no stop to report."""
    cdef Py_ssize_t H = p.H, r, g
    cdef const floating *w_hh = <const floating *> p.w_hh     # (3H, H) blocks r, z, n
    if w_rz != NULL:
        gemm_rows(nact, 2 * hk, H, h_rows, w_rz, NULL, 0, a_rows, 1)
    else:
        for g in range(2):
            for r in range(nact):
                tmp_rows[r] = a_rows[r] + g * hk
            gemm_rows(nact, hk, H, h_rows, NULL, w_hh + (g * H + j0) * H, H, tmp_rows, 1)
    for r in range(nact):
        gru_reset_before_gates(a_rows[r], bias, h_rows[r] + j0, rh_rows[r] + j0, hk)
    if sync:
        team_barrier(p)
    for r in range(nact):
        tmp_rows[r] = a_rows[r] + 2 * hk
    gemm_rows(nact, hk, H, <const floating **> rh_rows, w_n, w_hh + (2 * H + j0) * H, H,
              tmp_rows, 1)
    for r in range(nact):
        gru_reset_before_state(a_rows[r], bias, h_rows[r] + j0, h_out[r], hk)


cdef Py_ssize_t forward_thread(
        floating *y,                # OUT (T, B, H), = p.y (gives the type)
        const Plan *p,
        Py_ssize_t r0, Py_ssize_t r1,  # this thread's rows: order[r0:r1]
        Py_ssize_t j0, Py_ssize_t j1,  # this thread's hidden units [j0, j1)
        const floating *w_ih_k,     # this thread's packed slice of w_ih, or NULL (read in place)
        const floating *w_hh_k,     # likewise for w_hh
        const uint16_t *w_ih_b,     # this thread's slice of w_ih in bf16 panels, or NULL (p.bf16)
        const uint16_t *w_hh_b,     # likewise for w_hh
        bint sync,                  # threads share rows: barrier after every step
        int *fail,                  # SHARED (nthr,) allocation failure per thread
        int tid, int nthr) noexcept nogil:
    """One thread's share of the forward pass: rows order[r0:r1], hidden units [j0, j1).
    Returns the steps it ran: all of its rows' (maxlen, at most p.max_steps when
    that is set), or fewer when a pool team stopped at a step barrier (team_barrier),
    with h_t in y and h_n, c_n written as after the last step run (not for rows of
    length 0, which an eval call's later segments have: theirs are written already).

    Large batches split rows (each thread all units, no barrier); small batches
    split units (each thread all rows and its own slice of every gate, so its
    weights stay in its cache; one barrier per step). Each output element is
    computed by the same code either way, so the numbers are bitwise the same.

    Nothing is copied per step: a_t is built where it is kept (the saved gates
    row when this thread owns all units, y itself for the RNN), h_t is written
    into y and read back from there as the next step's GEMM input, c_t into aux.
    (The one copy: h_t into the caller's p.y_copy, when a training call has one.)
    """
    cdef int cell = p.cell
    cdef Py_ssize_t G = p.G, B = p.B, I = p.I, H = p.H, O = p.O, ldy = p.ldy
    cdef floating *y_copy = <floating *> p.y_copy         # (T, B, O) rows ldy_copy apart, or NULL
    cdef Py_ssize_t ldyc = p.ldy_copy
    cdef bint proj = p.w_hr != NULL                       # LSTM projection (row split only)
    cdef const Py_ssize_t *order = p.order
    cdef const Py_ssize_t *lengths = p.lengths
    cdef bint reverse = p.reverse
    cdef floating *gates = <floating *> p.gates           # (T, B, G*H) or NULL
    cdef floating *aux = <floating *> p.aux               # (T, B, H) or NULL
    cdef floating *hr = <floating *> p.hr                 # (T, B, H) or NULL
    cdef const floating *x = <const floating *> p.x       # (T, B, I), or (V, G*H) by x_ids
    cdef const Py_ssize_t *x_ids = p.x_ids                 # (T, B) or NULL
    cdef const floating *h0 = <const floating *> p.h0     # (B, O) rows ldh0 apart, or NULL
    cdef Py_ssize_t ldh0 = p.ldh0 if p.ldh0 > 0 else p.O
    cdef const floating *c0 = <const floating *> p.c0     # (B, H) or NULL
    cdef const floating *bias = <const floating *> p.bias
    cdef const floating *bias_h = <const floating *> p.bias_h
    cdef Py_ssize_t nrows = r1 - r0, hk = j1 - j0, GK = G * (j1 - j0)
    cdef Py_ssize_t maxlen = lengths[order[r0]] if nrows > 0 else 0
    if p.max_steps > 0 and maxlen > p.max_steps:
        maxlen = p.max_steps
    cdef Py_ssize_t tb = block_steps(p, nrows, hk, maxlen, sizeof(floating))
    cdef bint apart = product_apart(cell)
    cdef bint reset_before = cell == CELL_GRU_RESET_BEFORE
    cdef bint has_c = cell == CELL_LSTM
    cdef bint in_y = G == 1                                # RNN: a_t is built in y, h_t in place
    # the slice of W_hh every step reads: over half a core's L2, sweep it back and forth
    cdef bint zigzag = w_hh_k != NULL and zigzag_for(GK * O * sizeof(floating))
    cdef bint in_gates = gates != NULL and hk == H and not in_y
    cdef Py_ssize_t gk = GK if GK > 0 else 1
    cdef Py_ssize_t hk1 = hk if hk > 0 else 1
    cdef Py_ssize_t nr = nrows if nrows > 0 else 1
    cdef floating *bl = <floating *> calloc(gk, sizeof(floating))              # (G*hk,) bias slice
    cdef floating *blh = <floating *> calloc(gk, sizeof(floating))             # (hk,) GRU b_hn slice
    cdef floating *zeros = <floating *> calloc(H + O + 1, sizeof(floating))    # (O,) h0 when None
    cdef floating *c = NULL      # (nrows, hk) LSTM c0, then c_t in place at inference
    cdef floating *gxb = NULL    # (tb, nrows, G*hk) a_t unless built in place
    cdef floating *ghb = NULL    # (nrows, G*hk) GRU h W_hh^T
    cdef floating *hnb = NULL    # (nrows, hk) GRU gh_n + b_hn at inference
    cdef floating *hrb = NULL    # (nrows, H) projected LSTM o * tanh(c_t) at inference
    cdef const floating **src = <const floating **> malloc(tb * nr * sizeof(void *))
    cdef floating **dst = <floating **> malloc(tb * nr * sizeof(void *))
    cdef floating **scratch = <floating **> malloc(tb * nr * sizeof(void *))
    cdef const floating **h_rows = <const floating **> malloc(nr * sizeof(void *))  # h_{t-1}, full rows
    cdef floating **a_rows = <floating **> malloc(nr * sizeof(void *))        # a_t rows (G*hk)
    cdef floating **gh_rows = <floating **> malloc(nr * sizeof(void *))       # GRU gh rows (G*hk)
    cdef floating **c_rows = <floating **> malloc(nr * sizeof(void *))        # LSTM c_{t-1} (hk)
    cdef const floating **r_rows = <const floating **> malloc(nr * sizeof(void *))  # o * tanh(c_t) (H)
    cdef floating **y_rows = <floating **> malloc(nr * sizeof(void *))        # projected h_t (P)
    cdef floating **rh_rows = NULL   # reset-before GRU: rows of p.rh (r * h_{t-1})
    cdef floating *w_rz = NULL       # ... its units' rows of w_hh's r, z blocks, packed
    cdef floating *w_n = NULL        # ... and of the n block (in w_rz's buffer)
    cdef void *bwork = NULL      # bf16 GEMMs: A rows rounded (fastrnn_bf16_work_bytes)
    cdef Py_ssize_t r, b, s, s0, s1, t, g, m, nact, row
    cdef int q, failed = 0
    cdef bint stop = False
    cdef floating *ar
    cdef floating *aux_out
    if has_c:
        c = <floating *> calloc(nr * hk1, sizeof(floating))
    if not in_gates and not in_y:
        gxb = <floating *> malloc(tb * nr * gk * sizeof(floating))
    if apart:
        ghb = <floating *> malloc(nr * gk * sizeof(floating))
        hnb = <floating *> malloc(nr * hk1 * sizeof(floating))
    if proj and hr == NULL:
        hrb = <floating *> malloc(nr * H * sizeof(floating))
    if w_hh_b != NULL:
        bwork = malloc(fastrnn_bf16_work_bytes(tb * nr, I if I > O else O))
    if reset_before:
        rh_rows = <floating **> malloc(nr * sizeof(void *))
        if p.pack_hh:
            w_rz = pack_reset_before_rows(<const floating *> p.w_hh, H, j0, hk, &w_n)
    fail[tid] = (bl == NULL or blh == NULL or zeros == NULL or (has_c and c == NULL)
                 or (w_hh_b != NULL and bwork == NULL)
                 or (gxb == NULL and not in_gates and not in_y)
                 or (apart and (ghb == NULL or hnb == NULL)) or (proj and hr == NULL and hrb == NULL)
                 or (reset_before and (rh_rows == NULL or (p.rh == NULL and aux == NULL)
                                       or (p.pack_hh and (w_rz == NULL or w_n == NULL))))
                 or r_rows == NULL or y_rows == NULL
                 or src == NULL or dst == NULL or scratch == NULL or h_rows == NULL
                 or a_rows == NULL or gh_rows == NULL or c_rows == NULL)
    if not fail[tid]:
        for g in range(G):
            if bias != NULL:
                memcpy(bl + g * hk, bias + g * H + j0, hk * sizeof(floating))
        if bias_h != NULL:
            memcpy(blh, bias_h + j0, hk * sizeof(floating))
        for r in range(nrows):
            b = order[r0 + r]
            h_rows[r] = h0 + b * ldh0 if h0 != NULL else zeros
            if apart:
                gh_rows[r] = ghb + r * GK
            if reset_before and p.rh != NULL:   # (training: aux's rows, set per step)
                rh_rows[r] = <floating *> p.rh + (r0 + r) * H
            if has_c:
                c_rows[r] = c + r * hk
                if c0 != NULL:
                    memcpy(c + r * hk, c0 + b * H + j0, hk * sizeof(floating))
    if sync:
        stop = team_barrier(p)   # a team that stalled already runs no step
        for q in range(nthr):
            failed = failed + fail[q]
    else:
        failed = fail[tid]
    if failed or stop or GK == 0 and not sync:
        maxlen = 0   # all threads skip the loop together: no barrier is left waiting
    s0 = 0
    while s0 < maxlen:
        s1 = min(s0 + tb, maxlen)
        # Input projection for steps [s0, s1): one GEMM over all running rows (or,
        # with x_ids, rows of the table of projections), into the rows where each
        # step's pre-activation a_t is then built.
        m = 0
        for s in range(s0, s1):
            nact = n_active(order + r0, nrows, lengths, s)
            for r in range(nact):
                b = order[r0 + r]
                row = time_index(s, lengths[b], reverse) * B + b
                src[m] = x + row * I if x_ids == NULL else x + x_ids[row] * G * H
                if in_y:
                    dst[m] = y + row * ldy + j0
                elif in_gates:
                    dst[m] = gates + row * G * H
                else:
                    dst[m] = gxb + ((s - s0) * nrows + r) * GK
                m = m + 1
        if x_ids != NULL:
            gather_gate_rows(p, m, src, j0, hk, dst)
        else:
            gate_gemm(p, m, I, src, w_ih_k, w_ih_b, <const floating *> p.w_ih, j0, hk, dst,
                      scratch, 0, bwork)
        # Recurrence: h_{t-1} W_hh^T, added into a_t (or apart, GRU), then one fused pass.
        m = 0   # step s's rows start at dst[m]
        for s in range(s0, s1):
            nact = n_active(order + r0, nrows, lengths, s)
            for r in range(nact):
                a_rows[r] = dst[m + r]
            m = m + nact
            if reset_before:
                for r in range(nact):
                    b = order[r0 + r]
                    row = time_index(s, lengths[b], reverse) * B + b
                    y_rows[r] = y + row * ldy + j0
                    if aux != NULL:      # training: every step's r * h_{t-1} kept for backward
                        rh_rows[r] = aux + row * H
                gru_reset_before_step(p, nact, j0, hk, w_rz, w_n, h_rows, a_rows, rh_rows,
                                      gh_rows, y_rows, bl, sync)
            elif apart:
                gate_gemm(p, nact, O, h_rows, w_hh_k, w_hh_b, <const floating *> p.w_hh, j0, hk,
                          gh_rows, scratch, 0, bwork, zigzag and (s & 1) == 1)
            else:
                gate_gemm(p, nact, O, h_rows, w_hh_k, w_hh_b, <const floating *> p.w_hh, j0, hk,
                          a_rows, scratch, 1, bwork, zigzag and (s & 1) == 1)
            for r in range(nact if GK > 0 else 0):
                b = order[r0 + r]
                row = time_index(s, lengths[b], reverse) * B + b
                ar = a_rows[r]
                if has_c:
                    aux_out = aux + row * H + j0 if aux != NULL else c_rows[r]   # inference: in place
                elif apart:
                    aux_out = aux + row * H + j0 if aux != NULL else hnb + r * hk
                else:
                    aux_out = NULL
                if proj:   # the cell's h is o * tanh(c_t); the projection follows
                    y_rows[r] = y + row * ldy
                    r_rows[r] = hr + row * H if hr != NULL else hrb + r * H
                if not reset_before:    # (whose passes ran in its step)
                    forward_pointwise(cell, ar, gh_rows[r] if apart else NULL, bl, blh,
                                      h_rows[r] + j0, c_rows[r] if has_c else NULL, aux_out,
                                      <floating *> r_rows[r] if proj else y + row * ldy + j0,
                                      hk, gates != NULL)
                if has_c:
                    c_rows[r] = aux_out
                if y_copy != NULL and not proj:   # while h_t is in L1 (a copy after the
                    memcpy(y_copy + row * ldyc + j0, y + row * ldy + j0,   # call read it back
                           hk * sizeof(floating))                          # from memory)
                if gates != NULL and not in_gates:
                    for g in range(G):
                        memcpy(gates + row * G * H + g * H + j0, ar + g * hk,
                               hk * sizeof(floating))
            if proj:       # h_t = (o * tanh(c_t)) W_hr^T
                gemm_rows(nact, O, H, r_rows, <const floating *> p.w_hr_packed,
                          <const floating *> p.w_hr, H, y_rows, 0)
                if y_copy != NULL:
                    for r in range(nact):
                        b = order[r0 + r]
                        row = time_index(s, lengths[b], reverse) * B + b
                        memcpy(y_copy + row * ldyc, y + row * ldy, O * sizeof(floating))
            if sync:   # h_t complete (every thread's units) before anyone reads it
                stop = team_barrier(p)
            for r in range(nact):   # h_t is next step's h_{t-1}
                b = order[r0 + r]
                h_rows[r] = y + (time_index(s, lengths[b], reverse) * B + b) * ldy
            if stop:        # every thread of the team, after the same step
                maxlen = s + 1
                break
        s0 = s1
    if not failed:
        for r in range(nrows):
            b = order[r0 + r]
            if lengths[b] == 0:     # a segment's row with no steps left: h_n, c_n are set
                continue
            memcpy(<floating *> p.h_n + b * O + j0, h_rows[r] + j0,
                   (O if proj else hk) * sizeof(floating))
            if has_c:
                memcpy(<floating *> p.c_n + b * H + j0, c_rows[r], hk * sizeof(floating))
    free(bl); free(blh); free(zeros); free(c); free(gxb); free(ghb); free(hnb); free(hrb)
    free(src); free(dst); free(scratch); free(h_rows); free(a_rows); free(gh_rows); free(c_rows)
    free(r_rows); free(y_rows); free(bwork); free(rh_rows)
    scratch_free(w_rz)
    return maxlen


cdef inline Py_ssize_t step_before(const Plan *p, Py_ssize_t b, Py_ssize_t t,
                                   Py_ssize_t s) noexcept nogil:
    """The (t, b) row of batch row b's step s - 1 (its step s is time t), or -1 at s = 0."""
    return ((t + 1 if p.reverse else t - 1) * p.B + b) if s > 0 else -1


cdef inline const floating *state_read(const Plan *p, const floating *zeros, Py_ssize_t b,
                                       Py_ssize_t prev) noexcept nogil:
    """h_{t-1} as row b's step read it (all O values): y's row prev (step_before), else
    h0's row, else zeros."""
    cdef const floating *h0 = <const floating *> p.h0
    if prev >= 0:
        return <const floating *> p.y + prev * p.O
    return h0 + b * p.O if h0 != NULL else zeros


cdef inline floating *row_backward(const Plan *p, floating *g_all, const floating *zeros,
                                   Py_ssize_t b, Py_ssize_t s, Py_ssize_t j0, Py_ssize_t n,
                                   floating *dh, floating *dc, const floating *dy) noexcept nogil:
    """The cell's backward pass on units [j0, j0 + n) of batch row b at step s.

    dh, dc: this row's carried gradients at unit j0; dy: dL/dy_t at unit j0, or
    NULL for forward's dy. Returns the row the recurrent product then reads:
    dL/d(h W_hh^T) for the GRU, else the gate gradients (all G*H units).
    """
    cdef Py_ssize_t B = p.B, H = p.H, O = p.O, GH = p.G * p.H
    cdef Py_ssize_t t = time_index(s, p.lengths[b], p.reverse)
    cdef Py_ssize_t row = t * B + b
    cdef Py_ssize_t prev = step_before(p, b, t, s)
    cdef const floating *y = <const floating *> p.y
    cdef const floating *aux = <const floating *> p.aux
    cdef const floating *c0 = <const floating *> p.c0
    cdef floating *gr = g_all + row * GH
    cdef floating *ghr = <floating *> p.dgh + row * GH if product_apart(p.cell) else NULL
    if n > 0:
        backward_pointwise(
            p.cell, gr + j0, ghr + j0 if ghr != NULL else NULL, dh, dc,
            dy if dy != NULL else <const floating *> p.dy + row * p.lddy + j0, y + row * O + j0,
            state_read(p, zeros, b, prev) + j0,
            aux + row * H + j0 if aux != NULL else NULL,
            ((aux + prev * H if prev >= 0 else (c0 + b * H if c0 != NULL else zeros)) + j0)
            if p.cell == CELL_LSTM else NULL,
            n, H)
    return ghr if ghr != NULL else gr


cdef inline void gru_reset_before_backward_step(
        const Plan *p,
        floating *g_all,            # IN/OUT (T, B, 3H) saved gates in, dL/da out (= p.gates)
        const floating *zeros,      # IN  (H) h0 when there is none
        const Py_ssize_t *rows,     # IN  (nact) batch rows running step s
        Py_ssize_t nact, Py_ssize_t s,
        Py_ssize_t j0, Py_ssize_t hk,   # this thread's hidden units [j0, j0 + hk)
        floating **dh_rows,         # IN/OUT (nact) carried dL/dh at unit j0: dL/dh_t in,
                                    #   dL/dh_{t-1} out (this thread's units)
        floating **drh_rows,        # SCRATCH (nact) rows of hk values: dL/d(r * h_{t-1})
        const floating **n_rows,    # SCRATCH (nact) pointers
        const floating **rz_rows,   # SCRATCH (nact) pointers
        const floating *w_rz,       # packed W_h{r,z}^T, this thread's panels (O x 2H), or NULL
        const floating *w_n,        # packed W_hn^T, its panels (O x H), or NULL (in place)
        bint sync) noexcept nogil:  # a unit split: wait for every thread's gate gradients
    """One reverse step of the reset-before GRU (reset_after=False): the state pass
    (dL/da_z, dL/da_n, dh * z), drh = dL/da_n W_hn, the gates pass (dL/da_r,
    dh += drh * r), then dh += [dL/da_r, dL/da_z] W_h{r,z}. Split by units, each
    product reads every thread's gate gradients: a barrier before each. Each
    element is computed by the same operations either way (bitwise the same)."""
    cdef Py_ssize_t B = p.B, H = p.H, O = p.O, GH = 3 * p.H, r, b, t, row
    cdef const floating *w_hh = <const floating *> p.w_hh     # (3H, O) blocks r, z, n
    cdef floating *g
    for r in range(nact):
        b = rows[r]
        t = time_index(s, p.lengths[b], p.reverse)
        row = t * B + b
        g = g_all + row * GH
        rz_rows[r] = g
        n_rows[r] = g + 2 * H
        if hk > 0:
            gru_reset_before_backward_state(
                g + j0, dh_rows[r], <const floating *> p.dy + row * p.lddy + j0,
                state_read(p, zeros, b, step_before(p, b, t, s)) + j0, hk, H)
    if sync:
        fastrnn_barrier()
    if hk == 0:         # a thread left no units (H < threads' panels): only the barriers
        if sync:
            fastrnn_barrier()
        return
    if w_n != NULL:
        gemm_rows(nact, hk, H, n_rows, w_n, NULL, 0, drh_rows, 0)
    else:
        gemm_nn(nact, hk, H, n_rows, w_hh + 2 * H * O + j0, O, drh_rows, 0, 0)
    for r in range(nact):
        b = rows[r]
        t = time_index(s, p.lengths[b], p.reverse)
        gru_reset_before_backward_gates(<floating *> rz_rows[r] + j0, dh_rows[r], drh_rows[r],
                                        state_read(p, zeros, b, step_before(p, b, t, s)) + j0,
                                        hk)
    if sync:
        fastrnn_barrier()
    if w_rz != NULL:
        gemm_rows(nact, hk, 2 * H, rz_rows, w_rz, NULL, 0, dh_rows, 1)
    else:
        gemm_nn(nact, hk, 2 * H, rz_rows, w_hh + j0, O, dh_rows, 0, 1)


cdef inline void recurrent_gradient(const Plan *p, Py_ssize_t M, Py_ssize_t N,
                                    const floating **da, const floating *w_t,
                                    const uint16_t *w_t_bf16, floating **dh, floating beta,
                                    void *work, floating **scratch, bint flip,
                                    Py_ssize_t j0) noexcept nogil:
    """dh[i] := beta*dh[i] + da[i] W_hh (N of its columns, from column j0) for i < M:
    W_hh^T's panels in bf16 when p.bf16 (work: fastrnn_bf16_work_bytes(M, G*H)), else
    float, last to first when flip (scratch: M pointers); W_hh itself, read in place,
    when w_t is NULL (a single step: the same numbers, no packing)."""
    if floating is float:
        if p.bf16:
            fastrnn_bf16_gemm(M, N, p.G * p.H, da, w_t_bf16, dh, beta, work)
            return
    if w_t == NULL:
        gemm_nn(M, N, p.G * p.H, da, <const floating *> p.w_hh + j0, p.O, dh, 0, beta)
    elif flip:
        panels_back_to_front(M, N, p.G * p.H, da, w_t, dh, scratch, beta)
    else:
        gemm_rows(M, N, p.G * p.H, da, w_t, NULL, 0, dh, beta)


cdef int backward_chunk(floating *g_all, const Plan *p, const Py_ssize_t *rows,
                        Py_ssize_t nrows) noexcept nogil:
    """Reverse loop for rows[0:nrows]: gate gradients and dh (dc) carried back.
    0, or -1 if out of memory.

    g_all (T, B, G*H) = p.gates: the saved gates in, dL/d(x W_ih^T) out (0 at
    padded steps). Per step, after the cell's pass:
        dh_{t-1} = dL/da_t W_hh             (RNN, LSTM)
        dh_{t-1} = dh_t z + dL/dgh_t W_hh   (GRU: its pass leaves dh_t z in dh)
    A projected LSTM first turns dL/dh_t (P) into dL/d(o * tanh(c_t)) = dL/dh_t W_hr
    (H) and keeps dL/dh_t in p.dhp for dW_hr. The reset-before GRU's step has two
    passes and two products (gru_reset_before_backward_step).
    """
    cdef int cell = p.cell
    cdef Py_ssize_t G = p.G, T = p.T, B = p.B, H = p.H, O = p.O, GH = p.G * p.H
    cdef bint proj = p.w_hr != NULL
    cdef floating *dhp = <floating *> p.dhp                 # (T, B, P) projected LSTM
    cdef const Py_ssize_t *lengths = p.lengths
    cdef bint reverse = p.reverse
    cdef bint apart = product_apart(cell)
    cdef bint has_c = cell == CELL_LSTM
    cdef bint reset_before = cell == CELL_GRU_RESET_BEFORE
    cdef floating *dgh = <floating *> p.dgh                 # (T, B, G*H) GRU, else NULL
    cdef const floating *dy = <const floating *> p.dy
    cdef const floating *dh_n = <const floating *> p.dh_n
    cdef const floating *dc_n = <const floating *> p.dc_n
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef floating *dh = <floating *> calloc(nrows * O, sizeof(floating))   # (nrows, O) carried dL/dh
    cdef floating *dc = <floating *> calloc(nrows * H, sizeof(floating))   # (nrows, H) carried dL/dc
    cdef floating *dr = <floating *> calloc(nrows * H + 1, sizeof(floating))  # (nrows, H) proj: dL/d(o
                                                                # tanh c); reset-before GRU: dL/d(r*h)
    cdef floating *zeros = <floating *> calloc(H + O, sizeof(floating))
    cdef const floating **in_rows = <const floating **> malloc(nrows * sizeof(void *))
    cdef floating **dh_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef const floating **dhp_rows = <const floating **> malloc(nrows * sizeof(void *))
    cdef floating **dr_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef floating **cs_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef void *bwork = malloc(fastrnn_bf16_work_bytes(nrows, GH)) if p.bf16 else NULL
    cdef bint zigzag = not p.bf16 and zigzag_for(O * GH * sizeof(floating))
    cdef int status = 0
    cdef Py_ssize_t r, b, s, t, row, nact, j
    cdef floating *dhpr
    if (dh == NULL or dc == NULL or dr == NULL or zeros == NULL or in_rows == NULL
            or dh_rows == NULL or dhp_rows == NULL or dr_rows == NULL or cs_rows == NULL
            or (p.bf16 and bwork == NULL)):
        status = -1
    else:
        for r in range(nrows):
            b = rows[r]
            dh_rows[r] = dh + r * O
            dr_rows[r] = dr + r * H
            if dh_n != NULL:
                memcpy(dh + r * O, dh_n + b * O, O * sizeof(floating))
            if has_c and dc_n != NULL:
                memcpy(dc + r * H, dc_n + b * H, H * sizeof(floating))
            for t in range(lengths[b], T):   # padding contributes nothing to dW, dX
                memset(g_all + (t * B + b) * GH, 0, GH * sizeof(floating))
                if apart:
                    memset(dgh + (t * B + b) * GH, 0, GH * sizeof(floating))
        for s in range(maxlen - 1, -1, -1):
            nact = n_active(rows, nrows, lengths, s)
            if reset_before:   # (in_rows, dhp_rows: its pointer scratch; no projection here)
                gru_reset_before_backward_step(p, g_all, zeros, rows, nact, s, 0, H, dh_rows,
                                               dr_rows, in_rows, dhp_rows,
                                               <const floating *> p.w_hh_slices,
                                               <const floating *> p.w_hn_packed, False)
                continue
            if proj:   # dL/d(o tanh c_t) = (dh_carry + dy_t) W_hr, all rows in one GEMM
                for r in range(nact):
                    row = time_index(s, lengths[rows[r]], reverse) * B + rows[r]
                    dhpr = dhp + row * O
                    for j in range(O):
                        dhpr[j] = dh[r * O + j] + dy[row * p.lddy + j]
                    dhp_rows[r] = dhpr
                gemm_rows(nact, H, O, dhp_rows, <const floating *> p.w_hr_packed, NULL, 0,
                          dr_rows, 0)
            for r in range(nact):
                in_rows[r] = row_backward(p, g_all, zeros, rows[r], s, 0, H,
                                          dr + r * H if proj else dh + r * O, dc + r * H,
                                          zeros if proj else NULL)
            # rows past nact keep the dh_n they started with
            recurrent_gradient(p, nact, O, in_rows, <const floating *> p.w_hh_slices,
                               <const uint16_t *> p.w_hh_bf16, dh_rows, 1 if apart else 0, bwork,
                               cs_rows, zigzag and (s & 1) == 1, 0)
        for r in range(nrows):
            b = rows[r]
            memcpy(<floating *> p.dh0 + b * O, dh + r * O, O * sizeof(floating))
            if has_c:
                memcpy(<floating *> p.dc0 + b * H, dc + r * H, H * sizeof(floating))
    free(dh); free(dc); free(dr); free(zeros); free(in_rows); free(dh_rows); free(dhp_rows)
    free(dr_rows); free(cs_rows); free(bwork)
    return status


cdef void backward_units(floating *g_all, const Plan *p, floating *dh, floating *dc,
                         int *fail, int tid, int nthr) noexcept nogil:
    """Reverse loop for every row, this thread's hidden units (small batches).

    The row split leaves a batch of 1 on one thread and has every thread read
    all of W_hh^T per step; here thread k owns units [j0, j1), a run of whole
    panels of the packed W_hh^T (p.w_hh_slices, O x G*H), so it reads only its
    panels. Per step: the cell's pass on its units of every row, a barrier
    (the product needs every unit's gate gradients), then its columns of
    dh_{t-1} = dL/da_t W_hh. Everything a thread reads without a barrier it
    wrote itself, so one barrier per step suffices; each element is computed
    by the same operations as in backward_chunk (bitwise the same numbers). The
    reset-before GRU's step has two products, each after a barrier
    (gru_reset_before_backward_step); its W_h{r,z}^T and W_hn^T are packed apart.
    dh (B, O), dc (B, H): shared, zeroed by the caller. No projection (O = H).
    """
    cdef int cell = p.cell
    cdef Py_ssize_t T = p.T, B = p.B, H = p.H, O = p.O, GH = p.G * p.H
    cdef const Py_ssize_t *rows = p.order
    cdef const Py_ssize_t *lengths = p.lengths
    cdef bint apart = product_apart(cell)
    cdef bint has_c = cell == CELL_LSTM
    cdef floating *dgh = <floating *> p.dgh                 # (T, B, G*H) GRU, else NULL
    cdef const floating *dh_n = <const floating *> p.dh_n
    cdef const floating *dc_n = <const floating *> p.dc_n
    cdef Py_ssize_t nr = panel_width(g_all)
    cdef Py_ssize_t per = ((O + nr - 1) // nr + nthr - 1) // nthr   # panels per thread
    cdef Py_ssize_t j0 = min(O, tid * per * nr), j1 = min(O, (tid + 1) * per * nr)
    cdef Py_ssize_t hk = j1 - j0
    cdef bint reset_before = cell == CELL_GRU_RESET_BEFORE
    cdef Py_ssize_t K = 2 * H if reset_before else GH   # rows of W_hh in p.w_hh_slices
    cdef const floating *w_k = (<const floating *> p.w_hh_slices + j0 * K   # this thread's panels
                                if p.w_hh_slices != NULL else NULL)       # (NULL: W_hh in place)
    cdef const floating *w_n_k = (<const floating *> p.w_hn_packed + j0 * H   # reset-before GRU
                                  if p.w_hn_packed != NULL else NULL)
    cdef floating *drh = (<floating *> malloc((B * hk + 1) * sizeof(floating))  # (B, hk) its dL/d(r*h)
                          if reset_before else NULL)
    cdef floating **drh_rows = (<floating **> malloc(B * sizeof(void *) + 1)
                                if reset_before else NULL)          # (B) rows of drh
    cdef const floating **rz_rows = (<const floating **> malloc(B * sizeof(void *) + 1)
                                     if reset_before else NULL)     # (B) pointer scratch
    cdef const uint16_t *w_kb = (<const uint16_t *> p.w_hh_bf16
                                 + (j0 // FASTRNN_BF16_NR) * fastrnn_bf16_panel_values(GH)
                                 if p.bf16 else NULL)   # j0: a multiple of either panel width
    cdef void *bwork = malloc(fastrnn_bf16_work_bytes(B, GH)) if p.bf16 else NULL
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef floating *zeros = <floating *> calloc(H + O + 1, sizeof(floating))
    cdef const floating **in_rows = <const floating **> malloc(B * sizeof(void *) + 1)
    cdef floating **dh_rows = <floating **> malloc(B * sizeof(void *) + 1)
    cdef floating **cs_rows = <floating **> malloc(B * sizeof(void *) + 1)
    cdef bint zigzag = not p.bf16 and zigzag_for(hk * GH * sizeof(floating))
    cdef Py_ssize_t r, b, s, t, nact, g
    cdef int q, failed = 0
    fail[tid] = (zeros == NULL or in_rows == NULL or dh_rows == NULL or cs_rows == NULL
                 or (reset_before and (drh == NULL or drh_rows == NULL or rz_rows == NULL))
                 or (p.bf16 and bwork == NULL))
    if not fail[tid]:
        for r in range(B):
            b = rows[r]
            dh_rows[r] = dh + r * O + j0
            if reset_before:
                drh_rows[r] = drh + r * hk
            if dh_n != NULL:
                memcpy(dh + r * O + j0, dh_n + b * O + j0, hk * sizeof(floating))
            if has_c and dc_n != NULL:
                memcpy(dc + r * H + j0, dc_n + b * H + j0, hk * sizeof(floating))
            for t in range(lengths[b], T):   # padding contributes nothing to dW, dX
                for g in range(p.G):
                    memset(g_all + (t * B + b) * GH + g * H + j0, 0, hk * sizeof(floating))
                    if apart:
                        memset(dgh + (t * B + b) * GH + g * H + j0, 0, hk * sizeof(floating))
    fastrnn_barrier()
    for q in range(nthr):
        failed = failed + fail[q]
    if failed:
        maxlen = 0   # every thread skips the loop: no barrier is left waiting
    for s in range(maxlen - 1, -1, -1):
        nact = n_active(rows, B, lengths, s)
        if reset_before:
            gru_reset_before_backward_step(p, g_all, zeros, rows, nact, s, j0, hk, dh_rows,
                                           drh_rows, in_rows, rz_rows, w_k, w_n_k, True)
            continue
        for r in range(nact):
            in_rows[r] = row_backward(p, g_all, zeros, rows[r], s, j0, hk,
                                      dh + r * O + j0, dc + r * H + j0, NULL)
        fastrnn_barrier()   # every unit's gate gradients of this step are in place
        if hk > 0:
            recurrent_gradient(p, nact, hk, in_rows, w_k, w_kb, dh_rows, 1 if apart else 0,
                               bwork, cs_rows, zigzag and (s & 1) == 1, j0)
    if not failed:
        for r in range(B):
            b = rows[r]
            memcpy(<floating *> p.dh0 + b * O + j0, dh + r * O + j0, hk * sizeof(floating))
            if has_c:
                memcpy(<floating *> p.dc0 + b * H + j0, dc + r * H + j0, hk * sizeof(floating))
    free(zeros); free(in_rows); free(dh_rows); free(cs_rows); free(bwork)
    free(drh); free(drh_rows); free(rz_rows)


cdef inline void *vptr1(const floating[::1] a) noexcept nogil:
    return <void *> &a[0] if a is not None else NULL


cdef inline void *vptr2(const floating[:, ::1] a) noexcept nogil:
    return <void *> &a[0, 0] if a is not None else NULL


cdef inline void *vptr3(const floating[:, :, ::1] a) noexcept nogil:
    return <void *> &a[0, 0, 0] if a is not None else NULL


cdef Py_ssize_t evenly_spaced_rows(Py_ssize_t T, Py_ssize_t B, Py_ssize_t O,
                                   Py_ssize_t t_bytes, Py_ssize_t b_bytes, size_t itemsize):
    """The stride in values between consecutive rows t*B + b of a (T, B, O) array
    with byte strides (t_bytes, b_bytes, itemsize): O when contiguous, more for a
    column block of a (T, B, D*O) array; -1 if the rows are not evenly spaced or
    overlap."""
    cdef Py_ssize_t size = <Py_ssize_t> itemsize
    cdef Py_ssize_t stride = b_bytes if B > 1 else t_bytes
    if T * B <= 1:
        return O   # a single row: no stride is ever used
    if B > 1 and T > 1 and t_bytes != B * b_bytes:
        return -1
    if stride < O * size or stride % size != 0:
        return -1
    return stride // size


cdef struct ForwardTeam:
    Plan *p                     # the call's plan (its slices: p.nslices, p.w_*_slices, p.w_*_bf16)
    const Py_ssize_t *bounds    # row split: thread k's rows order[bounds[k]:bounds[k+1]];
                                # NULL: B rows cut evenly
    bint by_units               # split hidden units, every thread all rows (else rows)
    bint single                 # float32 (else float64)
    int *fails                  # (nthr,) allocation failure per thread
    Py_ssize_t steps            # OUT the steps the team ran (thread 0's forward_thread)


cdef void forward_share(void *ctx, int tid, int nthr) noexcept nogil:
    """Thread tid's share of a team's forward (OpenMP's or team_pool.h's)."""
    cdef ForwardTeam *t = <ForwardTeam *> ctx
    if t.single:
        forward_share_typed(<float *> t.p.y, t, tid, nthr)
    else:
        forward_share_typed(<double *> t.p.y, t, tid, nthr)


cdef void forward_share_typed(floating *y, ForwardTeam *t, int tid, int nthr) noexcept nogil:
    cdef const Plan *p = t.p
    cdef Py_ssize_t G = p.G, H = p.H, B = p.B, r0 = 0, r1 = p.B
    cdef int ns = p.nslices, k = tid if t.by_units else 0      # k: this thread's slice
    cdef const floating *s_ih = <const floating *> p.w_ih_slices
    cdef const floating *s_hh = <const floating *> p.w_hh_slices
    cdef const uint16_t *b_ih = <const uint16_t *> p.w_ih_bf16
    cdef const uint16_t *b_hh = <const uint16_t *> p.w_hh_bf16
    if not t.by_units:
        r0 = t.bounds[tid] if t.bounds != NULL else tid * B // nthr
        r1 = t.bounds[tid + 1] if t.bounds != NULL else (tid + 1) * B // nthr
    cdef Py_ssize_t steps = forward_thread(
        y, p, r0, r1, unit_start(H, k, ns), unit_start(H, k + 1, ns),
        s_ih + slice_offset(<const floating *> p.w_ih, G, H, p.I, ns, k) if s_ih != NULL else NULL,
        s_hh + slice_offset(<const floating *> p.w_hh, G, H, p.O, ns, k) if s_hh != NULL else NULL,
        b_ih + bf16_slice_offset(G, H, p.I, ns, k) if b_ih != NULL else NULL,
        b_hh + bf16_slice_offset(G, H, p.O, ns, k) if b_hh != NULL else NULL,
        t.by_units, t.fails, tid, nthr)
    if tid == 0:
        t.steps = steps


cdef struct PackJob:
    void *buf                   # gate_slices' packed buffer
    const void *W               # (G*H, K) the weights
    Py_ssize_t G, H, K
    int nslices


cdef void pack_panel_s(void *ctx, long c) noexcept nogil:
    cdef PackJob *j = <PackJob *> ctx
    pack_gate_panel(<float *> j.buf, <const float *> j.W, j.G, j.H, j.K, j.nslices, c)


cdef void pack_panel_d(void *ctx, long c) noexcept nogil:
    cdef PackJob *j = <PackJob *> ctx
    pack_gate_panel(<double *> j.buf, <const double *> j.W, j.G, j.H, j.K, j.nslices, c)


cdef struct CallDigests:
    # The weights' digests for the pack cache, taken once per call (pack_for): a call
    # that packs twice (alone, then for a team that formed late) reads them once.
    bint taken
    uint64_t ih, hh


cdef inline CallDigests call_digests(const uint64_t *known) noexcept nogil:
    """A call's digests: taken already when the weights are frozen (known: their two
    digests), else still to take (known NULL)."""
    cdef CallDigests d
    d.taken = known != NULL
    d.ih = known[0] if known != NULL else 0
    d.hh = known[1] if known != NULL else 0
    return d


cdef floating *pool_gate_slices(const floating *W, Py_ssize_t G, Py_ssize_t H, Py_ssize_t K,
                                int nslices, int n, const uint64_t *digest) noexcept nogil:
    """gate_slices(W, ..., cache=True, digest) for an eval call that owns the
    pool: a packing the cache lacks is made on the pool's ready workers (n threads at
    most), so no OpenMP team is woken. NULL if out of memory."""
    cdef bint cache = True
    cdef uint64_t d = 0
    cdef PackLayout layout
    cdef size_t nbytes = (slice_offset(W, G, H, K, nslices, nslices) + 1) * sizeof(floating)
    cdef floating *buf
    buf = <floating *> find_packed(&cache, PACK_GATE_SLICES, W, sizeof(floating), nslices, G, H,
                                   K, 1, &layout, &d, digest)
    if buf != NULL:
        return buf
    buf = <floating *> packed_buffer(cache, &layout, nbytes)
    if buf != NULL:
        pool_pack_slices(buf, W, G, H, K, nslices, n)
        if cache:
            keep_packed(buf, nbytes, &layout, d)
    return buf


cdef void pool_pack_slices(floating *buf, const floating *W, Py_ssize_t G, Py_ssize_t H,
                           Py_ssize_t K, int nslices, int n) noexcept nogil:
    """buf := gate_slices' packed panels of W, on the caller and the pool's workers that
    are or become ready (n threads at most; the caller owns the pool)."""
    cdef PackJob job
    job.buf, job.W, job.G, job.H, job.K, job.nslices = buf, W, G, H, K, nslices
    fastrnn_pool_for(n, gate_panels(W, G, H, nslices),
                     pack_panel_s if floating is float else pack_panel_d, &job)


include "forward_small.pxi"


cdef int forward_on_pool(floating *y, Plan *p, ForwardTeam *ctx, int team,
                         const uint64_t *known) noexcept nogil:
    """An eval call that owns the pool: on a team of `team` threads (ctx.by_units: unit
    slices, else rows by ctx.bounds) while the workers are ready and running, else on
    this thread a segment of steps at a time, asking again between segments, as the
    fast path's calls do (run_segments). It asked once, before any step: a call made
    after the workers had slept (over 2 ms idle) ran alone to its end, while the worker
    it woke spun beside it (bf16 products, LSTM I=H=512 B=8 T=50, calls 50 ms apart, 2-core
    Xeon: 7.9 ms against 2.9 back to back; a review). Packs what it runs (pack_for:
    digests and packing on the pool; known: the weights' digests when frozen, else
    NULL). Returns 0, or 1 if out of memory."""
    cdef SegmentWork work
    cdef int failed = 0
    cdef Py_ssize_t B = p.B
    cdef Py_ssize_t *lengths = <Py_ssize_t *> malloc(B * sizeof(Py_ssize_t))
    cdef floating *h = <floating *> malloc(B * p.O * sizeof(floating) + 8)
    if lengths == NULL or h == NULL:
        free(lengths); free(h)
        return 1
    work.lengths, work.h, work.bounds = lengths, h, <Py_ssize_t *> ctx.bounds
    run_segments(y, p, team, ctx.by_units, True, team, known, &work, &failed, False)
    free(lengths); free(h)
    return failed


def forward(int cell, floating[:, :, :] y, floating[:, ::1] h_n, floating[:, ::1] c_n,
            floating[:, :, ::1] gates, floating[:, :, ::1] aux,
            const floating[:, :, ::1] x, const floating[:, ::1] h0, const floating[:, ::1] c0,
            const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
            const floating[::1] bias, const floating[::1] bias_h,
            const floating[:, ::1] w_hr, floating[:, :, ::1] hr,
            const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
            const Py_ssize_t[::1] bounds, bint reverse, bint pack_ih, bint pack_hh,
            int n_threads, bint by_units, bint bf16=False, bint cache_weights=False,
            const floating[:, ::1] x_table=None, const Py_ssize_t[:, ::1] x_ids=None,
            floating[:, :, :] y_copy=None, bint keep_packs=False):
    """Forward over all steps of one layer and direction; arrays as in _plan.pxd
    (None where it says NULL; c_n, c0 only for the LSTM, aux and hr None at
    inference, w_hr only for a projected LSTM, which takes the row split). y's
    rows are contiguous and evenly spaced, not necessarily adjacent (p.ldy).

    x_ids (T, B) with x_table (V, G*H) instead of x: step t of row b takes its
    input projection x W_ih^T from row x_ids[t, b] of the table (the caller
    computed it once for every row of an embedding table, and checked the ids);
    w_ih is then not read. Not with bf16 or a projection.

    y_copy (T, B, O), rows evenly spaced as y's, or None: receives each h_t as it is
    written to y (a training call, whose cache keeps y); not with cache_weights.

    by_units=False: thread k takes rows order[bounds[k]:bounds[k+1]] and all
    hidden units; by_units=True: every thread takes all rows and its own hidden
    units. pack_ih / pack_hh choose the packed micro-kernel (decided by the
    caller from T and B, never from the thread count). bf16 (float32, no
    projection): every GEMM on bf16 operands (bf16_gemm.h), weights always packed.
    cache_weights (eval calls): keep the packed W_ih / W_hh slices for the next
    call with the same weights (_pack_cache.pxd), and run on team_pool.h's workers
    while they are awake, else on this thread a segment of steps at a time, asking
    again between segments, rather than wait for them (forward_on_pool). Returns
    False if OpenMP gave fewer threads than asked, or the pool could not be had
    (another call owns it, or its workers could not be made): the caller then runs
    the call on one thread. Frozen weights (Module.freeze()) are not hashed to find their
    packings: their digests were taken once (frozen_known).
    keep_packs (a training call's single step): find and keep the packed W_ih / W_hh
    slices in the pack cache as eval calls do, and nothing else of cache_weights: a
    cell's steps through a sequence read the same weights, which packing anew wrote
    and read for every step.
    """
    cdef tuple kd = frozen_known(cache_weights, w_ih.base, w_hh.base)   # before any allocation
    cdef Plan p
    cdef Py_ssize_t G = cell_gates(cell), H = w_ih.shape[0] // cell_gates(cell), I = w_ih.shape[1]
    cdef int nslices = n_threads if by_units else 1
    cdef int nchunks = 1 if by_units else <int> (bounds.shape[0] - 1)
    cdef int team = nslices * nchunks
    cdef floating *s_ih = NULL
    cdef floating *s_hh = NULL
    cdef const floating *p_ih = &w_ih[0, 0]
    cdef const floating *p_hh = &w_hh[0, 0]
    cdef floating *packed_hr = NULL
    cdef bint reset_before = cell == CELL_GRU_RESET_BEFORE
    cdef floating *rh = NULL            # (B, H) its r * h_{t-1}, shared by the team
    cdef uint16_t *b_ih = NULL
    cdef uint16_t *b_hh = NULL
    cdef int *fail = <int *> calloc(team, sizeof(int))
    cdef int tid, nthr, k, failed = 0
    cdef bint short_team = False, pooled = False, pool_busy = False
    cdef ForwardTeam ctx
    cdef int pack_threads = n_threads
    cdef uint64_t known[2]
    cdef const uint64_t *k_ih = NULL
    cdef const uint64_t *k_hh = NULL
    if kd is not None:
        known[0], known[1] = kd[0], kd[1]
        k_ih, k_hh = &known[0], &known[1]
    if x_ids is not None and (bf16 or w_hr is not None or x_table is None
                              or x_table.shape[1] != G * H or x_ids.shape[0] != y.shape[0]
                              or x_ids.shape[1] != y.shape[1]):
        free(fail)
        raise ValueError("x_ids: needs shape (T, B) and x_table (V, G*H), and neither bf16 "
                         "nor a projection")
    if reset_before and (bf16 or w_hr is not None
                         or (gates is None) != (aux is None)
                         or (aux is not None and (aux.shape[0] != y.shape[0]
                                                  or aux.shape[1] != y.shape[1]
                                                  or aux.shape[2] != H))):
        free(fail)
        raise ValueError("gates, aux: the reset-before GRU takes gates (T, B, 3H) with aux "
                         "(T, B, H) (training) or neither, and no bf16 or w_hr")
    memset(&p, 0, sizeof(Plan))
    p.cell, p.G, p.T, p.B, p.I, p.H, p.O = cell, G, y.shape[0], y.shape[1], I, H, h_n.shape[1]
    p.w_hr, p.hr = vptr2(w_hr), vptr3(hr)
    p.reverse, p.lengths, p.order = reverse, &lengths[0], &order[0]
    p.nslices, p.pack_ih, p.pack_hh = nslices, pack_ih, pack_hh
    p.bf16 = False
    if floating is float:
        p.bf16 = bf16 and w_hr is None
    if p.bf16:   # the bf16 panels replace both packed and in-place weights
        pack_ih = pack_hh = p.pack_ih = p.pack_hh = False
    p.w_ih, p.w_hh, p.bias, p.bias_h = p_ih, p_hh, vptr1(bias), vptr1(bias_h)
    p.x, p.h0, p.c0 = vptr3(x), vptr2(h0), vptr2(c0)
    if x_ids is not None:   # the table's rows replace the input projection's product
        p.x, p.x_ids = vptr2(x_table), &x_ids[0, 0]
        pack_ih = p.pack_ih = False
    p.y, p.h_n, p.c_n, p.gates, p.aux = &y[0, 0, 0], &h_n[0, 0], vptr2(c_n), vptr3(gates), vptr3(aux)
    p.ldy = evenly_spaced_rows(y.shape[0], y.shape[1], p.O, y.strides[0], y.strides[1],
                               sizeof(floating))
    if p.ldy < 0 or y.strides[2] != <Py_ssize_t> sizeof(floating):
        free(fail)
        raise ValueError(f"y: its T*B rows of {p.O} values must be evenly spaced and not "
                         f"overlap, got strides ({y.strides[0]}, {y.strides[1]}, "
                         f"{y.strides[2]}) for shape ({y.shape[0]}, {y.shape[1]}, {y.shape[2]})")
    if y_copy is not None:
        p.y_copy = &y_copy[0, 0, 0]
        p.ldy_copy = evenly_spaced_rows(y_copy.shape[0], y_copy.shape[1], p.O,
                                        y_copy.strides[0], y_copy.strides[1], sizeof(floating))
        if (cache_weights or p.ldy_copy < 0 or y_copy.strides[2] != <Py_ssize_t> sizeof(floating)
                or y_copy.shape[0] != y.shape[0] or y_copy.shape[1] != y.shape[1]
                or y_copy.shape[2] != y.shape[2]):
            free(fail)
            raise ValueError(f"y_copy: expected y's shape ({y.shape[0]}, {y.shape[1]}, "
                             f"{y.shape[2]}) with evenly spaced rows, and no cache_weights; got "
                             f"shape ({y_copy.shape[0]}, {y_copy.shape[1]}, {y_copy.shape[2]}), "
                             f"strides ({y_copy.strides[0]}, {y_copy.strides[1]}, "
                             f"{y_copy.strides[2]})")
    ctx.p, ctx.bounds, ctx.by_units, ctx.single, ctx.fails = &p, &bounds[0], by_units, \
        floating is float, fail
    if reset_before and aux is None:   # (a training call keeps r * h_{t-1} in aux's rows;
        rh = <floating *> malloc(y.shape[1] * H * sizeof(floating) + 1)   # allocated after
                                                                          # every check that raises)
    with nogil:
        # (not the reset-before GRU: a pool team may stop at a step's barrier, and its
        # mid-step one has no stop; its threads pack their own rows of w_hh per call)
        if cache_weights and not reset_before and 1 < team <= FASTRNN_POOL_MAX + 1:
            # an eval call: on the pool (forward_on_pool), unless another call owns it
            # (or the team is larger than the pool can make: then OpenMP's)
            if fastrnn_pool_enter(team):
                pooled, pack_threads = True, 1
            else:
                short_team = pool_busy = True   # the caller runs it on one thread
        if short_team:
            pack_ih = pack_hh = False
        elif pooled:
            pass                            # forward_on_pool packs what it runs
        else:
            if pack_ih:
                s_ih = gate_slices(p_ih, G, H, I, nslices, n_threads,
                                   cache_weights or keep_packs, k_ih)
            if packs_hh_slices(&p):
                s_hh = gate_slices(p_hh, G, H, p.O, nslices, n_threads,
                                   cache_weights or keep_packs, k_hh)
        if pack_hh and p.w_hr != NULL:
            packed_hr = pack_matrix(<const floating *> p.w_hr, p.O, H, False, pack_threads)
        if floating is float:
            if p.bf16 and not pooled and not short_team:    # forward_on_pool packs its own
                b_ih = bf16_gate_slices(p_ih, G, H, I, nslices, n_threads, cache_weights, k_ih)
                b_hh = bf16_gate_slices(p_hh, G, H, p.O, nslices, n_threads, cache_weights, k_hh)
        p.w_ih_slices, p.w_hh_slices, p.w_hr_packed = s_ih, s_hh, packed_hr
        p.rh = rh
        p.w_ih_bf16, p.w_hh_bf16 = b_ih, b_hh
        if short_team:
            pass
        elif (fail == NULL or (pack_ih and s_ih == NULL and not pooled)
                or (packs_hh_slices(&p) and s_hh == NULL and not pooled)
                or (reset_before and aux is None and rh == NULL)
                or (pack_hh and p.w_hr != NULL and packed_hr == NULL)
                or (p.bf16 and not pooled and (b_ih == NULL or b_hh == NULL))):
            failed = 1
        elif pooled:
            failed = forward_on_pool(&y[0, 0, 0], &p, &ctx, team,
                                     k_ih if k_ih != NULL and k_hh != NULL else NULL)
        else:
            with parallel(num_threads=team):
                tid = threadid()
                nthr = fastrnn_team_size()
                if nthr != team:
                    fail[tid] = 2    # fewer threads than slices/chunks: caller retries with one
                else:
                    forward_share(&ctx, tid, nthr)
            for k in range(team):
                if fail[k] == 1:
                    failed = 1
                elif fail[k] == 2:
                    short_team = True
        if pooled:
            fastrnn_pool_leave()
        elif n_threads > 1 and not pool_busy:
            fastrnn_pool_note_openmp()      # its workers spin now: fast-path calls go alone
    slices_free(s_ih); slices_free(s_hh); scratch_free(packed_hr); free(fail)
    free(rh)
    slices_free(b_ih); slices_free(b_hh)
    if failed:
        raise MemoryError("fastrnn recurrent forward: out of memory")
    return not short_team


include "dense_eval.pxi"


def backward(int cell, floating[:, :, ::1] dx, floating[:, ::1] dh0, floating[:, ::1] dc0,
             floating[:, ::1] dw_ih, floating[:, ::1] dw_hh, floating[:, ::1] dw_hr,
             floating[:, :, ::1] dgx, floating[:, :, ::1] dgh, floating[:, :, ::1] dhp,
             const floating[:, :, :] dy, const floating[:, ::1] dh_n,
             const floating[:, ::1] dc_n, const floating[:, :, ::1] aux,
             const floating[:, :, ::1] hr,
             const floating[:, :, ::1] y, const floating[:, ::1] h0, const floating[:, ::1] c0,
             const floating[:, :, ::1] x, const floating[:, :, ::1] h_prev,
             const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
             const floating[:, ::1] w_hr,
             const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
             const Py_ssize_t[::1] bounds, const Py_ssize_t[::1] valid, bint reverse,
             int n_threads, bint by_units, bint bf16=False, bint accumulate=False,
             const Py_ssize_t[:, ::1] x_ids=None, floating[:, ::1] dx_table=None,
             floating[::1] db_x=None, floating[::1] db_h=None, bint weights=True):
    """Backward through time. dy (T, B, O): rows t*B + b evenly spaced (a column block
    of a wider array, such as a bidirectional layer's half, is read in place), the last
    axis contiguous. dgx (T, B, G*H) holds forward's gates (RNN: any
    values) and is overwritten with dL/d(x W_ih^T); dgh (GRU only, else None)
    receives dL/d(h W_hh^T). aux: forward's aux (None for the RNN). A projected
    LSTM also passes w_hr, forward's hr, dhp (T, B, P) scratch and dw_hr (P, H).

    After the reverse loop (row chunks in parallel), three GEMMs over the rows
    t*B + b that exist, `valid` (ascending; None: all T*B) (_gradients.pxd):
        dx = dgx W_ih,   dw_ih = dgx^T x,   dw_hh = dgh^T h_prev   (dw_hr = dhp^T hr)
    h_prev (T, B, O) is the state each step read (a view of forward's hs).
    The reset-before GRU (CELL_GRU_RESET_BEFORE; no dgh) passes forward's aux, r * h_{t-1},
    which W_hn's gradient multiplies instead of h_prev (reset_before_weight_gradients).
    by_units: the reverse loop splits hidden units over n_threads threads
    (backward_units; small batches, no projection) instead of row chunks.
    bf16 (float32, no projection): the reverse loop's dh = da W_hh and the
    three GEMMs after it on bf16 operands (bf16_gemm.h), as forward ran with bf16.
    accumulate: add into dw_ih, dw_hh (and dw_hr) instead of overwriting them,
    so a module's .grad takes the gradient with no temporary and no extra pass.
    x_ids (T, B), as forward took its input projections from rows of a table: x and
    dw_ih are None, dx an empty array of the call's dtype (it selects the typed
    kernel), and dx_table (V, G*H) receives dL/d(table) instead, the sum of dgx's
    rows by id (_gradients.pxd); not with bf16 or a projection. The caller checked
    the ids lie in [0, V).
    db_x, db_h (G*H,) or None: receive the column sums of dL/d(x W_ih^T) and (GRU)
    dL/d(h W_hh^T) over the rows that exist, the biases' gradients, taken on the
    dW GEMM's pass over those columns; not with x_ids.
    weights False: dx only (no dW, no bias sums: dw_ih, dw_hh, db_x, db_h are not
    written); dgx (and dgh) keep the gate gradients for a later weight_gradients call
    (a cell's steps, summed once per sequence); not with x_ids or a projection.
    Returns False if OpenMP gave fewer threads than asked for the unit split
    (nothing is written; the caller retries with by_units=False).
    """
    cdef Plan p
    cdef Py_ssize_t G = cell_gates(cell), T = dy.shape[0], B = dy.shape[1], O = dy.shape[2]
    cdef Py_ssize_t H = w_ih.shape[0] // cell_gates(cell)
    cdef Py_ssize_t I = w_ih.shape[1], nchunks = bounds.shape[0] - 1, k
    cdef const Py_ssize_t *p_valid = &valid[0] if valid is not None else NULL
    cdef Py_ssize_t n_valid = valid.shape[0] if valid is not None else T * B
    cdef floating *packed_hhT = NULL
    cdef floating *packed_hrT = NULL
    cdef floating *packed_hnT = NULL
    cdef uint16_t *bf16_hhT = NULL
    cdef floating *p_dgx = &dgx[0, 0, 0]
    cdef bint reset_before = cell == CELL_GRU_RESET_BEFORE
    cdef int failed = 0, tid, nthr, q
    cdef bint short_team = False
    cdef bint in_place_hh, in_place_ih
    cdef Py_ssize_t rows
    cdef floating *dh = NULL
    cdef floating *dc = NULL
    cdef int *fail = NULL
    if x_ids is not None and (bf16 or w_hr is not None or dx_table is None
                              or dx_table.shape[1] != G * H or x_ids.shape[0] != T
                              or x_ids.shape[1] != B):
        raise ValueError("x_ids: needs shape (T, B) and dx_table (V, G*H), and neither bf16 "
                         "nor a projection")
    if not weights and (x_ids is not None or w_hr is not None):
        raise ValueError("weights=False: not with x_ids or a projection")
    if x_ids is not None and (db_x is not None or db_h is not None):
        raise ValueError("db_x, db_h: not with x_ids (the table's rows take dL/d(x W_ih^T))")
    for name, db in (("db_x", db_x), ("db_h", db_h)):
        if db is not None and db.shape[0] != G * H:
            raise ValueError(f"{name}: needs shape ({G * H},), got ({db.shape[0]},)")
    if db_h is not None and dgh is None:
        raise ValueError("db_h: only with dgh (GRU); dgx's sums are db_x")
    if reset_before and (bf16 or w_hr is not None or not weights
                         or dgh is not None or aux is None or aux.shape[0] != T
                         or aux.shape[1] != B or aux.shape[2] != H):
        raise ValueError("aux: the reset-before GRU's backward takes aux (T, B, H), forward's "
                         "r * h_{t-1}, and no bf16, w_hr, dgh or weights=False")
    memset(&p, 0, sizeof(Plan))
    p.cell, p.G, p.T, p.B, p.I, p.H, p.O = cell, G, T, B, I, H, O
    p.w_hr, p.hr, p.dhp = vptr2(w_hr), vptr3(hr), vptr3(dhp)
    p.reverse, p.lengths, p.order = reverse, &lengths[0], &order[0]
    p.w_ih, p.w_hh = &w_ih[0, 0], &w_hh[0, 0]
    p.y, p.aux, p.h0, p.c0 = vptr3(y), vptr3(aux), vptr2(h0), vptr2(c0)
    p.ldy = O
    p.gates, p.dgh, p.dy, p.dh_n, p.dc_n = p_dgx, vptr3(dgh), &dy[0, 0, 0], vptr2(dh_n), vptr2(dc_n)
    p.lddy = evenly_spaced_rows(T, B, O, dy.strides[0], dy.strides[1], sizeof(floating))
    if p.lddy < 0 or (O > 1 and dy.strides[2] != <Py_ssize_t> sizeof(floating)):
        raise ValueError(f"dy: its T*B rows of {O} values must be evenly spaced and not "
                         f"overlap, got strides ({dy.strides[0]}, {dy.strides[1]}, "
                         f"{dy.strides[2]}) for shape ({T}, {B}, {O})")
    p.dh0, p.dc0 = &dh0[0, 0], vptr2(dc0)
    p.bf16 = False
    if floating is float:
        p.bf16 = bf16 and w_hr is None
    # One step: dh = da W_hh and dx = dgx W_ih read the weights in place (gemm_nn:
    # the same numbers) where that pays (reads_in_place); packing their transposes
    # wrote and read them once more than the products read them. LSTMCell(300, 1000)
    # B=8, 2-core Xeon (AVX-512), one core, C harness: 4000 x 1000 W_hh packed +
    # product 2.2-2.4 ms, in place 0.9. Rows a thread takes: dh, its row chunk (or,
    # split by units, every row and its columns); dx, every row and its columns.
    rows = B if by_units else 0
    for k in range(nchunks):
        rows = max(rows, bounds[k + 1] - bounds[k])
    in_place_hh = reads_in_place(T, rows, O * sizeof(floating)) and not p.bf16
    in_place_ih = reads_in_place(T, B, I * sizeof(floating)) and not p.bf16
    with nogil:
        if p.bf16:
            if floating is float:
                bf16_hhT = bf16_pack_matrix(&w_hh[0, 0], G * H, O, True, n_threads)  # (O x G*H)
                p.w_hh_bf16 = bf16_hhT
        elif reset_before and not in_place_hh:   # W_h{r,z}^T (O x 2H) and W_hn^T (O x H)
            packed_hhT = pack_matrix(&w_hh[0, 0], 2 * H, O, True, n_threads)
            packed_hnT = pack_matrix(&w_hh[2 * H, 0], H, O, True, n_threads)
        elif not in_place_hh:
            packed_hhT = pack_matrix(&w_hh[0, 0], G * H, O, True, n_threads)   # w_hh^T: (O x G*H)
        p.w_hh_slices, p.w_hn_packed = packed_hhT, packed_hnT
        if p.w_hr != NULL:
            packed_hrT = pack_matrix(<const floating *> p.w_hr, O, H, True, n_threads)  # (H x P)
            p.w_hr_packed = packed_hrT
        if ((bf16_hhT == NULL if p.bf16 else (packed_hhT == NULL and not in_place_hh))
                or (reset_before and packed_hnT == NULL and not in_place_hh)
                or (p.w_hr != NULL and packed_hrT == NULL)):
            failed = 1
        elif by_units and p.w_hr == NULL and n_threads > 1:
            dh = <floating *> calloc(B * O + 1, sizeof(floating))
            dc = <floating *> calloc(B * H + 1, sizeof(floating))
            fail = <int *> calloc(n_threads, sizeof(int))
            if dh == NULL or dc == NULL or fail == NULL:
                failed = 1
            else:
                with parallel(num_threads=n_threads):
                    tid = threadid()
                    nthr = fastrnn_team_size()
                    if nthr != n_threads:
                        fail[tid] = 2    # a short team: the caller retries with the row split
                    else:
                        backward_units(p_dgx, &p, dh, dc, fail, tid, nthr)
                for q in range(n_threads):
                    if fail[q] == 1:
                        failed = 1
                    elif fail[q] == 2:
                        short_team = True
        else:
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += backward_chunk(p_dgx, &p, &order[bounds[k]],
                                         bounds[k + 1] - bounds[k]) != 0
        if not failed and not short_team and x_ids is not None:
            rows_scatter_add(&dx_table[0, 0], dx_table.shape[0], p_dgx, &x_ids[0, 0],
                             p_valid, n_valid, G * H, n_threads)
            if reset_before:    # (no dw_ih: the table's rows took dL/d(x W_ih^T))
                failed = reset_before_weight_gradients(
                    NULL, &dw_hh[0, 0], p_dgx, NULL, &h_prev[0, 0, 0], &aux[0, 0, 0], p_valid,
                    n_valid, H, I, n_threads, accumulate, NULL) != 0
            else:
                failed = weight_gradient(&dw_hh[0, 0],
                                         <floating *> p.dgh if p.dgh != NULL else p_dgx,
                                         &h_prev[0, 0, 0], p_valid, n_valid, G * H, O,
                                         n_threads, accumulate) != 0
        elif not failed and not short_team and reset_before:
            failed = input_gradient(&dx[0, 0, 0], p_dgx, &w_ih[0, 0], p_valid, n_valid, G * H,
                                    I, n_threads, False, in_place_ih) != 0
            if not failed:
                failed = reset_before_weight_gradients(
                    &dw_ih[0, 0], &dw_hh[0, 0], p_dgx, &x[0, 0, 0], &h_prev[0, 0, 0],
                    &aux[0, 0, 0], p_valid, n_valid, H, I, n_threads, accumulate,
                    <floating *> vptr1(db_x)) != 0
        elif not failed and not short_team and not weights:
            failed = input_gradient(&dx[0, 0, 0], p_dgx, &w_ih[0, 0], p_valid, n_valid, G * H,
                                    I, n_threads, p.bf16, in_place_ih) != 0
        elif not failed and not short_team:
            failed = input_and_weight_gradients(
                &dx[0, 0, 0], &dw_ih[0, 0], &dw_hh[0, 0], p_dgx,
                <floating *> p.dgh if p.dgh != NULL else p_dgx,
                &x[0, 0, 0], &h_prev[0, 0, 0], &w_ih[0, 0], p_valid, n_valid, G * H, I, O,
                n_threads, p.bf16, accumulate, <floating *> vptr1(db_x),
                <floating *> vptr1(db_h), in_place_ih) != 0
            if not failed and p.w_hr != NULL:
                failed = weight_gradient(&dw_hr[0, 0], <const floating *> p.dhp,
                                         <const floating *> p.hr, p_valid, n_valid, O, H,
                                         n_threads, accumulate) != 0
        scratch_free(packed_hhT)
        scratch_free(packed_hnT)
        scratch_free(packed_hrT)
        scratch_free(bf16_hhT)
        free(dh); free(dc); free(fail)
        if n_threads > 1:
            fastrnn_pool_note_openmp()      # as forward's
    if failed:
        raise MemoryError("fastrnn recurrent backward: out of memory")
    return not short_team


def _rows_in(list parts, str name):
    """Rows of the 2-D arrays in parts, in all (ValueError naming `name` otherwise)."""
    cdef Py_ssize_t total = 0
    for part in parts:
        if getattr(part, "ndim", 0) != 2:
            raise ValueError(f"weight_gradients: {name}: expected 2-D arrays, got "
                             f"{type(part).__name__} of {getattr(part, 'ndim', '?')} dims")
        total += part.shape[0]
    return total


cdef Py_ssize_t gather_rows(list parts, Py_ssize_t width, const floating **rows,
                            Py_ssize_t V, floating *kind, str name) except -1:
    """rows[0:V] := pointers to the rows of parts (2-D C-contiguous arrays of this dtype,
    `width` columns each, V rows in all), in order; raises ValueError if they do not
    fit. `kind` only selects the dtype."""
    cdef const floating[:, ::1] a
    cdef Py_ssize_t off = 0, r
    total = _rows_in(parts, name)
    if total != V:
        raise ValueError(f"weight_gradients: {name}: expected {V} rows in all (dgx's), "
                         f"got {total}")
    for part in parts:
        try:
            a = part
        except ValueError as exc:   # another dtype, or not C-contiguous
            raise ValueError(f"weight_gradients: {name}: {exc}") from None
        if a.shape[1] != width or off + a.shape[0] > V:
            raise ValueError(f"weight_gradients: {name}: expected rows of {width} values, "
                             f"{V} in all, got a part of shape {tuple(part.shape)}")
        for r in range(a.shape[0]):
            rows[off + r] = &a[r, 0]
        off += a.shape[0]
    return off


def weight_gradients(floating[:, ::1] dw_ih, floating[:, ::1] dw_hh, dgx, dgh, x, h_prev,
                     int n_threads, bint accumulate=False, floating[::1] db_x=None,
                     floating[::1] db_h=None):
    """The weight gradients backward(weights=False) left out, over V rows gathered
    from any number of calls (a cell's steps):
        dw_ih (+)= dgx^T x,   dw_hh (+)= dgh^T h_prev   (dgh None: dgx, RNN and LSTM)
    dgx, dgh (V, G*H), x (V, I), h_prev (V, H): each one array or a list of arrays
    whose rows, in order, make it (a cell's steps, read where they are, not joined
    into one copy first); dw_ih (G*H, I), dw_hh (G*H, H). accumulate: add into dw_ih,
    dw_hh. db_x, db_h (G*H,) or None := the column sums of dgx and (with dgh) dgh.
    Summed in row order, the same for any thread count and any cut into parts."""
    parts = [[a] if not isinstance(a, (list, tuple)) else list(a)
             for a in (dgx, x, h_prev)]
    gh_parts = None if dgh is None else ([dgh] if not isinstance(dgh, (list, tuple))
                                         else list(dgh))
    cdef Py_ssize_t GH = dw_ih.shape[0], I = dw_ih.shape[1], H = dw_hh.shape[1]
    cdef Py_ssize_t V = _rows_in(parts[0], "dgx")
    cdef int failed = 0
    if (V < 1 or GH < 1 or I < 1 or H < 1 or dw_hh.shape[0] != GH
            or (db_x is not None and db_x.shape[0] != GH)
            or (db_h is not None and (dgh is None or db_h.shape[0] != GH))):
        raise ValueError(f"weight_gradients: dgx ({V}, {GH}) rows, dw_ih ({GH}, {I}), "
                         f"dw_hh ({dw_hh.shape[0]}, {H}), and the bias sums must match "
                         "(db_h only with dgh)")
    cdef const floating **gx = <const floating **> malloc(V * sizeof(void *) + 1)
    cdef const floating **gh = NULL
    cdef const floating **xr = <const floating **> malloc(V * sizeof(void *) + 1)
    cdef const floating **hr = <const floating **> malloc(V * sizeof(void *) + 1)
    try:
        if gh_parts is not None:
            gh = <const floating **> malloc(V * sizeof(void *) + 1)
        if gx == NULL or xr == NULL or hr == NULL or (gh_parts is not None and gh == NULL):
            raise MemoryError("fastrnn recurrent weight_gradients: out of memory")
        gather_rows(parts[0], GH, gx, V, &dw_ih[0, 0], "dgx")
        gather_rows(parts[1], I, xr, V, &dw_ih[0, 0], "x")
        gather_rows(parts[2], H, hr, V, &dw_ih[0, 0], "h_prev")
        if gh_parts is not None:
            gather_rows(gh_parts, GH, gh, V, &dw_ih[0, 0], "dgh")
        with nogil:
            failed = weight_gradients_of_rows(&dw_ih[0, 0], &dw_hh[0, 0], gx,
                                              gx if gh == NULL else gh, xr, hr, V, GH, I, H,
                                              n_threads, False, accumulate,
                                              <floating *> vptr1(db_x),
                                              <floating *> vptr1(db_h)) != 0
            if n_threads > 1:
                fastrnn_pool_note_openmp()      # as backward's
    finally:
        free(gx); free(gh); free(xr); free(hr)
    if failed:
        raise MemoryError("fastrnn recurrent weight_gradients: out of memory")


# Single steps' backward reads W_hh and W_ih in place (backward); off only in the
# test that checks it gives the packed products' bits (_set_in_place_steps).
cdef bint in_place_steps = True

# Rows (of a single step, per thread) up to which its backward reads a weight in place
# whatever the weight's row stride; past it, up to FASTRNN_NN_MAX_ROWS rows, only when
# the stride is not a multiple of NN_CONFLICT_STRIDE bytes. Each register tile re-reads
# a K block of NR columns, and rows a multiple of 1-2 KB apart fall in a few cache
# sets, so with many tiles those re-reads miss. One core, C harness, 2-core Xeon
# (AVX-512), packed + product against in place, ms: 8 rows x 2048 x 512 (2 KB rows)
# 0.52 / 0.23, 24 rows 0.65 / 0.58, 32 rows 0.73 / 0.78, 64 rows 1.14 / 1.54; rows of
# 4000 B: 32 x 4000 x 1000 3.27 / 2.46, 64 rows 5.35 / 5.37; 3 KB rows: 64 x 3072 x 768
# 2.70 / 2.46. In whole cells on 2 threads (the packing shared, the rows split) 32
# rows a thread read in place did better than the harness says: GRUCell(512, 512) B=32
# training loop 77-80 ms in place against 101 packed.
DEF NN_FEW_ROWS = 32
DEF NN_CONFLICT_STRIDE = 1024


cdef inline bint reads_in_place(Py_ssize_t T, Py_ssize_t rows, size_t row_bytes) noexcept nogil:
    """Does a backward of T steps, `rows` rows per thread, read a weight with rows of
    row_bytes in place (gemm_nn) rather than pack its transpose? Single steps only."""
    if not in_place_steps or T != 1 or rows > FASTRNN_NN_MAX_ROWS:
        return False
    return rows <= NN_FEW_ROWS or row_bytes % NN_CONFLICT_STRIDE != 0


def _set_in_place_steps(bint on):
    """Let single steps' backward read the weights in place (on) or pack their
    transposes as longer calls do; returns the previous setting. For tests."""
    global in_place_steps
    cdef bint before = in_place_steps
    in_place_steps = on
    return before


# Bytes of a_t one input-projection GEMM writes ahead, per thread, when threads
# split the hidden units (small batches): a quarter of a core's L2, at least
# BLOCK_VALUES values (_set_l2_bytes; that floor until it is called). Each block
# streams the thread's slice of W_ih through L2, evicting its slice of W_hh, so
# small batches, whose blocks are few rows, want more steps per block than
# BLOCK_VALUES gives. 2-core Xeon KVM guest (AVX-512, 2 MB L2 per core), eval,
# T=50 unless said, medians of 60 calls in two rounds, 128 KB -> 512 KB blocks,
# ms: LSTM I=H=512 B=2 2.85-2.86 -> 2.67-2.72, B=4 3.75-3.93 -> 3.48-3.76, B=8
# 6.02-6.22 -> 5.67-5.79; GRU I=H=512 B=2 1.75-1.84 -> 1.65-1.67; I=H=1024 T=25
# B=16 19.3-19.5 -> 17.2-17.3. 1 MB blocks were no better. The row split (a
# thread owns every unit) keeps BLOCK_VALUES: the same change there read LSTM
# (256, 256, 100, 64) 20.5-20.9 -> 20.2-20.6 ms and RNN 5.0-5.1 -> 5.1-5.3.
# A 1 MB L2 (Zen 4) gets 256 KB blocks by the same rule; not measured there (on
# the Zen 4, blocks of 32768 values of a_t against longer ones left small batches
# within noise: docs/results-history.md, "Session 18: input blocks").
cdef Py_ssize_t units_block_bytes = 0

# A thread's packed slice of W_hh larger than this (half a core's L2; 0: unknown) is
# read in one panel order at even steps and the reverse at odd ones. A cyclic sweep
# over a block a little larger than the cache misses every line (the last used go
# first); sweeping back and forth starts where the last sweep ended, still in L2.
# 2-core Xeon KVM guest (AVX-512, 2 MB L2 a core), eval, T=50, three alternating
# process pairs, medians of 80 calls, ms: LSTM I=H=512 B=2 (2 MB slices) 2.83-3.58 ->
# 2.51-2.63, B=4 3.82-3.86 -> 3.49-3.50; RNN I=H=1024 B=2 2.72-2.78 -> 2.44-2.50;
# LSTM B=8 and GRU I=H=512 B=2 and 8 (1.5 MB slices) within noise; an LSTM
# I=H=256 B=1 (0.5 MB) read 0.65-0.69 -> 0.69-0.71 with it, so it stays off there.
cdef Py_ssize_t zigzag_bytes = 0


def _set_l2_bytes(Py_ssize_t l2):
    """Size the unit split's input-projection blocks, the weight slices read back
    and forth, and the dW GEMMs' tasks, for a core's L2 of l2 bytes (0: unknown)."""
    global units_block_bytes, zigzag_bytes
    units_block_bytes = l2 // 4 if l2 > 0 else 0
    zigzag_bytes = l2 // 2 if l2 > 0 else 0
    dw_set_l2_bytes(l2)   # the dW GEMMs' task size (_gradients.pxd)


def _set_isa(int level):
    """Run this module's kernels at ISA `level` (src/isa.h); False if the CPU lacks it.
    Called by fastrnn._isa for every kernel module at once."""
    return fastrnn_isa_set(level) == 0


def _release_scratch():
    """Free the packed-weight buffers this module keeps between calls (src/scratch.h)
    and its idle cached packed weights (src/pack_cache.h)."""
    scratch_release()
    pack_cache_clear()


def _pack_cache_stats():
    """(entries, bytes) of packed weights this module keeps for eval calls."""
    cdef size_t entries = 0, nbytes = 0
    pack_cache_stats(&entries, &nbytes)
    return int(entries), int(nbytes)


def _pack_cache_enable(bint on):
    """Keep packed weights between eval calls (the default) or not (A/B timing,
    FASTRNN_PACK_CACHE=0)."""
    pack_cache_set_off(0 if on else 1)


def note_openmp():
    """An OpenMP region of fastrnn's outside this module has just ended (an optimiser's
    step): its workers spin for a while, so fast-path eval calls run alone for the
    window, as after a training call's forward or backward (team_pool.h)."""
    fastrnn_pool_note_openmp()


def _pack_cache_enabled():
    return not pack_cache_is_off()


def _digest(const unsigned char[::1] data, int n_threads=1):
    """The weights digest of pack_cache.h over these bytes (tests)."""
    cdef size_t n = data.shape[0]
    cdef unsigned long long h
    with nogil:
        h = weights_digest(&data[0] if n > 0 else NULL, n, n_threads)
    return int(h)


def _amx_bf16():
    """Do the bf16 GEMMs ("medium" precision) run on AMX tiles at this module's ISA?"""
    return bool(fastrnn_bf16_amx())


def _bf16_gemm():
    """What runs the bf16 GEMMs at this module's ISA: "amx_bf16" (tiles), "avx512_bf16"
    (vdpbf16ps) or "widened" (bf16 values widened to float32 for FMAs)."""
    if fastrnn_bf16_amx():
        return "amx_bf16"
    return "avx512_bf16" if fastrnn_bf16_level() == QG_AVX512_BF16 else "widened"


def _isa_level():
    """The ISA level this module's kernels run at."""
    return fastrnn_isa_level()
