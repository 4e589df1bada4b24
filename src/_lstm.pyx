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
from cython.parallel cimport prange

from _blas cimport floating, gemm
from _simd cimport gemm_rows, packed_size, pack, n_panels, sigmoid_, tanh_, tanh_to
from _schedule cimport (time_index, n_active, pack_parallel, unit_range, fastrnn_barrier,
                       fastrnn_team_size)
from cython.parallel cimport parallel, threadid

DEF BLOCK_ROWS = 64  # rows per input-projection GEMM (time steps x chunk rows)


cdef inline floating *ptr3(floating[:, :, ::1] a) noexcept nogil:
    return &a[0, 0, 0] if a is not None else NULL


cdef inline const floating *cptr2(const floating[:, ::1] a) noexcept nogil:
    return &a[0, 0] if a is not None else NULL


cdef int forward_chunk(
        floating *y,                # OUT (T, B, H) h_t at valid steps
        floating *h_n,              # OUT (B, H) state after each row's last step
        floating *c_n,              # OUT (B, H)
        floating *gates,            # OUT (T, B, 4H) activated gates, or NULL (inference)
        floating *cs,               # OUT (T, B, H) c_t, or NULL (inference)
        const floating *x,          # IN  (T, B, I)
        const floating *h0,         # IN  (B, H) or NULL for zeros
        const floating *c0,         # IN  (B, H) or NULL for zeros
        const floating *w_ih,       # IN  (4H, I)
        const floating *packed_ih,  # IN  packed w_ih, or NULL to use w_ih unpacked
        const floating *w_hh,       # IN  (4H, H)
        const floating *packed_hh,  # IN  packed w_hh, or NULL
        const floating *bias,       # IN  (4H,) b_ih + b_hh, or NULL
        const Py_ssize_t *rows,     # IN  (nrows,) batch rows of this chunk, by decreasing length
        Py_ssize_t nrows,
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
        bint reverse) noexcept nogil:
    """Run rows `rows` through the whole sequence. Returns 0, or -1 if out of memory."""
    cdef Py_ssize_t G = 4 * H
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef Py_ssize_t tb = (BLOCK_ROWS + nrows - 1) // nrows   # steps per input-projection block
    if tb > maxlen:
        tb = maxlen
    cdef floating *h = <floating *> calloc(nrows * H, sizeof(floating))       # (nrows, H)
    cdef floating *c = <floating *> calloc(nrows * H, sizeof(floating))       # (nrows, H)
    cdef floating *a = <floating *> malloc(nrows * G * sizeof(floating))      # (nrows, 4H)
    cdef floating *tc = <floating *> malloc(H * sizeof(floating))             # (H,) tanh(c_t)
    cdef floating *gx_block = NULL   # (tb, nrows, 4H) x W_ih^T when not saving gates
    cdef const floating **src = <const floating **> malloc(tb * nrows * sizeof(void *))
    cdef floating **dst = <floating **> malloc(tb * nrows * sizeof(void *))
    cdef floating **a_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef const floating **h_rows = <const floating **> malloc(nrows * sizeof(void *))
    cdef floating **gx_rows = <floating **> malloc(tb * nrows * sizeof(void *))
    if gates == NULL:
        gx_block = <floating *> malloc(tb * nrows * G * sizeof(floating))
    cdef int status = 0
    cdef Py_ssize_t r, b, s, s0, s1, t, j, m, nact
    cdef floating *gx
    cdef floating *ar
    cdef floating *hr
    cdef floating *cr
    if (h == NULL or c == NULL or a == NULL or tc == NULL or src == NULL or dst == NULL
            or a_rows == NULL or h_rows == NULL or gx_rows == NULL or (gates == NULL and gx_block == NULL)):
        status = -1
    else:
        for r in range(nrows):
            b = rows[r]
            a_rows[r] = a + r * G
            h_rows[r] = h + r * H
            if h0 != NULL:
                memcpy(h + r * H, h0 + b * H, H * sizeof(floating))
            if c0 != NULL:
                memcpy(c + r * H, c0 + b * H, H * sizeof(floating))
        s0 = 0
        while s0 < maxlen:
            s1 = min(s0 + tb, maxlen)
            # Input projection for steps [s0, s1): one GEMM over all running rows.
            m = 0
            for s in range(s0, s1):
                nact = n_active(rows, nrows, lengths, s)
                for r in range(nact):
                    b = rows[r]
                    t = time_index(s, lengths[b], reverse)
                    src[m] = x + (t * B + b) * I
                    if gates != NULL:
                        dst[m] = gates + (t * B + b) * G
                    else:
                        dst[m] = gx_block + ((s - s0) * nrows + r) * G
                    gx_rows[(s - s0) * nrows + r] = dst[m]
                    m = m + 1
            gemm_rows(m, G, I, src, packed_ih, w_ih, I, dst, 0)
            # Recurrence: only h_{t-1} W_hh^T and the fused gate pass per step.
            for s in range(s0, s1):
                nact = n_active(rows, nrows, lengths, s)
                gemm_rows(nact, G, H, h_rows, packed_hh, w_hh, H, a_rows, 0)
                for r in range(nact):
                    b = rows[r]
                    t = time_index(s, lengths[b], reverse)
                    gx = gx_rows[(s - s0) * nrows + r]
                    ar = a + r * G
                    hr = h + r * H
                    cr = c + r * H
                    if bias != NULL:
                        for j in range(G):
                            ar[j] = ar[j] + gx[j] + bias[j]
                    else:
                        for j in range(G):
                            ar[j] = ar[j] + gx[j]
                    sigmoid_(ar, 2 * H)          # i, f
                    tanh_(ar + 2 * H, H)         # g
                    sigmoid_(ar + 3 * H, H)      # o
                    for j in range(H):
                        cr[j] = ar[H + j] * cr[j] + ar[j] * ar[2 * H + j]
                    tanh_to(tc, cr, H)
                    for j in range(H):
                        hr[j] = ar[3 * H + j] * tc[j]
                    memcpy(y + (t * B + b) * H, hr, H * sizeof(floating))
                    if gates != NULL:
                        memcpy(gx, ar, G * sizeof(floating))
                        memcpy(cs + (t * B + b) * H, cr, H * sizeof(floating))
            s0 = s1
        for r in range(nrows):
            b = rows[r]
            memcpy(h_n + b * H, h + r * H, H * sizeof(floating))
            memcpy(c_n + b * H, c + r * H, H * sizeof(floating))
    free(h); free(c); free(a); free(tc); free(gx_block)
    free(src); free(dst); free(a_rows); free(h_rows); free(gx_rows)
    return status


