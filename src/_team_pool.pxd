# The eval calls' own worker threads (team_pool.h): a call never waits for a worker
# that has not started.
cdef extern from "team_pool.h" nogil:
    enum: FASTRNN_POOL_MAX      # workers: a pool team has at most FASTRNN_POOL_MAX + 1 threads
    ctypedef void (*fastrnn_share_fn)(void *ctx, int tid, int nthr) noexcept nogil
    ctypedef void (*fastrnn_chunk_fn)(void *ctx, long chunk) noexcept nogil
    void fastrnn_pool_for(int n, long nchunks, fastrnn_chunk_fn fn, void *ctx)
    int fastrnn_pool_enter(int n)
    void fastrnn_pool_leave()
    int fastrnn_pool_ready(int n)
    int fastrnn_pool_try_run(int n, fastrnn_share_fn fn, void *ctx, int may_stop)
    int fastrnn_pool_barrier()
    int fastrnn_pool_contended()
    int fastrnn_pool_busy_only()
    void fastrnn_pool_pretend_stall(int k)
    void fastrnn_pool_clear_backoff(long long next_ns)
    void fastrnn_pool_pretend_busy(long long ns)
    void fastrnn_pool_watch_on(int on)
    void fastrnn_pool_stats(long *out)
    int fastrnn_pool_hold(int hold)
    void fastrnn_pool_refuse(int k, int any_stamp)
    void fastrnn_pool_pretend_colocated(int on)
    void fastrnn_pool_note_openmp()
    int fastrnn_pool_openmp_spinning()
    void fastrnn_pool_set_openmp_window(long long ns, int make_default)
    double fastrnn_pause_ns()
    int fastrnn_cpu_now()
    long long fastrnn_now_ns()
    void fastrnn_spin_pause "FASTRNN_SPIN_PAUSE"()
    long long fastrnn_pool_openmp_window()


cdef extern from "<sched.h>" nogil:
    int sched_yield()
