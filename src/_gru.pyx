# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""GRU kernels for one layer, one direction: `forward` and `backward`.

Shapes: T steps, B batch, I input, H hidden; gate order r, z, n (torch.nn),
"linear before reset" form:

    gx = x_t W_ih^T + b_ih,   gh = h_{t-1} W_hh^T + b_hh                (B, 3H)
    r = sigmoid(gx_r + gh_r),  z = sigmoid(gx_z + gh_z)
    n = tanh(gx_n + r * gh_n),  h_t = (1 - z) * n + z * h_{t-1}

Saved for backward (training only):
    gates (T, B, 3H)  r, z, n; backward overwrites them with dL/dgx
    hns   (T, B, H)   gh_n = h_{t-1} W_hn^T + b_hn
    hs    (T+1, B, H) h_t, with h0 in the extra slot (slot 0 forward, slot T reverse)

Callers (fastrnn.functional) validate every shape and dtype first; these
functions trust their arguments and run without the GIL.
"""
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from cython.parallel cimport prange, parallel, threadid

from _gradients cimport input_and_weight_gradients
from _simd cimport fastrnn_isa_set, fastrnn_isa_level, floating, gemm_rows, sigmoid_, tanh_
from _schedule cimport (BLOCK_ROWS, ptr3, cptr1, cptr2, time_index, n_active,
                       pack_matrix, unit_start, gate_slices, slice_offset,
                       fastrnn_barrier, fastrnn_team_size)

cdef void forward_thread(
        floating *y,                # OUT (T, B, H) h_t at valid steps
        floating *h_n,              # OUT (B, H) state after each row's last step
        floating *gates,            # OUT (T, B, 3H) r, z, n, or NULL (inference)
        floating *hns,              # OUT (T, B, H) gh_n, or NULL (inference)
        floating *hbuf,             # SHARED (2, B, H) h_{t-1} / h_t; row r is batch row order[r]
        int *fail,                  # SHARED (nthr,) allocation failure per thread
        const floating *x,          # IN  (T, B, I)
        const floating *h0,         # IN  (B, H) or NULL for zeros
        const floating *w_ih_s,     # IN  this thread's 3*hk rows of w_ih (gate_slices), or w_ih
        const floating *w_hh_s,     # IN  this thread's 3*hk rows of w_hh, likewise
        bint pack_ih, bint pack_hh, # are w_ih_s / w_hh_s packed panels (else row-major)
        const floating *bias_x,     # IN  (3H,) [b_ir + b_hr, b_iz + b_hz, b_in], or NULL
        const floating *bias_hn,    # IN  (H,) b_hn, or NULL
        const Py_ssize_t *order,    # IN  (B,) batch rows by decreasing length
        Py_ssize_t r0, Py_ssize_t r1,  # this thread's rows: order[r0:r1]
        Py_ssize_t j0, Py_ssize_t j1,  # this thread's hidden units [j0, j1)
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H, bint reverse,
        bint sync,                  # threads share rows: barrier after every step
        int tid, int nthr) noexcept nogil:
    """One thread's share of the forward pass: rows order[r0:r1], hidden units [j0, j1).

    Large batches split rows (no barrier); small batches split hidden units (one
    barrier per step); the numbers are bitwise the same either way.
    """
    cdef Py_ssize_t nrows = r1 - r0, hk = j1 - j0, GK = 3 * (j1 - j0)
    cdef Py_ssize_t maxlen = lengths[order[r0]] if nrows > 0 else 0
    cdef Py_ssize_t tb = (BLOCK_ROWS + nrows - 1) // nrows if nrows > 0 else 1
    if tb > maxlen:
        tb = maxlen
    if tb < 1:
        tb = 1
    cdef Py_ssize_t gk = GK if GK > 0 else 1
    cdef Py_ssize_t nr = nrows if nrows > 0 else 1
    cdef floating *blx = <floating *> calloc(gk, sizeof(floating))             # (3hk,) bias_x slice
    cdef floating *blhn = <floating *> calloc(gk, sizeof(floating))            # (hk,) b_hn slice
    cdef floating *a = <floating *> malloc(nr * gk * sizeof(floating))         # (nrows, 3hk) gh
    cdef floating *nb = <floating *> malloc(gk * sizeof(floating))             # (hk,) n
    cdef floating *gxb = <floating *> malloc(tb * nr * gk * sizeof(floating))  # (tb, nrows, 3hk)
    cdef const floating **src = <const floating **> malloc(tb * nr * sizeof(void *))
    cdef floating **dst = <floating **> malloc(tb * nr * sizeof(void *))
    cdef const floating **h_rows = <const floating **> malloc(2 * nr * sizeof(void *))
    cdef floating **a_rows = <floating **> malloc(nr * sizeof(void *))
    cdef Py_ssize_t r, b, s, s0, s1, t, j, g, m, nact
    cdef int cur = 0, q, failed = 0
    cdef floating *ar
    cdef floating *gx
    cdef floating *hr
    cdef const floating *hp
    cdef floating z
    cdef floating one = 1   # a typed 1: Cython writes a bare 1 as the double 1.0
    fail[tid] = (blx == NULL or blhn == NULL or a == NULL or nb == NULL or gxb == NULL
                 or src == NULL or dst == NULL or h_rows == NULL or a_rows == NULL)
    if not fail[tid]:
        if bias_x != NULL:
            for g in range(3):
                memcpy(blx + g * hk, bias_x + g * H + j0, hk * sizeof(floating))
            memcpy(blhn, bias_hn + j0, hk * sizeof(floating))
        for r in range(nrows):
            b = order[r0 + r]
            h_rows[r] = hbuf + (r0 + r) * H
            h_rows[nrows + r] = hbuf + (B + r0 + r) * H
            a_rows[r] = a + r * GK
            for j in range(hk):
                hbuf[(r0 + r) * H + j0 + j] = h0[b * H + j0 + j] if h0 != NULL else 0
    if sync:
        fastrnn_barrier()
        for q in range(nthr):
            failed = failed + fail[q]
    else:
        failed = fail[tid]
    if failed:
        maxlen = 0   # all threads skip the loop together: no barrier is left waiting
    s0 = 0
    while s0 < maxlen:
        s1 = min(s0 + tb, maxlen)
        # Input projection for steps [s0, s1): one GEMM over all running rows.
        m = 0
        for s in range(s0, s1):
            nact = n_active(order + r0, nrows, lengths, s)
            for r in range(nact):
                b = order[r0 + r]
                src[m] = x + (time_index(s, lengths[b], reverse) * B + b) * I
                dst[m] = gxb + ((s - s0) * nrows + r) * GK
                m = m + 1
        if GK > 0:
            gemm_rows(m, GK, I, src, w_ih_s if pack_ih else NULL, w_ih_s, I, dst, 0)
        # Recurrence: only h_{t-1} W_hh^T and the fused gate pass per step.
        for s in range(s0, s1):
            nact = n_active(order + r0, nrows, lengths, s)
            if GK > 0:
                gemm_rows(nact, GK, H, &h_rows[cur * nrows], w_hh_s if pack_hh else NULL,
                          w_hh_s, H, a_rows, 0)
            for r in range(nact if GK > 0 else 0):
                b = order[r0 + r]
                t = time_index(s, lengths[b], reverse)
                ar = a + r * GK
                gx = gxb + ((s - s0) * nrows + r) * GK
                for j in range(2 * hk):
                    ar[j] = ar[j] + gx[j] + blx[j]
                for j in range(hk):
                    ar[2 * hk + j] = ar[2 * hk + j] + blhn[j]
                sigmoid_(ar, 2 * hk)          # r, z
                for j in range(hk):
                    nb[j] = gx[2 * hk + j] + blx[2 * hk + j] + ar[j] * ar[2 * hk + j]
                tanh_(nb, hk)                 # n
                hp = hbuf + (cur * B + r0 + r) * H + j0
                hr = hbuf + ((1 - cur) * B + r0 + r) * H + j0
                for j in range(hk):
                    z = ar[hk + j]
                    hr[j] = (one - z) * nb[j] + z * hp[j]
                memcpy(y + (t * B + b) * H + j0, hr, hk * sizeof(floating))
                if gates != NULL:
                    memcpy(gates + (t * B + b) * 3 * H + j0, ar, hk * sizeof(floating))
                    memcpy(gates + (t * B + b) * 3 * H + H + j0, ar + hk, hk * sizeof(floating))
                    memcpy(gates + (t * B + b) * 3 * H + 2 * H + j0, nb, hk * sizeof(floating))
                    memcpy(hns + (t * B + b) * H + j0, ar + 2 * hk, hk * sizeof(floating))
            if sync:
                fastrnn_barrier()   # h_t complete before anyone reads it
            cur = 1 - cur
        s0 = s1
    if not failed:
        for r in range(nrows):
            b = order[r0 + r]
            # step s wrote buffer (s + 1) % 2 and a row's last step is lengths[b] - 1
            memcpy(h_n + b * H + j0, hbuf + ((lengths[b] % 2) * B + r0 + r) * H + j0,
                   hk * sizeof(floating))
    free(blx); free(blhn); free(a); free(nb); free(gxb)
    free(src); free(dst); free(h_rows); free(a_rows)


cdef int backward_chunk(
        floating *dgx,              # IN/OUT (T, B, 3H): r, z, n in; dL/dgx out (0 at padded steps)
        floating *dgh,              # OUT    (T, B, 3H): dL/dgh (0 at padded steps)
        floating *dh0,              # OUT (B, H)
        const floating *dy,         # IN  (T, B, H)
        const floating *dh_n,       # IN  (B, H) or NULL for zeros
        const floating *hns,        # IN  (T, B, H) gh_n saved by forward
        const floating *y,          # IN  (T, B, H) h_t saved by forward
        const floating *h0,         # IN  (B, H) or NULL for zeros
        const floating *packed_hhT, # IN  packed w_hh^T (H x 3H)
        const Py_ssize_t *rows, Py_ssize_t nrows,
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, bint reverse) noexcept nogil:
    """Reverse loop for one chunk: gate gradients and dh carried back. 0, or -1 if out of memory.

        dh = dy_t + carried;   dn = dh (1 - z);   dz = dh (h_{t-1} - n)
        dgx_n = dn (1 - n^2);  dgx_r = dgx_n gh_n r (1 - r);  dgx_z = dz z (1 - z)
        dgh = [dgx_r, dgx_z, dgx_n r];   dh_{t-1} = dh z + dgh W_hh
    """
    cdef Py_ssize_t G = 3 * H
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef floating *dh = <floating *> calloc(nrows * H, sizeof(floating))   # (nrows, H) carried dL/dh
    cdef floating *zeros = <floating *> calloc(H, sizeof(floating))
    cdef const floating **dgh_rows = <const floating **> malloc(nrows * sizeof(void *))
    cdef floating **dh_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef int status = 0
    cdef Py_ssize_t r, b, s, t, j, nact
    cdef floating *g
    cdef floating *gh
    cdef const floating *dyr
    cdef const floating *hnr
    cdef const floating *hprev
    cdef floating *dhr
    cdef floating gr, gz, gn, dht, dn, dz, dan
    cdef floating one = 1   # a typed 1: Cython writes a bare 1 as the double 1.0
    if dh == NULL or zeros == NULL or dgh_rows == NULL or dh_rows == NULL:
        status = -1
    else:
        for r in range(nrows):
            b = rows[r]
            dh_rows[r] = dh + r * H
            if dh_n != NULL:
                memcpy(dh + r * H, dh_n + b * H, H * sizeof(floating))
            for t in range(lengths[b], T):   # padding contributes nothing to dW, dX
                memset(dgx + (t * B + b) * G, 0, G * sizeof(floating))
                memset(dgh + (t * B + b) * G, 0, G * sizeof(floating))
        for s in range(maxlen - 1, -1, -1):
            nact = n_active(rows, nrows, lengths, s)
            for r in range(nact):
                b = rows[r]
                t = time_index(s, lengths[b], reverse)
                g = dgx + (t * B + b) * G
                gh = dgh + (t * B + b) * G
                dyr = dy + (t * B + b) * H
                hnr = hns + (t * B + b) * H
                if s > 0:
                    hprev = y + ((t + 1 if reverse else t - 1) * B + b) * H
                elif h0 != NULL:
                    hprev = h0 + b * H
                else:
                    hprev = zeros
                dhr = dh + r * H
                for j in range(H):
                    gr = g[j]
                    gz = g[H + j]
                    gn = g[2 * H + j]
                    dht = dhr[j] + dyr[j]
                    dn = dht * (one - gz)
                    dz = dht * (hprev[j] - gn)
                    dan = dn * (one - gn * gn)
                    g[j] = dan * hnr[j] * gr * (one - gr)
                    g[H + j] = dz * gz * (one - gz)
                    g[2 * H + j] = dan
                    gh[j] = g[j]
                    gh[H + j] = g[H + j]
                    gh[2 * H + j] = dan * gr
                    dhr[j] = dht * gz
                dgh_rows[r] = gh
            # dh_{t-1} = dh z + dgh_t W_hh  (rows past nact keep the dh_n they started with)
            gemm_rows(nact, H, G, dgh_rows, packed_hhT, NULL, 0, dh_rows, 1)
        for r in range(nrows):
            b = rows[r]
            memcpy(dh0 + b * H, dh + r * H, H * sizeof(floating))
    free(dh); free(zeros); free(dgh_rows); free(dh_rows)
    return status


def forward(floating[:, :, ::1] y, floating[:, ::1] h_n,
            floating[:, :, ::1] gates, floating[:, :, ::1] hns,
            const floating[:, :, ::1] x, const floating[:, ::1] h0,
            const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
            const floating[::1] bias_x, const floating[::1] bias_hn,
            const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
            const Py_ssize_t[::1] bounds, bint reverse, bint pack_ih, bint pack_hh,
            int n_threads, bint by_units):
    """GRU forward over all steps; arrays as in forward_thread, gates/hns None for inference.

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
    cdef floating *p_hns = ptr3(hns)
    cdef const floating *p_h0 = cptr2(h0)
    cdef const floating *p_bx = cptr1(bias_x)
    cdef const floating *p_bhn = cptr1(bias_hn)
    cdef const floating *p_ih = &w_ih[0, 0]
    cdef const floating *p_hh = &w_hh[0, 0]
    cdef floating *s_ih = NULL
    cdef floating *s_hh = NULL
    cdef floating *hbuf = <floating *> malloc(2 * B * H * sizeof(floating))
    cdef int *fail = <int *> calloc(team, sizeof(int))
    cdef int tid, nthr, k, failed = 0
    cdef Py_ssize_t j0, j1
    cdef bint short_team = False
    with nogil:
        if pack_ih or nslices > 1:
            s_ih = gate_slices(p_ih, 3, H, I, nslices, pack_ih, n_threads)
        if pack_hh or nslices > 1:
            s_hh = gate_slices(p_hh, 3, H, H, nslices, pack_hh, n_threads)
        if (hbuf == NULL or fail == NULL or ((pack_ih or nslices > 1) and s_ih == NULL)
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
                        &y[0, 0, 0], &h_n[0, 0], p_gates, p_hns, hbuf, fail,
                        &x[0, 0, 0], p_h0,
                        s_ih + slice_offset(p_ih, 3, H, I, nslices, k, pack_ih) if s_ih != NULL else p_ih,
                        s_hh + slice_offset(p_hh, 3, H, H, nslices, k, pack_hh) if s_hh != NULL else p_hh,
                        pack_ih, pack_hh, p_bx, p_bhn, &order[0],
                        0 if by_units else bounds[tid], B if by_units else bounds[tid + 1],
                        j0, j1, &lengths[0], T, B, I, H, reverse, by_units, tid, nthr)
            for k in range(team):
                if fail[k] == 1:
                    failed = 1
                elif fail[k] == 2:
                    short_team = True
    free(s_ih); free(s_hh); free(hbuf); free(fail)
    if failed:
        raise MemoryError("fastrnn GRU forward: out of memory")
    return not short_team


