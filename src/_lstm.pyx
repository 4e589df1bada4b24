# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""LSTM kernels for one layer, one direction: `forward` and `backward`.

Shapes: T steps, B batch, I input, H hidden; gate order i, f, g, o (torch.nn).

    a_t = x_t W_ih^T + h_{t-1} W_hh^T + b_ih + b_hh          (B, 4H)
    i, f, o = sigmoid(a_i, a_f, a_o);   g = tanh(a_g)
    c_t = f * c_{t-1} + i * g;           h_t = o * tanh(c_t)

Saved for backward (training only):
    gates (T, B, 4H)  activated i, f, g, o; backward overwrites them with dL/da
    cs    (T, B, H)   c_t
    hs    (T+1, B, H) h_t, with h0 in the extra slot (slot 0 forward, slot T reverse)

Callers (fastrnn.functional) validate every shape and dtype first; these
functions trust their arguments and run without the GIL.
"""
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from cython.parallel cimport prange, parallel, threadid

from _gradients cimport input_and_weight_gradients
from _simd cimport fastrnn_isa_set, fastrnn_isa_level, floating, gemm_rows
from _schedule cimport (BLOCK_ROWS, ptr3, cptr2, time_index, n_active,
                       pack_matrix, unit_start, gate_slices, slice_offset,
                       fastrnn_barrier, fastrnn_team_size)

cdef extern from "lstm_pointwise.h" nogil:
    void fastrnn_lstm_forward_pointwise_s(float *ai, float *af, float *ag, float *ao,
                                          const float *bias, const float *c_prev,
                                          float *c_new, float *h, Py_ssize_t n)
    void fastrnn_lstm_forward_pointwise_d(double *ai, double *af, double *ag, double *ao,
                                          const double *bias, const double *c_prev,
                                          double *c_new, double *h, Py_ssize_t n)
    void fastrnn_lstm_backward_pointwise_s(float *gi, float *gf, float *gg, float *go,
                                           float *dc_carry, const float *dh_carry,
                                           const float *dy, const float *c_prev,
                                           const float *c, Py_ssize_t H)
    void fastrnn_lstm_backward_pointwise_d(double *gi, double *gf, double *gg, double *go,
                                           double *dc_carry, const double *dh_carry,
                                           const double *dy, const double *c_prev,
                                           const double *c, Py_ssize_t H)


cdef inline void forward_pointwise(floating *ai, floating *af, floating *ag, floating *ao,
                                   const floating *bias, const floating *c_prev,
                                   floating *c_new, floating *h, Py_ssize_t n) noexcept nogil:
    """One row's gate pass for n units (lstm_pointwise.h): a + bias -> activated gates in
    place, c_new = f c_prev + i g, h = o tanh(c_new). bias holds 4n values, gate by gate."""
    if floating is float:
        fastrnn_lstm_forward_pointwise_s(ai, af, ag, ao, bias, c_prev, c_new, h, n)
    else:
        fastrnn_lstm_forward_pointwise_d(ai, af, ag, ao, bias, c_prev, c_new, h, n)


cdef inline void backward_pointwise(floating *gi, floating *gf, floating *gg, floating *go,
                                    floating *dc_carry, const floating *dh_carry,
                                    const floating *dy, const floating *c_prev,
                                    const floating *c, Py_ssize_t H) noexcept nogil:
    """One row of backward's elementwise pass (lstm_pointwise.h): gates -> dL/da in place;
    c is c_t (its tanh is recomputed), c_prev c_{t-1}."""
    if floating is float:
        fastrnn_lstm_backward_pointwise_s(gi, gf, gg, go, dc_carry, dh_carry, dy, c_prev, c, H)
    else:
        fastrnn_lstm_backward_pointwise_d(gi, gf, gg, go, dc_carry, dh_carry, dy, c_prev, c, H)


cdef void forward_thread(
        floating *y,                # OUT (T, B, H) h_t at valid steps; also read back as h_{t-1}
        floating *h_n,              # OUT (B, H) state after each row's last step
        floating *c_n,              # OUT (B, H)
        floating *gates,            # OUT (T, B, 4H) activated i, f, g, o, or NULL (inference)
        floating *cs,               # OUT (T, B, H) c_t, or NULL (inference)
        int *fail,                  # SHARED (nthr,) allocation failure per thread
        const floating *x,          # IN  (T, B, I)
        const floating *h0,         # IN  (B, H) or NULL for zeros
        const floating *c0,         # IN  (B, H) or NULL for zeros
        const floating *w_ih_s,     # IN  this thread's 4*hk rows of w_ih (gate_slices), or w_ih
        const floating *w_hh_s,     # IN  this thread's 4*hk rows of w_hh, likewise
        bint pack_ih, bint pack_hh, # are w_ih_s / w_hh_s packed panels (else row-major)
        const floating *bias,       # IN  (4H,) b_ih + b_hh, or NULL
        const Py_ssize_t *order,    # IN  (B,) batch rows by decreasing length
        Py_ssize_t r0, Py_ssize_t r1,  # this thread's rows: order[r0:r1]
        Py_ssize_t j0, Py_ssize_t j1,  # this thread's hidden units [j0, j1)
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H, bint reverse,
        bint sync,                  # threads share rows: barrier after every step
        int tid, int nthr) noexcept nogil:
    """One thread's share of the forward pass: rows order[r0:r1], hidden units [j0, j1).

    Large batches split rows (each thread all units, no barrier); small batches
    split units (each thread all rows and its own slice of every gate, so its
    weights stay in its cache; one barrier per step). The numbers are the same
    bit for bit either way: each output element is computed by the same code.

    Nothing is copied per step: a_t is built where the gates cache keeps it
    (when this thread owns all units), h_t is written straight into y and read
    back from there as the next step's GEMM input, c_t straight into cs.
    """
    cdef Py_ssize_t nrows = r1 - r0, hk = j1 - j0, GK = 4 * (j1 - j0)
    cdef Py_ssize_t maxlen = lengths[order[r0]] if nrows > 0 else 0
    cdef Py_ssize_t tb = (BLOCK_ROWS + nrows - 1) // nrows if nrows > 0 else 1
    if tb > maxlen:
        tb = maxlen
    if tb < 1:
        tb = 1
    cdef bint in_cache = gates != NULL and hk == H
    cdef Py_ssize_t gk = GK if GK > 0 else 1
    cdef Py_ssize_t nr = nrows if nrows > 0 else 1
    cdef floating *bl = <floating *> calloc(gk, sizeof(floating))              # (4hk,) bias slice
    cdef floating *c = <floating *> calloc(nr * gk, sizeof(floating))          # (nrows, hk) c0, then c_t at inference
    cdef floating *zeros = <floating *> calloc(H + 1, sizeof(floating))        # (H,) h0 when None
    cdef floating *gxb = NULL                                                  # (tb, nrows, 4hk) unless in_cache
    cdef const floating **src = <const floating **> malloc(tb * nr * sizeof(void *))
    cdef floating **dst = <floating **> malloc(tb * nr * sizeof(void *))
    cdef const floating **h_rows = <const floating **> malloc(nr * sizeof(void *))  # h_{t-1}, full rows
    cdef floating **a_rows = <floating **> malloc(nr * sizeof(void *))        # a_t rows (4hk)
    cdef floating **c_rows = <floating **> malloc(nr * sizeof(void *))        # c_{t-1} rows (hk)
    cdef Py_ssize_t r, b, s, s0, s1, t, j, g, m, nact
    cdef int q, failed = 0
    cdef floating *ar
    cdef floating *cr
    cdef floating *cnew
    if not in_cache:
        gxb = <floating *> malloc(tb * nr * gk * sizeof(floating))
    fail[tid] = (bl == NULL or c == NULL or zeros == NULL
                 or (gxb == NULL and not in_cache) or src == NULL or dst == NULL
                 or h_rows == NULL or a_rows == NULL or c_rows == NULL)
    if not fail[tid]:
        for g in range(4):
            if bias != NULL:
                memcpy(bl + g * hk, bias + g * H + j0, hk * sizeof(floating))
        for r in range(nrows):
            b = order[r0 + r]
            h_rows[r] = h0 + b * H if h0 != NULL else zeros
            c_rows[r] = c + r * hk
            if c0 != NULL:
                memcpy(c + r * hk, c0 + b * H + j0, hk * sizeof(floating))
    if sync:
        fastrnn_barrier()
        for q in range(nthr):
            failed = failed + fail[q]
    else:
        failed = fail[tid]
    if failed or GK == 0 and not sync:
        maxlen = 0   # all threads skip the loop together: no barrier is left waiting
    s0 = 0
    while s0 < maxlen:
        s1 = min(s0 + tb, maxlen)
        # Input projection for steps [s0, s1): one GEMM over all running rows,
        # into the rows where each step's pre-activation a_t is then built.
        m = 0
        for s in range(s0, s1):
            nact = n_active(order + r0, nrows, lengths, s)
            for r in range(nact):
                b = order[r0 + r]
                t = time_index(s, lengths[b], reverse)
                src[m] = x + (t * B + b) * I
                dst[m] = (gates + (t * B + b) * 4 * H if in_cache
                          else gxb + ((s - s0) * nrows + r) * GK)
                m = m + 1
        if GK > 0:
            gemm_rows(m, GK, I, src, w_ih_s if pack_ih else NULL, w_ih_s, I, dst, 0)
        # Recurrence: a_t += h_{t-1} W_hh^T in place, then one fused gate pass.
        for s in range(s0, s1):
            nact = n_active(order + r0, nrows, lengths, s)
            for r in range(nact):
                b = order[r0 + r]
                t = time_index(s, lengths[b], reverse)
                a_rows[r] = (gates + (t * B + b) * 4 * H if in_cache
                             else gxb + ((s - s0) * nrows + r) * GK)
            if GK > 0:
                gemm_rows(nact, GK, H, h_rows, w_hh_s if pack_hh else NULL, w_hh_s, H,
                          a_rows, 1)
            for r in range(nact if GK > 0 else 0):
                b = order[r0 + r]
                t = time_index(s, lengths[b], reverse)
                ar = a_rows[r]
                cr = c_rows[r]
                cnew = cs + (t * B + b) * H + j0 if cs != NULL else cr   # inference: in place
                forward_pointwise(ar, ar + hk, ar + 2 * hk, ar + 3 * hk, bl, cr, cnew,
                                  y + (t * B + b) * H + j0, hk)
                c_rows[r] = cnew
                if gates != NULL and not in_cache:
                    for g in range(4):
                        memcpy(gates + (t * B + b) * 4 * H + g * H + j0, ar + g * hk,
                               hk * sizeof(floating))
            if sync:
                fastrnn_barrier()   # h_t complete (every thread's units) before anyone reads it
            for r in range(nact):   # h_t is next step's h_{t-1}
                b = order[r0 + r]
                h_rows[r] = y + (time_index(s, lengths[b], reverse) * B + b) * H
        s0 = s1
    if not failed:
        for r in range(nrows):
            b = order[r0 + r]
            memcpy(h_n + b * H + j0, h_rows[r] + j0, hk * sizeof(floating))
            memcpy(c_n + b * H + j0, c_rows[r], hk * sizeof(floating))
    free(bl); free(c); free(zeros); free(gxb)
    free(src); free(dst); free(h_rows); free(a_rows); free(c_rows)


cdef int backward_chunk(
        floating *dgates,           # IN/OUT (T, B, 4H): activated gates in, dL/da out (0 at padded steps)
        floating *dh0,              # OUT (B, H)
        floating *dc0,              # OUT (B, H)
        const floating *dy,         # IN  (T, B, H)
        const floating *dh_n,       # IN  (B, H) or NULL for zeros
        const floating *dc_n,       # IN  (B, H) or NULL for zeros
        const floating *cs,         # IN  (T, B, H) c_t saved by forward
        const floating *c0,         # IN  (B, H) or NULL for zeros
        const floating *packed_hhT, # IN  packed w_hh^T (H x 4H)
        const Py_ssize_t *rows, Py_ssize_t nrows,
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, bint reverse) noexcept nogil:
    """Reverse loop for one chunk: gate gradients and dh, dc carried back. 0, or -1 if out of memory.

        dh = dy_t + (dL/da_{t+1}) W_hh              do = dh * tanh(c_t)
        dc = dc_{t+1} * f_{t+1} + dh * o * (1 - tanh(c_t)^2)
        di = dc * g,  df = dc * c_{t-1},  dg = dc * i;  da = d(gate) * activation'
    """
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef floating *dh = <floating *> calloc(nrows * H, sizeof(floating))   # (nrows, H) carried dL/dh
    cdef floating *dc = <floating *> calloc(nrows * H, sizeof(floating))   # (nrows, H) carried dL/dc
    cdef floating *zeros = <floating *> calloc(H, sizeof(floating))
    cdef const floating **da_rows = <const floating **> malloc(nrows * sizeof(void *))
    cdef floating **dh_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef int status = 0
    cdef Py_ssize_t r, b, s, t, j, nact
    cdef floating *g
    cdef const floating *dyr
    cdef const floating *cprev
    cdef floating *dhr
    cdef floating *dcr
    if dh == NULL or dc == NULL or zeros == NULL or da_rows == NULL or dh_rows == NULL:
        status = -1
    else:
        for r in range(nrows):
            b = rows[r]
            dh_rows[r] = dh + r * H
            if dh_n != NULL:
                memcpy(dh + r * H, dh_n + b * H, H * sizeof(floating))
            if dc_n != NULL:
                memcpy(dc + r * H, dc_n + b * H, H * sizeof(floating))
            for t in range(lengths[b], T):   # padding contributes nothing to dW, dX
                memset(dgates + (t * B + b) * G, 0, G * sizeof(floating))
        for s in range(maxlen - 1, -1, -1):
            nact = n_active(rows, nrows, lengths, s)
            for r in range(nact):
                b = rows[r]
                t = time_index(s, lengths[b], reverse)
                g = dgates + (t * B + b) * G
                dyr = dy + (t * B + b) * H
                if s > 0:
                    cprev = cs + ((t + 1 if reverse else t - 1) * B + b) * H
                elif c0 != NULL:
                    cprev = c0 + b * H
                else:
                    cprev = zeros
                dhr = dh + r * H
                dcr = dc + r * H
                backward_pointwise(g, g + H, g + 2 * H, g + 3 * H, dcr, dhr, dyr, cprev,
                                   cs + (t * B + b) * H, H)
                da_rows[r] = g
            # dh_{t-1} = da_t W_hh  (rows past nact keep the dh_n they started with)
            gemm_rows(nact, H, G, da_rows, packed_hhT, NULL, 0, dh_rows, 0)
        for r in range(nrows):
            b = rows[r]
            memcpy(dh0 + b * H, dh + r * H, H * sizeof(floating))
            memcpy(dc0 + b * H, dc + r * H, H * sizeof(floating))
    free(dh); free(dc); free(zeros); free(da_rows); free(dh_rows)
    return status


def forward(floating[:, :, ::1] y, floating[:, ::1] h_n, floating[:, ::1] c_n,
            floating[:, :, ::1] gates, floating[:, :, ::1] cs,
            const floating[:, :, ::1] x, const floating[:, ::1] h0, const floating[:, ::1] c0,
            const floating[:, ::1] w_ih, const floating[:, ::1] w_hh, const floating[::1] bias,
            const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
            const Py_ssize_t[::1] bounds, bint reverse, bint pack_ih, bint pack_hh,
            int n_threads, bint by_units):
    """LSTM forward over all steps; arrays as in forward_thread, gates/cs None for inference.

    order (B,) sorts rows by decreasing length. by_units=False: thread k takes rows
    order[bounds[k]:bounds[k+1]] and all hidden units; by_units=True: every thread
    takes all rows and its own hidden units. pack_ih / pack_hh choose the packed
    micro-kernel (decided by the caller from T and B, never from the thread count).
    Returns False if OpenMP gave fewer threads than asked (the caller then retries
    with one thread).
    """
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = h_n.shape[1]
    cdef int nslices = n_threads if by_units else 1
    cdef int nchunks = 1 if by_units else <int> (bounds.shape[0] - 1)
    cdef int team = nslices * nchunks
    cdef floating *p_gates = ptr3(gates)
    cdef floating *p_cs = ptr3(cs)
    cdef const floating *p_h0 = cptr2(h0)
    cdef const floating *p_c0 = cptr2(c0)
    cdef const floating *p_bias = &bias[0] if bias is not None else NULL
    cdef const floating *p_ih = &w_ih[0, 0]
    cdef const floating *p_hh = &w_hh[0, 0]
    cdef floating *s_ih = NULL
    cdef floating *s_hh = NULL
    cdef int *fail = <int *> calloc(team, sizeof(int))
    cdef int tid, nthr, k, failed = 0
    cdef Py_ssize_t j0, j1
    cdef bint short_team = False
    with nogil:
        if pack_ih or nslices > 1:
            s_ih = gate_slices(p_ih, 4, H, I, nslices, pack_ih, n_threads)
        if pack_hh or nslices > 1:
            s_hh = gate_slices(p_hh, 4, H, H, nslices, pack_hh, n_threads)
        if (fail == NULL or ((pack_ih or nslices > 1) and s_ih == NULL)
                or ((pack_hh or nslices > 1) and s_hh == NULL)):
            failed = 1
        else:
            with parallel(num_threads=team):
                tid = threadid()
                nthr = fastrnn_team_size()
                if nthr != team:
                    fail[tid] = 2    # fewer threads than slices/chunks: caller retries with one
                else:
                    k = tid if by_units else 0          # slice
                    j0 = unit_start(H, k, nslices)
                    j1 = unit_start(H, k + 1, nslices)
                    forward_thread(
                        &y[0, 0, 0], &h_n[0, 0], &c_n[0, 0], p_gates, p_cs, fail,
                        &x[0, 0, 0], p_h0, p_c0,
                        s_ih + slice_offset(p_ih, 4, H, I, nslices, k, pack_ih) if s_ih != NULL else p_ih,
                        s_hh + slice_offset(p_hh, 4, H, H, nslices, k, pack_hh) if s_hh != NULL else p_hh,
                        pack_ih, pack_hh, p_bias, &order[0],
                        0 if by_units else bounds[tid], B if by_units else bounds[tid + 1],
                        j0, j1, &lengths[0], T, B, I, H, reverse, by_units, tid, nthr)
            for k in range(team):
                if fail[k] == 1:
                    failed = 1
                elif fail[k] == 2:
                    short_team = True
    free(s_ih); free(s_hh); free(fail)
    if failed:
        raise MemoryError("fastrnn LSTM forward: out of memory")
    return not short_team


def backward(floating[:, :, ::1] dx, floating[:, ::1] dh0, floating[:, ::1] dc0,
             floating[:, ::1] dw_ih, floating[:, ::1] dw_hh,
             floating[:, :, ::1] dgates, const floating[:, :, ::1] dy,
             const floating[:, ::1] dh_n, const floating[:, ::1] dc_n,
             const floating[:, :, ::1] cs, const floating[:, ::1] c0,
             const floating[:, :, ::1] x, const floating[:, :, ::1] h_prev,
             const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
             const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
             const Py_ssize_t[::1] bounds, const Py_ssize_t[::1] valid, bint reverse,
             int n_threads):
    """LSTM backward through time. dgates holds forward's gates and is overwritten with dL/da.

    After the reverse loop, three GEMMs over the rows t*B + b that exist,
    `valid` (ascending; None: all T*B) (_gradients.pxd):
        dx = da W_ih,   dw_ih = da^T x,   dw_hh = da^T h_prev
    h_prev (T, B, H) is the state each step read (a view of forward's hs).
    """
    cdef Py_ssize_t T = dy.shape[0], B = dy.shape[1], H = dy.shape[2], I = x.shape[2]
    cdef Py_ssize_t G = 4 * H, nchunks = bounds.shape[0] - 1, k
    cdef const floating *p_dh_n = cptr2(dh_n)
    cdef const Py_ssize_t *p_valid = &valid[0] if valid is not None else NULL
    cdef Py_ssize_t V = valid.shape[0] if valid is not None else T * B
    cdef const floating *p_dc_n = cptr2(dc_n)
    cdef const floating *p_c0 = cptr2(c0)
    cdef floating *packed_hhT = NULL
    cdef int failed = 0
    with nogil:
        packed_hhT = pack_matrix(&w_hh[0, 0], G, H, True, n_threads)   # w_hh^T: (H x 4H)
        if packed_hhT == NULL:
            failed = 1
        else:
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += backward_chunk(
                    &dgates[0, 0, 0], &dh0[0, 0], &dc0[0, 0], &dy[0, 0, 0], p_dh_n, p_dc_n,
                    &cs[0, 0, 0], p_c0, packed_hhT, &order[bounds[k]], bounds[k + 1] - bounds[k],
                    &lengths[0], T, B, H, reverse) != 0
            free(packed_hhT)
            if not failed:
                failed = input_and_weight_gradients(
                    &dx[0, 0, 0], &dw_ih[0, 0], &dw_hh[0, 0], &dgates[0, 0, 0], &dgates[0, 0, 0],
                    &x[0, 0, 0], &h_prev[0, 0, 0], &w_ih[0, 0], p_valid, V, G, I, H,
                    n_threads) != 0
    if failed:
        raise MemoryError("fastrnn LSTM backward: out of memory")


def _set_isa(int level):
    """Run this module's kernels at ISA `level` (src/isa.h); False if the CPU lacks it.
    Called by fastrnn._isa for every kernel module at once."""
    return fastrnn_isa_set(level) == 0


def _isa_level():
    """The ISA level this module's kernels run at."""
    return fastrnn_isa_level()