cdef void forward_units(
        floating *y,                # OUT (T, B, H) h_t at valid steps
        floating *h_n,              # OUT (B, H)
        floating *c_n,              # OUT (B, H)
        floating *gates,            # OUT (T, B, 4H) activated gates, or NULL (inference)
        floating *cs,               # OUT (T, B, H) c_t, or NULL (inference)
        floating *hbuf,             # SHARED (2, B, H) h_{t-1} and h_t, rows in `order`
        int *fail,                  # SHARED (nthr,) per-thread allocation failure flags
        const floating *x,          # IN  (T, B, I)
        const floating *h0,         # IN  (B, H) or NULL
        const floating *c0,         # IN  (B, H) or NULL
        const floating *w_ih,       # IN  (4H, I)
        const floating *w_hh,       # IN  (4H, H)
        const floating *bias,       # IN  (4H,) or NULL
        const Py_ssize_t *order,    # IN  (B,) rows by decreasing length
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
        bint reverse, bint pack_ih, bint pack_hh, int tid, int nthr) noexcept nogil:
    """Small-batch schedule, run by every thread of a parallel region.

    Thread tid owns hidden units [j0, j1) of every row and all four gates, so
    its slices of W_ih and W_hh stay in its own cache across steps. h_t is
    shared: one barrier per step, with h double-buffered so that writing h_t
    never races with another thread still reading h_{t-1}.
    """
    cdef Py_ssize_t j0, j1, hk, GK, maxlen = lengths[order[0]]
    unit_range(H, tid, nthr, &j0, &j1)
    hk = j1 - j0
    GK = 4 * hk
    cdef Py_ssize_t tb = (BLOCK_ROWS + B - 1) // B
    if tb > maxlen:
        tb = maxlen
    cdef Py_ssize_t gk = GK if GK > 0 else 1
    cdef floating *wl_ih = <floating *> malloc(gk * I * sizeof(floating))   # (4hk, I) own rows
    cdef floating *wl_hh = <floating *> malloc(gk * H * sizeof(floating))   # (4hk, H) own rows
    cdef floating *bl = <floating *> calloc(gk, sizeof(floating))           # (4hk,)
    cdef floating *pk_ih = NULL
    cdef floating *pk_hh = NULL
    cdef floating *c = <floating *> calloc(B * (hk + 1), sizeof(floating))  # (B, hk)
    cdef floating *a = <floating *> malloc(B * gk * sizeof(floating))       # (B, 4hk)
    cdef floating *tc = <floating *> malloc((hk + 1) * sizeof(floating))
    cdef floating *gxb = <floating *> malloc(tb * B * gk * sizeof(floating))  # (tb, B, 4hk)
    cdef const floating **src = <const floating **> malloc(tb * B * sizeof(void *))
    cdef floating **dst = <floating **> malloc(tb * B * sizeof(void *))
    cdef const floating **h_rows = <const floating **> malloc(2 * B * sizeof(void *))
    cdef floating **a_rows = <floating **> malloc(B * sizeof(void *))
    cdef Py_ssize_t r, b, s, s0, s1, t, j, g, m, nact
    cdef int cur = 0, k, failed = 0
    cdef floating *ar
    cdef floating *gx
    cdef floating *cr
    cdef floating *hr
    if pack_ih:
        pk_ih = <floating *> malloc(packed_size(pk_ih, gk, I) * sizeof(floating))
    if pack_hh:
        pk_hh = <floating *> malloc(packed_size(pk_hh, gk, H) * sizeof(floating))
    fail[tid] = (wl_ih == NULL or wl_hh == NULL or bl == NULL or c == NULL or a == NULL
                 or tc == NULL or gxb == NULL or src == NULL or dst == NULL or h_rows == NULL
                 or a_rows == NULL or (pack_ih and pk_ih == NULL) or (pack_hh and pk_hh == NULL))
    if not fail[tid]:
        for g in range(4):   # gather this thread's rows of every gate
            memcpy(wl_ih + g * hk * I, w_ih + (g * H + j0) * I, hk * I * sizeof(floating))
            memcpy(wl_hh + g * hk * H, w_hh + (g * H + j0) * H, hk * H * sizeof(floating))
            if bias != NULL:
                memcpy(bl + g * hk, bias + g * H + j0, hk * sizeof(floating))
        if pack_ih and GK > 0:
            pack(pk_ih, wl_ih, GK, I, I, 1, 0, n_panels(pk_ih, GK))
        if pack_hh and GK > 0:
            pack(pk_hh, wl_hh, GK, H, H, 1, 0, n_panels(pk_hh, GK))
        for r in range(B):
            b = order[r]
            h_rows[r] = hbuf + r * H
            h_rows[B + r] = hbuf + (B + r) * H
            a_rows[r] = a + r * GK
            for j in range(hk):
                hbuf[r * H + j0 + j] = h0[b * H + j0 + j] if h0 != NULL else 0
                c[r * hk + j] = c0[b * H + j0 + j] if c0 != NULL else 0
    fastrnn_barrier()
    for k in range(nthr):
        failed = failed + fail[k]
    if failed:
        maxlen = 0   # every thread skips the loop together: no barrier is left waiting
    s0 = 0
    while s0 < maxlen:
        s1 = min(s0 + tb, maxlen)
        m = 0
        for s in range(s0, s1):
            nact = n_active(order, B, lengths, s)
            for r in range(nact):
                b = order[r]
                t = time_index(s, lengths[b], reverse)
                src[m] = x + (t * B + b) * I
                dst[m] = gxb + ((s - s0) * B + r) * GK
                m = m + 1
        if GK > 0:
            gemm_rows(m, GK, I, src, pk_ih, wl_ih, I, dst, 0)
        for s in range(s0, s1):
            nact = n_active(order, B, lengths, s)
            if GK > 0:
                gemm_rows(nact, GK, H, &h_rows[cur * B], pk_hh, wl_hh, H, a_rows, 0)
            for r in range(nact):
                if GK == 0:
                    break
                b = order[r]
                t = time_index(s, lengths[b], reverse)
                ar = a + r * GK
                gx = gxb + ((s - s0) * B + r) * GK
                for j in range(GK):
                    ar[j] = ar[j] + gx[j] + bl[j]
                sigmoid_(ar, 2 * hk)          # i, f
                tanh_(ar + 2 * hk, hk)        # g
                sigmoid_(ar + 3 * hk, hk)     # o
                cr = c + r * hk
                for j in range(hk):
                    cr[j] = ar[hk + j] * cr[j] + ar[j] * ar[2 * hk + j]
                tanh_to(tc, cr, hk)
                hr = hbuf + ((1 - cur) * B + r) * H + j0
                for j in range(hk):
                    hr[j] = ar[3 * hk + j] * tc[j]
                memcpy(y + (t * B + b) * H + j0, hr, hk * sizeof(floating))
                if gates != NULL:
                    for g in range(4):
                        memcpy(gates + (t * B + b) * 4 * H + g * H + j0, ar + g * hk,
                               hk * sizeof(floating))
                    memcpy(cs + (t * B + b) * H + j0, cr, hk * sizeof(floating))
            fastrnn_barrier()   # h_t complete before anyone reads it
            cur = 1 - cur
        s0 = s1
    if not failed:
        for r in range(B):
            b = order[r]
            # step s wrote buffer (s + 1) % 2; a row's last step is lengths[b] - 1
            memcpy(h_n + b * H + j0, hbuf + ((lengths[b] % 2) * B + r) * H + j0,
                   hk * sizeof(floating))
            memcpy(c_n + b * H + j0, c + r * hk, hk * sizeof(floating))
    free(wl_ih); free(wl_hh); free(bl); free(pk_ih); free(pk_hh); free(c); free(a); free(tc)
    free(gxb); free(src); free(dst); free(h_rows); free(a_rows)



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
    cdef floating *tc = <floating *> malloc(H * sizeof(floating))          # (H,) tanh(c_t)
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
    cdef floating gi, gf, gg, go, dht, dct
    if dh == NULL or dc == NULL or tc == NULL or zeros == NULL or da_rows == NULL or dh_rows == NULL:
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
                tanh_to(tc, cs + (t * B + b) * H, H)
                for j in range(H):
                    gi = g[j]
                    gf = g[H + j]
                    gg = g[2 * H + j]
                    go = g[3 * H + j]
                    dht = dhr[j] + dyr[j]
                    dct = dcr[j] + dht * go * (1 - tc[j] * tc[j])
                    g[j] = dct * gg * gi * (1 - gi)
                    g[H + j] = dct * cprev[j] * gf * (1 - gf)
                    g[2 * H + j] = dct * gi * (1 - gg * gg)
                    g[3 * H + j] = dht * tc[j] * go * (1 - go)
                    dcr[j] = dct * gf
                da_rows[r] = g
            # dh_{t-1} = da_t W_hh  (rows past nact keep the dh_n they started with)
            gemm_rows(nact, H, G, da_rows, packed_hhT, NULL, 0, dh_rows, 0)
        for r in range(nrows):
            b = rows[r]
            memcpy(dh0 + b * H, dh + r * H, H * sizeof(floating))
            memcpy(dc0 + b * H, dc + r * H, H * sizeof(floating))
    free(dh); free(dc); free(tc); free(zeros); free(da_rows); free(dh_rows)
    return status


