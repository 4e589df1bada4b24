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
from cython.parallel cimport prange

from _blas cimport floating, gemm
from _simd cimport gemm_rows, packed_size, sigmoid_, tanh_
from _schedule cimport time_index, n_active, pack_parallel

DEF BLOCK_ROWS = 64  # rows per input-projection GEMM (time steps x chunk rows)


cdef inline floating *ptr3(floating[:, :, ::1] a) noexcept nogil:
    return &a[0, 0, 0] if a is not None else NULL


cdef inline const floating *cptr1(const floating[::1] a) noexcept nogil:
    return &a[0] if a is not None else NULL


cdef inline const floating *cptr2(const floating[:, ::1] a) noexcept nogil:
    return &a[0, 0] if a is not None else NULL


cdef int forward_chunk(
        floating *y,                # OUT (T, B, H) h_t at valid steps
        floating *h_n,              # OUT (B, H) state after each row's last step
        floating *gates,            # OUT (T, B, 3H) r, z, n, or NULL (inference)
        floating *hns,              # OUT (T, B, H) gh_n, or NULL (inference)
        const floating *x,          # IN  (T, B, I)
        const floating *h0,         # IN  (B, H) or NULL for zeros
        const floating *w_ih,       # IN  (3H, I)
        const floating *packed_ih,  # IN  packed w_ih, or NULL to use w_ih unpacked
        const floating *w_hh,       # IN  (3H, H)
        const floating *packed_hh,  # IN  packed w_hh, or NULL
        const floating *bias_x,     # IN  (3H,) [b_ir + b_hr, b_iz + b_hz, b_in], or NULL
        const floating *bias_hn,    # IN  (H,) b_hn, or NULL
        const Py_ssize_t *rows,     # IN  (nrows,) batch rows of this chunk, by decreasing length
        Py_ssize_t nrows,
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
        bint reverse) noexcept nogil:
    """Run rows `rows` through the whole sequence. Returns 0, or -1 if out of memory."""
    cdef Py_ssize_t G = 3 * H
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef Py_ssize_t tb = (BLOCK_ROWS + nrows - 1) // nrows   # steps per input-projection block
    if tb > maxlen:
        tb = maxlen
    cdef floating *h = <floating *> calloc(nrows * H, sizeof(floating))       # (nrows, H)
    cdef floating *a = <floating *> malloc(nrows * G * sizeof(floating))      # (nrows, 3H) gh
    cdef floating *nb = <floating *> malloc(H * sizeof(floating))             # (H,) n
    cdef floating *gx_block = NULL   # (tb, nrows, 3H) x W_ih^T when not saving gates
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
    cdef floating z
    if (h == NULL or a == NULL or nb == NULL or src == NULL or dst == NULL or a_rows == NULL
            or h_rows == NULL or gx_rows == NULL or (gates == NULL and gx_block == NULL)):
        status = -1
    else:
        for r in range(nrows):
            b = rows[r]
            a_rows[r] = a + r * G
            h_rows[r] = h + r * H
            if h0 != NULL:
                memcpy(h + r * H, h0 + b * H, H * sizeof(floating))
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
                    if bias_x != NULL:
                        for j in range(2 * H):
                            ar[j] = ar[j] + gx[j] + bias_x[j]
                        for j in range(H):
                            ar[2 * H + j] = ar[2 * H + j] + bias_hn[j]
                    else:
                        for j in range(2 * H):
                            ar[j] = ar[j] + gx[j]
                    sigmoid_(ar, 2 * H)          # r, z
                    if bias_x != NULL:
                        for j in range(H):
                            nb[j] = gx[2 * H + j] + bias_x[2 * H + j] + ar[j] * ar[2 * H + j]
                    else:
                        for j in range(H):
                            nb[j] = gx[2 * H + j] + ar[j] * ar[2 * H + j]
                    tanh_(nb, H)                 # n
                    for j in range(H):
                        z = ar[H + j]
                        hr[j] = (1 - z) * nb[j] + z * hr[j]
                    memcpy(y + (t * B + b) * H, hr, H * sizeof(floating))
                    if gates != NULL:
                        memcpy(hns + (t * B + b) * H, ar + 2 * H, H * sizeof(floating))
                        memcpy(gx, ar, 2 * H * sizeof(floating))
                        memcpy(gx + 2 * H, nb, H * sizeof(floating))
            s0 = s1
        for r in range(nrows):
            b = rows[r]
            memcpy(h_n + b * H, h + r * H, H * sizeof(floating))
    free(h); free(a); free(nb); free(gx_block)
    free(src); free(dst); free(a_rows); free(h_rows); free(gx_rows)
    return status


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
                    dn = dht * (1 - gz)
                    dz = dht * (hprev[j] - gn)
                    dan = dn * (1 - gn * gn)
                    g[j] = dan * hnr[j] * gr * (1 - gr)
                    g[H + j] = dz * gz * (1 - gz)
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
            int n_threads):
    """GRU forward over all steps. Arrays as in forward_chunk; gates/hns None for inference.

    order (B,) sorts rows by decreasing length; chunk k is order[bounds[k]:bounds[k+1]].
    pack_ih / pack_hh choose the packed micro-kernel for the input / recurrent GEMM
    (decided by the caller from T and B, never from the thread count).
    """
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = h_n.shape[1]
    cdef Py_ssize_t nchunks = bounds.shape[0] - 1, k
    cdef floating *p_gates = ptr3(gates)
    cdef floating *p_hns = ptr3(hns)
    cdef const floating *p_h0 = cptr2(h0)
    cdef const floating *p_bx = cptr1(bias_x)
    cdef const floating *p_bhn = cptr1(bias_hn)
    cdef floating *packed_ih = NULL
    cdef floating *packed_hh = NULL
    cdef int failed = 0
    with nogil:
        if pack_ih:
            packed_ih = <floating *> malloc(packed_size(packed_ih, 3 * H, I) * sizeof(floating))
            if packed_ih != NULL:
                pack_parallel(packed_ih, &w_ih[0, 0], 3 * H, I, I, 1, n_threads)
        if pack_hh:
            packed_hh = <floating *> malloc(packed_size(packed_hh, 3 * H, H) * sizeof(floating))
            if packed_hh != NULL:
                pack_parallel(packed_hh, &w_hh[0, 0], 3 * H, H, H, 1, n_threads)
        if (pack_ih and packed_ih == NULL) or (pack_hh and packed_hh == NULL):
            failed = 1
        else:
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += forward_chunk(
                    &y[0, 0, 0], &h_n[0, 0], p_gates, p_hns, &x[0, 0, 0], p_h0,
                    &w_ih[0, 0], packed_ih, &w_hh[0, 0], packed_hh, p_bx, p_bhn,
                    &order[bounds[k]], bounds[k + 1] - bounds[k], &lengths[0],
                    T, B, I, H, reverse) != 0
        free(packed_ih)
        free(packed_hh)
    if failed:
        raise MemoryError("fastrnn GRU forward: out of memory")


