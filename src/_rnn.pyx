# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Elman RNN kernels for one layer, one direction: `forward` and `backward`.

Shapes: T steps, B batch, I input, H hidden (one gate: G = 1).

    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),  act = tanh | relu | identity

Saved for backward (training only):
    pre  (T, B, H)    scratch for x W_ih^T; backward overwrites it with dL/da
    hs   (T+1, B, H)  h_t, with h0 in the extra slot (slot 0 forward, slot T reverse);
                      act'(a) is computed from h_t: 1 - h^2, [h > 0], 1

Callers (fastrnn.functional) validate every shape and dtype first; these
functions trust their arguments and run without the GIL.
"""
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from cython.parallel cimport prange

from _blas cimport floating, gemm
from _simd cimport gemm_rows, packed_size, tanh_
from _schedule cimport time_index, n_active, pack_parallel

DEF BLOCK_ROWS = 64  # rows per input-projection GEMM (time steps x chunk rows)
DEF ACT_TANH = 0
DEF ACT_RELU = 1
DEF ACT_IDENTITY = 2


cdef inline floating *ptr3(floating[:, :, ::1] a) noexcept nogil:
    return &a[0, 0, 0] if a is not None else NULL


cdef inline const floating *cptr2(const floating[:, ::1] a) noexcept nogil:
    return &a[0, 0] if a is not None else NULL


cdef int forward_chunk(
        floating *y,                # OUT (T, B, H) h_t at valid steps
        floating *h_n,              # OUT (B, H) state after each row's last step
        floating *pre,              # OUT (T, B, H) x W_ih^T scratch, or NULL (inference)
        const floating *x,          # IN  (T, B, I)
        const floating *h0,         # IN  (B, H) or NULL for zeros
        const floating *w_ih,       # IN  (H, I)
        const floating *packed_ih,  # IN  packed w_ih, or NULL to use w_ih unpacked
        const floating *w_hh,       # IN  (H, H)
        const floating *packed_hh,  # IN  packed w_hh, or NULL
        const floating *bias,       # IN  (H,) b_ih + b_hh, or NULL
        int act,                    # ACT_TANH, ACT_RELU or ACT_IDENTITY
        const Py_ssize_t *rows,     # IN  (nrows,) batch rows of this chunk, by decreasing length
        Py_ssize_t nrows,
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t I, Py_ssize_t H,
        bint reverse) noexcept nogil:
    """Run rows `rows` through the whole sequence. Returns 0, or -1 if out of memory."""
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef Py_ssize_t tb = (BLOCK_ROWS + nrows - 1) // nrows   # steps per input-projection block
    if tb > maxlen:
        tb = maxlen
    cdef floating *h = <floating *> calloc(nrows * H, sizeof(floating))       # (nrows, H)
    cdef floating *a = <floating *> malloc(nrows * H * sizeof(floating))      # (nrows, H) h W_hh^T
    cdef floating *gx_block = NULL   # (tb, nrows, H) x W_ih^T when not saving
    cdef const floating **src = <const floating **> malloc(tb * nrows * sizeof(void *))
    cdef floating **dst = <floating **> malloc(tb * nrows * sizeof(void *))
    cdef floating **a_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef const floating **h_rows = <const floating **> malloc(nrows * sizeof(void *))
    cdef floating **gx_rows = <floating **> malloc(tb * nrows * sizeof(void *))
    if pre == NULL:
        gx_block = <floating *> malloc(tb * nrows * H * sizeof(floating))
    cdef int status = 0
    cdef Py_ssize_t r, b, s, s0, s1, t, j, m, nact
    cdef floating *gx
    cdef floating *ar
    cdef floating *hr
    if (h == NULL or a == NULL or src == NULL or dst == NULL or a_rows == NULL
            or h_rows == NULL or gx_rows == NULL or (pre == NULL and gx_block == NULL)):
        status = -1
    else:
        for r in range(nrows):
            b = rows[r]
            a_rows[r] = a + r * H
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
                    if pre != NULL:
                        dst[m] = pre + (t * B + b) * H
                    else:
                        dst[m] = gx_block + ((s - s0) * nrows + r) * H
                    gx_rows[(s - s0) * nrows + r] = dst[m]
                    m = m + 1
            gemm_rows(m, H, I, src, packed_ih, w_ih, I, dst, 0)
            # Recurrence: h_t = act(gx + h_{t-1} W_hh^T + b).
            for s in range(s0, s1):
                nact = n_active(rows, nrows, lengths, s)
                gemm_rows(nact, H, H, h_rows, packed_hh, w_hh, H, a_rows, 0)
                for r in range(nact):
                    b = rows[r]
                    t = time_index(s, lengths[b], reverse)
                    gx = gx_rows[(s - s0) * nrows + r]
                    ar = a + r * H
                    hr = h + r * H
                    if bias != NULL:
                        for j in range(H):
                            hr[j] = ar[j] + gx[j] + bias[j]
                    else:
                        for j in range(H):
                            hr[j] = ar[j] + gx[j]
                    if act == ACT_TANH:
                        tanh_(hr, H)
                    elif act == ACT_RELU:
                        for j in range(H):
                            hr[j] = 0 if hr[j] < 0 else hr[j]   # NaN < 0 is false: NaN stays
                    memcpy(y + (t * B + b) * H, hr, H * sizeof(floating))
            s0 = s1
        for r in range(nrows):
            b = rows[r]
            memcpy(h_n + b * H, h + r * H, H * sizeof(floating))
    free(h); free(a); free(gx_block); free(src); free(dst); free(a_rows); free(h_rows); free(gx_rows)
    return status


cdef int backward_chunk(
        floating *da,               # OUT (T, B, H) dL/da (0 at padded steps)
        floating *dh0,              # OUT (B, H)
        const floating *dy,         # IN  (T, B, H)
        const floating *dh_n,       # IN  (B, H) or NULL for zeros
        const floating *y,          # IN  (T, B, H) h_t saved by forward
        int act,
        const floating *packed_hhT, # IN  packed w_hh^T (H x H)
        const Py_ssize_t *rows, Py_ssize_t nrows,
        const Py_ssize_t *lengths,  # IN  (B,)
        Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, bint reverse) noexcept nogil:
    """Reverse loop for one chunk. 0, or -1 if out of memory.

        da_t = (dy_t + dh) * act'(a_t);   dh_{t-1} = da_t W_hh
    """
    cdef Py_ssize_t maxlen = lengths[rows[0]]
    cdef floating *dh = <floating *> calloc(nrows * H, sizeof(floating))   # (nrows, H) carried dL/dh
    cdef const floating **da_rows = <const floating **> malloc(nrows * sizeof(void *))
    cdef floating **dh_rows = <floating **> malloc(nrows * sizeof(void *))
    cdef int status = 0
    cdef Py_ssize_t r, b, s, t, j, nact
    cdef floating *g
    cdef const floating *dyr
    cdef const floating *hr
    cdef floating *dhr
    if dh == NULL or da_rows == NULL or dh_rows == NULL:
        status = -1
    else:
        for r in range(nrows):
            b = rows[r]
            dh_rows[r] = dh + r * H
            if dh_n != NULL:
                memcpy(dh + r * H, dh_n + b * H, H * sizeof(floating))
            for t in range(lengths[b], T):   # padding contributes nothing to dW, dX
                memset(da + (t * B + b) * H, 0, H * sizeof(floating))
        for s in range(maxlen - 1, -1, -1):
            nact = n_active(rows, nrows, lengths, s)
            for r in range(nact):
                b = rows[r]
                t = time_index(s, lengths[b], reverse)
                g = da + (t * B + b) * H
                dyr = dy + (t * B + b) * H
                hr = y + (t * B + b) * H
                dhr = dh + r * H
                if act == ACT_TANH:
                    for j in range(H):
                        g[j] = (dhr[j] + dyr[j]) * (1 - hr[j] * hr[j])
                elif act == ACT_RELU:
                    for j in range(H):
                        g[j] = (dhr[j] + dyr[j]) if hr[j] > 0 else 0
                else:
                    for j in range(H):
                        g[j] = dhr[j] + dyr[j]
                da_rows[r] = g
            # dh_{t-1} = da_t W_hh  (rows past nact keep the dh_n they started with)
            gemm_rows(nact, H, H, da_rows, packed_hhT, NULL, 0, dh_rows, 0)
        for r in range(nrows):
            b = rows[r]
            memcpy(dh0 + b * H, dh + r * H, H * sizeof(floating))
    free(dh); free(da_rows); free(dh_rows)
    return status


def forward(floating[:, :, ::1] y, floating[:, ::1] h_n, floating[:, :, ::1] pre,
            const floating[:, :, ::1] x, const floating[:, ::1] h0,
            const floating[:, ::1] w_ih, const floating[:, ::1] w_hh, const floating[::1] bias,
            int act, const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
            const Py_ssize_t[::1] bounds, bint reverse, bint pack_ih, bint pack_hh,
            int n_threads):
    """RNN forward over all steps. Arrays as in forward_chunk; pre None for inference.

    order (B,) sorts rows by decreasing length; chunk k is order[bounds[k]:bounds[k+1]].
    pack_ih / pack_hh choose the packed micro-kernel for the input / recurrent GEMM
    (decided by the caller from T and B, never from the thread count).
    """
    cdef Py_ssize_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = h_n.shape[1]
    cdef Py_ssize_t nchunks = bounds.shape[0] - 1, k
    cdef floating *p_pre = ptr3(pre)
    cdef const floating *p_h0 = cptr2(h0)
    cdef const floating *p_bias = &bias[0] if bias is not None else NULL
    cdef floating *packed_ih = NULL
    cdef floating *packed_hh = NULL
    cdef int failed = 0
    if act not in (ACT_TANH, ACT_RELU, ACT_IDENTITY):
        raise ValueError(f"act must be 0 (tanh), 1 (relu) or 2 (identity), got {act}")
    with nogil:
        if pack_ih:
            packed_ih = <floating *> malloc(packed_size(packed_ih, H, I) * sizeof(floating))
            if packed_ih != NULL:
                pack_parallel(packed_ih, &w_ih[0, 0], H, I, I, 1, n_threads)
        if pack_hh:
            packed_hh = <floating *> malloc(packed_size(packed_hh, H, H) * sizeof(floating))
            if packed_hh != NULL:
                pack_parallel(packed_hh, &w_hh[0, 0], H, H, H, 1, n_threads)
        if (pack_ih and packed_ih == NULL) or (pack_hh and packed_hh == NULL):
            failed = 1
        else:
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += forward_chunk(
                    &y[0, 0, 0], &h_n[0, 0], p_pre, &x[0, 0, 0], p_h0,
                    &w_ih[0, 0], packed_ih, &w_hh[0, 0], packed_hh, p_bias, act,
                    &order[bounds[k]], bounds[k + 1] - bounds[k], &lengths[0],
                    T, B, I, H, reverse) != 0
        free(packed_ih)
        free(packed_hh)
    if failed:
        raise MemoryError("fastrnn RNN forward: out of memory")


def backward(floating[:, :, ::1] dx, floating[:, ::1] dh0,
             floating[:, ::1] dw_ih, floating[:, ::1] dw_hh, floating[:, :, ::1] da,
             const floating[:, :, ::1] dy, const floating[:, ::1] dh_n,
             const floating[:, :, ::1] y, int act, const floating[:, :, ::1] x,
             const floating[:, :, ::1] h_prev,
             const floating[:, ::1] w_ih, const floating[:, ::1] w_hh,
             const Py_ssize_t[::1] lengths, const Py_ssize_t[::1] order,
             const Py_ssize_t[::1] bounds, bint reverse, int n_threads):
    """RNN backward through time; da (T, B, H) receives dL/da.

    After the reverse loop, three GEMMs over all T*B rows (BLAS):
        dx = da W_ih,   dw_ih = da^T x,   dw_hh = da^T h_prev
    """
    cdef Py_ssize_t T = dy.shape[0], B = dy.shape[1], H = dy.shape[2], I = x.shape[2]
    cdef Py_ssize_t nchunks = bounds.shape[0] - 1, k
    cdef int TB = <int> (T * B)
    cdef const floating *p_dh_n = cptr2(dh_n)
    cdef floating *packed_hhT = NULL
    cdef int failed = 0
    with nogil:
        packed_hhT = <floating *> malloc(packed_size(packed_hhT, H, H) * sizeof(floating))
        if packed_hhT == NULL:
            failed = 1
        else:
            pack_parallel(packed_hhT, &w_hh[0, 0], H, H, 1, H, n_threads)   # w_hh^T
            for k in prange(nchunks, schedule='static', num_threads=n_threads):
                failed += backward_chunk(
                    &da[0, 0, 0], &dh0[0, 0], &dy[0, 0, 0], p_dh_n, &y[0, 0, 0], act,
                    packed_hhT, &order[bounds[k]], bounds[k + 1] - bounds[k], &lengths[0],
                    T, B, H, reverse) != 0
            free(packed_hhT)
            if not failed:
                gemm(False, False, TB, <int> I, <int> H, 1, &da[0, 0, 0], <int> H,
                     &w_ih[0, 0], <int> I, 0, &dx[0, 0, 0], <int> I)
                gemm(True, False, <int> H, <int> I, TB, 1, &da[0, 0, 0], <int> H,
                     &x[0, 0, 0], <int> I, 0, &dw_ih[0, 0], <int> I)
                gemm(True, False, <int> H, <int> H, TB, 1, &da[0, 0, 0], <int> H,
                     &h_prev[0, 0, 0], <int> H, 0, &dw_hh[0, 0], <int> H)
    if failed:
        raise MemoryError("fastrnn RNN backward: out of memory")