def forward(floating[:, :, ::1] y, floating[:, ::1] h_n, floating[:, ::1] c_n,
            floating[:, :, ::1] gates, floating[:, :, ::1] cs,
            const floating[:, :, ::1] x, const floating[:, ::1] h0, const floating[:, ::1] c0,
            const floating[:, ::1] w_ih, const floating[:, ::1] w_hh, const floating[::1] bias,
            const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
            const Py_ssize_t[::1] bounds, bint reverse, bint pack_ih, bint pack_hh,
            int n_threads, bint by_units=False):
    """LSTM forward over all steps. Arrays as in forward_chunk; gates/cs None for inference.

    order (B,) sorts rows by decreasing length; chunk k is order[bounds[k]:bounds[k+1]].
    pack_ih / pack_hh choose the packed micro-kernel for the input / recurrent GEMM
    (decided by the caller from T and B, never from the thread count).
    by_units: split hidden units, not rows, across threads (forward_units; for
    small batches); both splits give bitwise identical results.
    """
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = h_n.shape[1]
    cdef Py_ssize_t nchunks = bounds.shape[0] - 1, k
    cdef floating *p_gates = ptr3(gates)
    cdef floating *p_cs = ptr3(cs)
    cdef floating *hbuf
    cdef int *fail
    cdef int tid
    if by_units:
        hbuf = <floating *> malloc(2 * B * H * sizeof(floating))
        fail = <int *> calloc(max(n_threads, 1), sizeof(int))
        if hbuf == NULL or fail == NULL:
            free(hbuf); free(fail)
            raise MemoryError("fastrnn LSTM forward: out of memory")
        with nogil, parallel(num_threads=n_threads):
            tid = threadid()
            forward_units(&y[0, 0, 0], &h_n[0, 0], &c_n[0, 0], ptr3(gates), ptr3(cs), hbuf, fail,
                          &x[0, 0, 0], cptr2(h0), cptr2(c0), &w_ih[0, 0], &w_hh[0, 0],
                          &bias[0] if bias is not None else NULL, &order[0], &lengths[0],
                          T, B, I, H, reverse, pack_ih, pack_hh, tid, fastrnn_team_size())
        k = 0
        for nchunks in range(n_threads):
            k += fail[nchunks]
        free(hbuf); free(fail)
        if k:
            raise MemoryError("fastrnn LSTM forward: out of memory")
        return
    cdef const floating *p_h0 = cptr2(h0)
    cdef const floating *p_c0 = cptr2(c0)
    cdef const floating *p_bias = &bias[0] if bias is not None else NULL
    cdef floating *packed_ih = NULL
    cdef floating *packed_hh = NULL
    cdef int failed = 0
    with nogil:
        if pack_ih:
            packed_ih = <floating *> malloc(packed_size(packed_ih, 4 * H, I) * sizeof(floating))
            if packed_ih != NULL:
                pack_parallel(packed_ih, &w_ih[0, 0], 4 * H, I, I, 1, n_threads)
        if pack_hh:
            packed_hh = <floating *> malloc(packed_size(packed_hh, 4 * H, H) * sizeof(floating))
            if packed_hh != NULL:
                pack_parallel(packed_hh, &w_hh[0, 0], 4 * H, H, H, 1, n_threads)
        if (pack_ih and packed_ih == NULL) or (pack_hh and packed_hh == NULL):
            failed = 1
        else:
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += forward_chunk(
                    &y[0, 0, 0], &h_n[0, 0], &c_n[0, 0], p_gates, p_cs,
                    &x[0, 0, 0], p_h0, p_c0, &w_ih[0, 0], packed_ih, &w_hh[0, 0], packed_hh,
                    p_bias, &order[bounds[k]], bounds[k + 1] - bounds[k], &lengths[0],
                    T, B, I, H, reverse) != 0
        free(packed_ih)
        free(packed_hh)
    if failed:
        raise MemoryError("fastrnn LSTM forward: out of memory")