def backward(floating[:, :, ::1] dx, floating[:, ::1] dh0,
             floating[:, ::1] dw_ih, floating[:, ::1] dw_hh,
             floating[:, :, ::1] dgx, floating[:, :, ::1] dgh,
             const floating[:, :, ::1] dy, const floating[:, ::1] dh_n,
             const floating[:, :, ::1] hns, const floating[:, :, ::1] y,
             const floating[:, ::1] h0, const floating[:, :, ::1] x,
             const floating[:, :, ::1] h_prev,
             const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
             const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
             const Py_ssize_t[::1] bounds, bint reverse, int n_threads):
    """GRU backward through time. dgx holds forward's gates and is overwritten with dL/dgx.

    After the reverse loop, three GEMMs over all T*B rows (BLAS):
        dx = dgx W_ih,   dw_ih = dgx^T x,   dw_hh = dgh^T h_prev
    h_prev (T, B, H) is the state each step read (a view of forward's hs).
    """
    cdef Py_ssize_t T = dy.shape[0], B = dy.shape[1], H = dy.shape[2], I = x.shape[2]
    cdef Py_ssize_t G = 3 * H, nchunks = bounds.shape[0] - 1, k
    cdef int TB = <int> (T * B)
    cdef const floating *p_dh_n = cptr2(dh_n)
    cdef const floating *p_h0 = cptr2(h0)
    cdef floating *packed_hhT = NULL
    cdef int failed = 0
    with nogil:
        packed_hhT = <floating *> malloc(packed_size(packed_hhT, H, G) * sizeof(floating))
        if packed_hhT == NULL:
            failed = 1
        else:
            pack_parallel(packed_hhT, &w_hh[0, 0], H, G, 1, H, n_threads)   # w_hh^T: (H x 3H)
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += backward_chunk(
                    &dgx[0, 0, 0], &dgh[0, 0, 0], &dh0[0, 0], &dy[0, 0, 0], p_dh_n,
                    &hns[0, 0, 0], &y[0, 0, 0], p_h0, packed_hhT, &order[bounds[k]],
                    bounds[k + 1] - bounds[k], &lengths[0], T, B, H, reverse) != 0
            free(packed_hhT)
            if not failed:
                gemm(False, False, TB, <int> I, <int> G, 1, &dgx[0, 0, 0], <int> G,
                     &w_ih[0, 0], <int> I, 0, &dx[0, 0, 0], <int> I)
                gemm(True, False, <int> G, <int> I, TB, 1, &dgx[0, 0, 0], <int> G,
                     &x[0, 0, 0], <int> I, 0, &dw_ih[0, 0], <int> I)
                gemm(True, False, <int> G, <int> H, TB, 1, &dgh[0, 0, 0], <int> G,
                     &h_prev[0, 0, 0], <int> H, 0, &dw_hh[0, 0], <int> H)
    if failed:
        raise MemoryError("fastrnn GRU backward: out of memory")