def backward(floating[:, :, ::1] dx, floating[:, ::1] dh0,
             floating[:, ::1] dw_ih, floating[:, ::1] dw_hh,
             floating[:, :, ::1] dgx, floating[:, :, ::1] dgh,
             const floating[:, :, ::1] dy, const floating[:, ::1] dh_n,
             const floating[:, :, ::1] hns, const floating[:, :, ::1] y,
             const floating[:, ::1] h0, const floating[:, :, ::1] x,
             const floating[:, :, ::1] h_prev,
             const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
             const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
             const Py_ssize_t[::1] bounds, const Py_ssize_t[::1] valid, bint reverse,
             int n_threads):
    """GRU backward through time. dgx holds forward's gates and is overwritten with dL/dgx.

    After the reverse loop, three GEMMs over the rows t*B + b that exist,
    `valid` (ascending; None: all T*B) (_gradients.pxd):
        dx = dgx W_ih,   dw_ih = dgx^T x,   dw_hh = dgh^T h_prev
    h_prev (T, B, H) is the state each step read (a view of forward's hs).
    """
    cdef Py_ssize_t T = dy.shape[0], B = dy.shape[1], H = dy.shape[2], I = x.shape[2]
    cdef Py_ssize_t G = 3 * H, nchunks = bounds.shape[0] - 1, k
    cdef const floating *p_dh_n = cptr2(dh_n)
    cdef const Py_ssize_t *p_valid = &valid[0] if valid is not None else NULL
    cdef Py_ssize_t V = valid.shape[0] if valid is not None else T * B
    cdef const floating *p_h0 = cptr2(h0)
    cdef floating *packed_hhT = NULL
    cdef int failed = 0
    with nogil:
        packed_hhT = pack_matrix(&w_hh[0, 0], G, H, True, n_threads)   # w_hh^T: (H x 3H)
        if packed_hhT == NULL:
            failed = 1
        else:
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += backward_chunk(
                    &dgx[0, 0, 0], &dgh[0, 0, 0], &dh0[0, 0], &dy[0, 0, 0], p_dh_n,
                    &hns[0, 0, 0], &y[0, 0, 0], p_h0, packed_hhT, &order[bounds[k]],
                    bounds[k + 1] - bounds[k], &lengths[0], T, B, H, reverse) != 0
            free(packed_hhT)
            if not failed:
                failed = input_and_weight_gradients(
                    &dx[0, 0, 0], &dw_ih[0, 0], &dw_hh[0, 0], &dgx[0, 0, 0], &dgh[0, 0, 0],
                    &x[0, 0, 0], &h_prev[0, 0, 0], &w_ih[0, 0], p_valid, V, G, I, H,
                    n_threads) != 0
    if failed:
        raise MemoryError("fastrnn GRU backward: out of memory")


def _set_isa(int level):
    """Run this module's kernels at ISA `level` (src/isa.h); False if the CPU lacks it.
    Called by fastrnn._isa for every kernel module at once."""
    return fastrnn_isa_set(level) == 0


def _isa_level():
    """The ISA level this module's kernels run at."""
    return fastrnn_isa_level()