def backward(floating[:, :, ::1] dx, floating[:, ::1] dh0, floating[:, ::1] dc0,
             floating[:, ::1] dw_ih, floating[:, ::1] dw_hh,
             floating[:, :, ::1] dgates, const floating[:, :, ::1] dy,
             const floating[:, ::1] dh_n, const floating[:, ::1] dc_n,
             const floating[:, :, ::1] cs, const floating[:, ::1] c0,
             const floating[:, :, ::1] x, const floating[:, :, ::1] h_prev,
             const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
             const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
             const Py_ssize_t[::1] bounds, bint reverse, int n_threads):
    """LSTM backward through time. dgates holds forward's gates and is overwritten with dL/da.

    After the reverse loop, three GEMMs over all T*B rows (BLAS):
        dx = da W_ih,   dw_ih = da^T x,   dw_hh = da^T h_prev
    h_prev (T, B, H) is the state each step read (a view of forward's hs).
    """
    cdef Py_ssize_t T = dy.shape[0], B = dy.shape[1], H = dy.shape[2], I = x.shape[2]
    cdef Py_ssize_t G = 4 * H, nchunks = bounds.shape[0] - 1, k
    cdef int TB = <int> (T * B)
    cdef const floating *p_dh_n = cptr2(dh_n)
    cdef const floating *p_dc_n = cptr2(dc_n)
    cdef const floating *p_c0 = cptr2(c0)
    cdef floating *packed_hhT = NULL
    cdef int failed = 0
    with nogil:
        packed_hhT = <floating *> malloc(packed_size(packed_hhT, H, G) * sizeof(floating))
        if packed_hhT == NULL:
            failed = 1
        else:
            pack_parallel(packed_hhT, &w_hh[0, 0], H, G, 1, H, n_threads)   # w_hh^T: (H x 4H)
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += backward_chunk(
                    &dgates[0, 0, 0], &dh0[0, 0], &dc0[0, 0], &dy[0, 0, 0], p_dh_n, p_dc_n,
                    &cs[0, 0, 0], p_c0, packed_hhT, &order[bounds[k]], bounds[k + 1] - bounds[k],
                    &lengths[0], T, B, H, reverse) != 0
            free(packed_hhT)
            if not failed:
                gemm(False, False, TB, <int> I, <int> G, 1, &dgates[0, 0, 0], <int> G,
                     &w_ih[0, 0], <int> I, 0, &dx[0, 0, 0], <int> I)
                gemm(True, False, <int> G, <int> I, TB, 1, &dgates[0, 0, 0], <int> G,
                     &x[0, 0, 0], <int> I, 0, &dw_ih[0, 0], <int> I)
                gemm(True, False, <int> G, <int> H, TB, 1, &dgates[0, 0, 0], <int> G,
                     &h_prev[0, 0, 0], <int> H, 0, &dw_hh[0, 0], <int> H)
    if failed:
        raise MemoryError("fastrnn LSTM backward: out of memory")
