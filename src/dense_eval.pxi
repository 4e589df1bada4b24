# nn.Linear's eval forward on team_pool.h's workers instead of an OpenMP team
# (included by _recurrent.pyx, which owns the pool).
#
# Generation alternates a recurrent step, which runs on the pool, with the decoder
# every token. With the decoder on an OpenMP team the two kinds of waiting worker
# shared the two CPUs, each spinning beside the other's team: `generate_ids`, char
# LSTM H=512, 200 tokens for n samples at once, Zen 4 EPYC, 2 threads, took 66.7 /
# 77.7 / 113.4 ms at n = 4 / 8 / 16, and 34.3 / 46.0 / 70.8 ms with the decoder on
# one thread (session 21; docs/inference.md has the figures of this code).
#
#     y (M, N) := x (M, K) W^T + bias,   W (N, K)
#
# Tasks of output rows (task_rows), claimed by whichever thread of the pool is free
# (fastrnn_pool_for); W is packed once by the caller when there are PACK_MIN_ROWS
# rows or more (decided from the shape, never the thread count), else read in place.
# Each output row is summed alone, so any split gives the same numbers.

DEF DENSE_PACK_MIN_ROWS = 8     # = fastrnn.functional.PACK_MIN_ROWS
DEF DENSE_TILE_ROWS = 12        # AVX-512's float tile; a multiple of AVX2's 6
DEF DENSE_TASK_ROWS = 48


cdef struct DenseJob:
    const void *x               # (M, K) rows
    void *y                     # (M, N) rows
    const void *w               # (N, K), read in place when packed is NULL
    const void *packed          # W packed (pack_matrix), or NULL
    const void *bias            # (N,) or NULL
    Py_ssize_t M, N, K, rows    # rows: per task
    int failed                  # a task ran out of memory


cdef inline void dense_task(floating *tag, DenseJob *j, long c) noexcept nogil:
    """Rows [c*rows, (c+1)*rows) of y := x W^T + bias."""
    cdef Py_ssize_t r0 = c * j.rows, r1 = min(j.M, r0 + j.rows), i, n, N = j.N, K = j.K
    cdef const floating *x = <const floating *> j.x
    cdef floating *y = <floating *> j.y
    cdef const floating *bias = <const floating *> j.bias
    cdef const floating **a = <const floating **> malloc((r1 - r0) * sizeof(void *) + 1)
    cdef floating **out = <floating **> malloc((r1 - r0) * sizeof(void *) + 1)
    if a == NULL or out == NULL:
        j.failed = 1
    else:
        for i in range(r0, r1):
            a[i - r0] = x + i * K
            out[i - r0] = y + i * N
        gemm_rows(r1 - r0, N, K, a, <const floating *> j.packed, <const floating *> j.w, K,
                  out, 0)
        if bias != NULL:
            for i in range(r0, r1):
                for n in range(N):
                    y[i * N + n] += bias[n]
    free(a)
    free(out)


cdef void dense_task_s(void *ctx, long c) noexcept nogil:
    dense_task(<float *> NULL, <DenseJob *> ctx, c)


cdef void dense_task_d(void *ctx, long c) noexcept nogil:
    dense_task(<double *> NULL, <DenseJob *> ctx, c)


def dense_forward(floating[:, ::1] y, const floating[:, ::1] x, const floating[:, ::1] w,
                  const floating[::1] bias, int n_threads):
    """y (M, N) := x (M, K) W^T + bias; w (N, K), bias (N,) or None. An eval call (no
    OpenMP): on up to n_threads threads of team_pool.h, those ready now, else this one."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], N = w.shape[0], nchunks, c
    cdef DenseJob job
    cdef floating *packed = NULL
    cdef bint owns = False
    if y.shape[0] != M or y.shape[1] != N or w.shape[1] != K or (
            bias is not None and bias.shape[0] != N):
        raise ValueError(f"dense_forward: y ({y.shape[0]}, {y.shape[1]}), x ({M}, {K}), "
                         f"w ({N}, {w.shape[1]}) do not match")
    if M == 0 or N == 0:
        return
    job.x, job.y, job.w, job.bias = &x[0, 0], &y[0, 0], &w[0, 0], vptr1(bias)
    job.M, job.N, job.K, job.failed = M, N, K, 0
    job.rows = task_rows(M, DENSE_TILE_ROWS, DENSE_TASK_ROWS, n_threads) if M >= DENSE_TILE_ROWS \
        else (M + n_threads - 1) // n_threads if n_threads > 0 else M
    nchunks = (M + job.rows - 1) // job.rows
    with nogil:
        if M >= DENSE_PACK_MIN_ROWS and K > 0:
            packed = pack_matrix(&w[0, 0], N, K, False, 1)
            if packed == NULL:
                job.failed = 1
        job.packed = packed
        if not job.failed:
            n_threads = min(n_threads, FASTRNN_POOL_MAX + 1)    # the pool's largest team
            owns = n_threads > 1 and nchunks > 1 and fastrnn_pool_enter(n_threads)
            if owns:
                fastrnn_pool_for(n_threads, nchunks,
                                 dense_task_s if floating is float else dense_task_d, &job)
                fastrnn_pool_leave()
            else:
                for c in range(nchunks):
                    dense_task(<floating *> NULL, &job, c)
        scratch_free(packed)
    if job.failed:
        raise MemoryError("fastrnn dense forward: out of memory")
