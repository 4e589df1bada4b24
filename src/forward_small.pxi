# forward_small.pxi: the recurrence driver's entry for eval calls from
# fastrnn._fastpath (included by _recurrent.pyx). The general `forward` takes two
# dozen typed memoryviews; acquiring those alone costs ~3 us, more than a batch-1
# step at H = 32 computes. Here the arrays are checked and read through NumPy's C
# API, and eval_layer / eval_cell do a module call's whole checking and allocation
# in C, then run forward_thread on this thread or on a team (hidden units or rows
# split, as `forward` does) of fastrnn's own worker pool (team_pool.h), which never
# waits for a worker that is not awake.
#
# No training buffers; results are bitwise those of `forward` (the same thread body
# with the same packing, and every split computes each element the same way), since
# bias = b_ih + b_hh is the same float sum.

cdef inline void *data_or_null(object a, int typenum, const char *name, int ndim,
                               Py_ssize_t d0, Py_ssize_t d1, Py_ssize_t d2) except? NULL:
    """The data of a C-contiguous ndarray of type typenum and shape (d0, d1, d2)[:ndim]
    (NULL for None); TypeError / ValueError otherwise. A few integer compares: cheap."""
    if a is None:
        return NULL
    if not fits(a, typenum, ndim, d0, d1, d2):
        raise ValueError(f"forward_small: {name.decode()} must be a C-contiguous ndarray of "
                         f"the input's dtype and shape {(d0, d1, d2)[:ndim]}, got "
                         f"{type(a).__name__} {getattr(a, 'shape', None)}")
    return cnp.PyArray_DATA(<cnp.ndarray> a)


cdef inline bint fits(object a, int typenum, int ndim, Py_ssize_t d0, Py_ssize_t d1,
                      Py_ssize_t d2):
    """a is a C-contiguous ndarray of type typenum and shape (d0, d1, d2)[:ndim]."""
    cdef cnp.npy_intp *dims
    if type(a) is not cnp.ndarray or cnp.PyArray_TYPE(<cnp.ndarray> a) != typenum \
            or cnp.PyArray_NDIM(<cnp.ndarray> a) != ndim \
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray> a):
        return False
    dims = cnp.PyArray_DIMS(<cnp.ndarray> a)
    return dims[0] == d0 and (ndim < 2 or dims[1] == d1) and (ndim < 3 or dims[2] == d2)


# While the pool's workers are not ready, the caller runs the steps alone in segments
# of about this much work (0.2-0.3 ms on one Zen 4 core) and asks again between them,
# so a worker that wakes part-way joins soon. Tests set it lower (pool_test_knobs).
cdef double SEGMENT_FLOP = 8e6

# A call that finds the pool backing off (after a stall, or while a worker's find of
# another thread on its CPU holds it back, team_pool.h) goes on alone in segments of
# this many times SEGMENT_FLOP and asks again between them, so that a team forms for
# the rest once the window has ended. (Each segment reads W_ih again: one-step
# segments would at small batches.)
cdef double BUSY_SEGMENTS = 8

# Teams run by this module's eval calls, by split: [rows, hidden units] (pool_stats).
cdef long TEAMS_BY_SPLIT[2]


cdef struct DigestJob:
    const char *base            # the weights' bytes
    size_t nbytes
    uint64_t *d                 # (nchunks,) each chunk's digest


cdef void digest_one(void *ctx, long c) noexcept nogil:
    cdef DigestJob *j = <DigestJob *> ctx
    j.d[c] = digest_chunk(j.base + c * DIGEST_CHUNK, min(DIGEST_CHUNK, j.nbytes - c * DIGEST_CHUNK))


cdef uint64_t pool_digest(const void *W, size_t nbytes, int n) noexcept nogil:
    """weights_digest (_pack_cache.pxd) of nbytes at W, its chunks on the pool (the
    caller owns it; n threads at most): the same value on any number of threads."""
    cdef size_t nchunks = (nbytes + DIGEST_CHUNK - 1) // DIGEST_CHUNK
    cdef DigestJob job
    cdef uint64_t h
    count_digested(nbytes)      # (pack_cache.h: a count for tests)
    if nchunks < 2 or n < 2:
        return digest_serial(W, nbytes)
    job.base, job.nbytes = <const char *> W, nbytes
    job.d = <uint64_t *> malloc(nchunks * sizeof(uint64_t))
    if job.d == NULL:
        return digest_serial(W, nbytes)
    fastrnn_pool_for(n, nchunks, digest_one, &job)
    h = digest_combine(job.d, nchunks)
    free(job.d)
    return h


cdef void take_digests(const Plan *q, const floating *w_ih, const floating *w_hh, int n,
                       bint bf16, CallDigests *digests) noexcept nogil:
    """The digests of the weights a call packs (both with bf16), on the pool (n threads
    at most), once a call: kept in `digests`. None with the cache off."""
    if digests.taken or pack_cache_is_off():
        return
    digests.taken = True
    if bf16 or q.pack_ih:
        digests.ih = pool_digest(w_ih, q.G * q.H * q.I * sizeof(floating), n)
    if bf16 or packs_hh_slices(q):
        digests.hh = pool_digest(w_hh, q.G * q.H * q.O * sizeof(floating), n)


cdef bint pack_for(Plan *q, const floating *w_ih, const floating *w_hh, int nslices,
                   int n, CallDigests *digests) noexcept nogil:
    """q.w_ih_slices / q.w_hh_slices := w_ih's / w_hh's packed slices for nslices (kept
    in the cache while the weights do not change), as q.pack_ih / q.pack_hh ask, or
    with q.bf16 q.w_ih_bf16 / q.w_hh_bf16 := their bf16 panels. The weights' digests
    are taken on the pool (n threads at most) at the call's first packing and kept in
    `digests` for its next; any float packing the cache lacks is made on the pool too
    (pool_gate_slices), a bf16 one on this thread. False if out of memory."""
    cdef bint bf16 = False
    cdef const uint64_t *d_ih = NULL
    cdef const uint64_t *d_hh = NULL
    if floating is float:
        bf16 = q.bf16
    take_digests(q, w_ih, w_hh, n, bf16, digests)
    if digests.taken:       # else the cache is off, or was when the call began
        d_ih, d_hh = &digests.ih, &digests.hh
    q.nslices = nslices
    q.w_ih_slices = q.w_hh_slices = q.w_ih_bf16 = q.w_hh_bf16 = NULL
    if floating is float:
        if bf16:        # bf16 panels replace both
            q.w_ih_bf16 = bf16_gate_slices(w_ih, q.G, q.H, q.I, nslices, 1, True, d_ih)
            q.w_hh_bf16 = bf16_gate_slices(w_hh, q.G, q.H, q.O, nslices, 1, True, d_hh)
            return q.w_ih_bf16 != NULL and q.w_hh_bf16 != NULL
    if q.pack_ih:
        q.w_ih_slices = pool_gate_slices(w_ih, q.G, q.H, q.I, nslices, n, d_ih)
        if q.w_ih_slices == NULL:
            return False
    if packs_hh_slices(q):
        q.w_hh_slices = pool_gate_slices(w_hh, q.G, q.H, q.O, nslices, n, d_hh)
        if q.w_hh_slices == NULL:
            return False
    return True


cdef bint packing_kept(const Plan *q, const floating *w_ih, const floating *w_hh,
                       int nslices, int n, CallDigests *digests) noexcept nogil:
    """Does the cache hold every float packing pack_for(q, ..., nslices) would make? (The
    digests taken as pack_for takes them, and kept in `digests` for it.) False with the
    cache off; bf16 plans are not asked (True: no wait for them)."""
    if q.bf16:
        return True
    if pack_cache_is_off():
        return False
    take_digests(q, w_ih, w_hh, n, False, digests)
    return ((not q.pack_ih or slices_kept(w_ih, q.G, q.H, q.I, nslices, digests.ih))
            and (not packs_hh_slices(q)
                 or slices_kept(w_hh, q.G, q.H, q.O, nslices, digests.hh)))


cdef bint slices_kept(const floating *W, Py_ssize_t G, Py_ssize_t H, Py_ssize_t K,
                      int nslices, uint64_t digest) noexcept nogil:
    """Does the cache hold W's gate_slices packing for nslices (W's digest given)?"""
    cdef bint cache = True
    cdef uint64_t d = 0
    cdef PackLayout layout
    cdef void *buf = find_packed(&cache, PACK_GATE_SLICES, W, sizeof(floating), nslices, G, H,
                                 K, 1, &layout, &d, &digest)
    if buf == NULL:
        return False
    slices_free(buf)
    return True


# The first use of a unit split's weights (neither its one-thread packing nor the
# team's kept yet: a first call) whose first segment finds no team ready waits up to
# FIRST_WAIT_NS for the workers it woke, when that packing is at least FIRST_WAIT_BYTES,
# rather than pack the weights in the one-thread layout, which the team does not read
# (a row split's team reads that one: no wait): packing 32 MB alone took ~20 ms of a
# first call (LSTM I=H=1024 B=1 T=100, 2-core Xeon) and kept a second copy in the
# cache, while a woken worker is ready within 60-360 us there (team_pool.h). No wait in
# the OpenMP spin window or a back-off (no team would form), and none in this process
# once a wait has run out (the workers cannot run beside the caller: one CPU).
DEF FIRST_WAIT_DEFAULT_NS = 1000000
cdef long long FIRST_WAIT_NS = FIRST_WAIT_DEFAULT_NS
cdef size_t FIRST_WAIT_BYTES = 4 << 20
cdef bint FIRST_WAIT_RAN_OUT = False


cdef bint wait_for_team(int team, bint fast) noexcept nogil:
    """Spin up to FIRST_WAIT_NS until `team` - 1 workers are ready (yielding now and then:
    a worker may be waiting for this CPU); False if the time ran out. Stops early when
    calls must run alone (a back-off, the OpenMP window for the fast path)."""
    cdef long long deadline = fastrnn_now_ns() + FIRST_WAIT_NS
    cdef int spin = 0
    while not fastrnn_pool_ready(team):
        if fastrnn_pool_contended() or (fast and fastrnn_pool_openmp_spinning()):
            return True
        if fastrnn_now_ns() >= deadline:
            return False
        spin += 1
        if spin % 64 == 0:
            sched_yield()
        else:
            fastrnn_spin_pause()
    return True


cdef struct SegmentWork:
    # A call's buffers for its segments (run_small and forward_on_pool allocate them)
    Py_ssize_t *lengths         # (B,) steps each row has left from the segment's start
    void *h                     # (B, O) h_{s-1} gathered per row (reverse direction, rows of
                                # different lengths: each row's state at its own time)
    Py_ssize_t *bounds          # (team + 1,) a row split's chunks balanced by length, or NULL


cdef void run_small_typed(floating *y, Plan *p, const floating *b_ih, const floating *b_hh,
                          floating *bias, int n, bint by_units, const uint64_t *known,
                          SegmentWork *work, int *fail) noexcept nogil:
    """bias = b_ih + b_hh (GRU: [b_ih + b_hh for r, z | b_ih for n], b_hn = b_hh's n part;
    the reset-before GRU: b_ih + b_hh in all three, as fastrnn.functional combines
    them), then the layer's steps: on a team of n
    threads of team_pool.h (hidden units split when by_units: every thread all rows,
    one barrier per step; else rows) when the pool's workers are ready; else on this
    thread, a segment of steps at a time, asking again between segments, so that a
    worker that was asleep joins part-way and the call never waits for one. A unit
    split team that stalls stops after a step and this thread goes on alone; no team
    forms while the pool backs off after a stall or after a worker found another thread
    on its CPU (team_pool.h; the latter window can end part-way through a call). Every
    split and every segmentation gives bitwise the same numbers (a segment starts
    from the h and c the last one wrote). known: (2,) the digests of w_ih and w_hh
    (frozen weights: they cannot have changed since they were taken), or NULL to
    take them. Rows may differ in length (p.lengths, p.order by decreasing length):
    steps run up to the longest. A projected LSTM (p.w_hr, rows only) packs w_hr for
    the call when p.pack_hh, as `forward` does. fail[0]: 1 out of memory."""
    cdef Py_ssize_t j, G = p.G, H = p.H, B = p.B
    cdef Py_ssize_t n_sum = 2 * H if p.cell == CELL_GRU else G * H
    cdef int team = n if by_units else <int> min(<Py_ssize_t> n, B)
    cdef bint owns = team > 1 and fastrnn_pool_enter(team)
    cdef int pool_n = team if owns else 1     # threads the pool may lend this call
    if b_ih != NULL:
        for j in range(n_sum):
            bias[j] = b_ih[j] + b_hh[j]
        for j in range(n_sum, G * H):
            bias[j] = b_ih[j]
        p.bias = bias
        p.bias_h = b_hh + 2 * H if p.cell == CELL_GRU else NULL
    if p.w_hr != NULL and p.pack_hh:
        p.w_hr_packed = pack_matrix(<const floating *> p.w_hr, p.O, H, False, 1)
        if p.w_hr_packed == NULL:
            fail[0] = 1         # (no steps run; the pool is given back below)
    run_segments(y, p, team, by_units, owns, pool_n, known, work, fail, True)
    if owns:
        fastrnn_pool_leave()
    scratch_free(<void *> p.w_hr_packed)
    p.w_hr_packed = NULL


cdef void run_segments(floating *y, Plan *p, int team, bint by_units, bint owns, int pool_n,
                       const uint64_t *known, SegmentWork *work, int *fail,
                       bint fast) noexcept nogil:
    """p's steps (its bias, projection and weights set), on a team of `team` threads of
    the pool (hidden units split when by_units, else rows by work.bounds) whenever the
    workers are ready, else on this thread a segment at a time, asking again between
    segments (run_small_typed says why and how). owns: this call owns the pool (else
    every step runs here); pool_n: threads the pool may lend to packing; known: the
    weights' digests or NULL; fast: the fast path's call (its teams are counted in
    pool_stats). fail[0]: 1 out of memory. A plan with a training call's per-step
    arrays (gates, aux, hr, y_copy) runs as one segment."""
    cdef Py_ssize_t s = 0, e, seg, B = p.B
    cdef Py_ssize_t T = p.lengths[p.order[0]]                  # steps: the longest row's
    cdef Plan alone, crew
    global FIRST_WAIT_RAN_OUT
    cdef bint alone_packed = False, crew_packed = False, contended, whole, waited = False
    cdef CallDigests digests
    cdef ForwardTeam ctx
    cdef int *fails = NULL
    cdef int q
    alone = p[0]
    crew = p[0]
    digests = call_digests(known)
    seg = T
    if owns:
        seg = max(1, <Py_ssize_t> (SEGMENT_FLOP / (2.0 * B * p.G * p.H * (p.I + p.H))))
    # a training plan's per-step arrays (segment() does not move them): one segment,
    # and a team that runs it to the end
    whole = p.gates != NULL or p.aux != NULL or p.hr != NULL or p.y_copy != NULL
    if whole:
        seg = T
    while s < T and not fail[0]:
        contended = owns and fastrnn_pool_contended()
        # (the general path's calls form a team in the OpenMP spin window, as they did)
        if owns and not contended and not (fast and fastrnn_pool_openmp_spinning()) \
                and fastrnn_pool_ready(team):
            if not crew_packed:     # once per call, and only when a team can form
                crew_packed = True
                fails = <int *> calloc(team, sizeof(int))
                if fails == NULL or not pack_for(&crew, <const floating *> p.w_ih,
                                                 <const floating *> p.w_hh,
                                                 team if by_units else 1, pool_n, &digests):
                    fail[0] = 1
                    break
                crew.pool_team = True
            segment(&crew, p, y, s, T, work)
            ctx.p, ctx.bounds, ctx.by_units, ctx.single, ctx.fails = &crew, work.bounds, \
                by_units, floating is float, fails
            ctx.steps = 0
            # the unit split meets at every step: if it stalls (another process holds
            # a worker's CPU), it stops at a step and this thread goes on alone. (The
            # packing above may have taken long enough for a worker to see one.)
            if not fastrnn_pool_contended() and \
                    fastrnn_pool_try_run(team, forward_share, &ctx, by_units and not whole):
                if fast:
                    TEAMS_BY_SPLIT[1 if by_units else 0] += 1   # one pool owner at a time
                for q in range(team):
                    fail[0] = fail[0] | fails[q]
                s = s + ctx.steps
                if s >= T or fail[0]:
                    break
                continue
        # alone: a segment, then ask again; while the pool backs off (after a stall, or
        # while a worker's find holds it back), longer segments (BUSY_SEGMENTS: each
        # segment reads W_ih again), so that a team forms for the rest once the window
        # has ended. After a stall the rest of the call ran alone at once: one stall
        # (on this KVM guest, about one every 0.1-0.3 s of a 2-thread unit split, with
        # nothing else running) cost a long call up to its whole length at one thread's
        # speed (LSTM I=300 H=1000 B=1 T=1000, 2-core Xeon: 241-248 ms a call without
        # one, 360-535 with one, 538 on one thread; a helper's scan)
        if not contended:
            e = min(T, s + seg)
        else:
            e = min(T, s + <Py_ssize_t> (BUSY_SEGMENTS * seg))
        if not alone_packed and not waited and s == 0 and not crew_packed and owns \
                and by_units and not contended and not FIRST_WAIT_RAN_OUT \
                and not (fast and fastrnn_pool_openmp_spinning()) \
                and (p.pack_ih or p.pack_hh) \
                and p.G * p.H * ((p.I if p.pack_ih else 0) + (p.O if p.pack_hh else 0)) \
                    * sizeof(floating) >= FIRST_WAIT_BYTES \
                and not packing_kept(&alone, <const floating *> p.w_ih,
                                     <const floating *> p.w_hh, 1, pool_n, &digests) \
                and not packing_kept(&alone, <const floating *> p.w_ih,
                                     <const floating *> p.w_hh, team, pool_n, &digests):
            waited = True
            if not wait_for_team(team, fast):
                FIRST_WAIT_RAN_OUT = True
            continue                # the team's branch asks again (or this one packs)
        if not alone_packed:
            alone_packed = True
            if not pack_for(&alone, <const floating *> p.w_ih, <const floating *> p.w_hh, 1,
                            pool_n, &digests):
                fail[0] = 1
                break
        segment(&alone, p, y, s, e, work)
        forward_thread(<floating *> alone.y, &alone, 0, B, 0, p.H,
                       <const floating *> alone.w_ih_slices, <const floating *> alone.w_hh_slices,
                       <const uint16_t *> alone.w_ih_bf16, <const uint16_t *> alone.w_hh_bf16,
                       False, fail, 0, 1)
        s = e
    free(fails)
    if alone_packed:
        slices_free(<void *> alone.w_ih_slices); slices_free(<void *> alone.w_hh_slices)
        slices_free(<void *> alone.w_ih_bf16); slices_free(<void *> alone.w_hh_bf16)
    if crew_packed:
        slices_free(<void *> crew.w_ih_slices); slices_free(<void *> crew.w_hh_slices)
        slices_free(<void *> crew.w_ih_bf16); slices_free(<void *> crew.w_hh_bf16)


cdef void segment(Plan *q, const Plan *p, floating *y, Py_ssize_t s, Py_ssize_t e,
                  SegmentWork *work) noexcept nogil:
    """Point q at steps [s, e) of p's layer in the order they run (a row of length L
    runs times 0 .. L - 1, or L - 1 down to 0 when p.reverse): each row with its
    steps left (work.lengths), at most e - s of them, from p's h0 and c0 (s = 0) or
    from the state step s - 1 left (h in y, O values a row; c in c_n). Forward, every
    row's step s is time s: x and y start there, and h_{s-1} is y's time s - 1. Reverse, a row's
    step s is time L - 1 - s: x and y stay, and h_{s-1} (time L - s) is y's time
    L - s for every row when all rows are L long, else gathered row by row into work.h."""
    cdef Py_ssize_t k, B = p.B, O = p.O, L
    cdef Py_ssize_t longest = p.lengths[p.order[0]], shortest = p.lengths[p.order[B - 1]]
    for k in range(B):
        L = p.lengths[k] - s
        work.lengths[k] = L if L > 0 else 0
    q.lengths = work.lengths
    q.max_steps = e - s
    q.T = e - s
    if not p.reverse:
        if p.x_ids != NULL:         # x is a table read by id: the ids move instead
            q.x_ids = p.x_ids + s * B
        else:
            q.x = <const floating *> p.x + s * B * p.I
        q.y = y + s * B * p.ldy
    if s == 0:
        q.h0, q.ldh0 = p.h0, p.ldh0
    elif not p.reverse:
        q.h0, q.ldh0 = <const void *> (y + (s - 1) * B * p.ldy), p.ldy
    elif longest == shortest:
        q.h0, q.ldh0 = <const void *> (y + (longest - s) * B * p.ldy), p.ldy
    else:
        for k in range(B):
            if p.lengths[k] > s:            # rows with steps left (the others: h_n is set)
                memcpy(<floating *> work.h + k * O, y + ((p.lengths[k] - s) * B + k) * p.ldy,
                       O * sizeof(floating))
        q.h0, q.ldh0 = work.h, O
    q.c0 = p.c0 if s == 0 else <const void *> p.c_n


cdef int run_small(int cell, bint single, Py_ssize_t T, Py_ssize_t B, Py_ssize_t I,
                   Py_ssize_t H, const void *x, void *y, void *h_n, void *c_n,
                   const void *h0, const void *c0, const void *w_ih, const void *w_hh,
                   const void *b_ih, const void *b_hh, bint pack_ih, bint pack_hh,
                   int n_threads, bint by_units, const uint64_t *known,
                   Py_ssize_t ldy=0, bint reverse=False, const Py_ssize_t *lengths=NULL,
                   const Py_ssize_t *order=NULL, const void *w_hr=NULL,
                   Py_ssize_t O=0) noexcept nogil:
    """One layer and direction over T steps of B rows (float32 when `single`, else
    float64), on n_threads (see run_small_typed). Arrays as in _plan.pxd; h0, c0,
    b_ih/b_hh NULL for none; known: the weights' digests or NULL (run_small_typed);
    w_hr (O, H): a projected LSTM's (then w_hh is (4H, O); y, h_n and h0 hold O
    values a row; by_units must be False), else NULL and O = H (O <= 0 means H);
    ldy: y's row stride (0: O; 2O for a direction's half of a bidirectional layer's
    output); reverse: each row from its last step back; lengths (B,) in [1, T] with
    order (B,) the rows by decreasing length (stable), or NULL for rows T long
    (y's steps past a row's length are left as they are: the caller zeroes them).
    The reset-before GRU (CELL_GRU_RESET_BEFORE) runs on this thread (its step's second
    barrier has no stop for a pool team): the callers serve it only when the general
    path would run it on one thread too.
    Returns 0, or 1 when out of memory."""
    cdef Plan p
    cdef int fail = 0
    cdef int team
    cdef Py_ssize_t k, c, G = cell_gates(cell), total, acc
    cdef size_t esize = sizeof(float) if single else sizeof(double)
    cdef bint ragged = lengths != NULL and lengths[order[0]] != lengths[order[B - 1]]
    cdef SegmentWork work
    if n_threads < 1:
        n_threads = 1
    if n_threads > FASTRNN_POOL_MAX + 1:    # the most the pool's team can have
        n_threads = FASTRNN_POOL_MAX + 1
    if w_hr == NULL or O <= 0:
        O = H
    else:
        by_units = False        # the projection needs all of h_t: rows only
    if cell == CELL_GRU_RESET_BEFORE:
        n_threads, by_units = 1, False
    team = n_threads if by_units else <int> min(<Py_ssize_t> n_threads, B)
    # lengths and order (B each), the segments' lengths (B), a row split's bounds
    # (team + 1), then the combined bias (G*H), the gathered h (B*O) and the
    # reset-before GRU's r * h_{t-1} (B*H), in one allocation
    cdef Py_ssize_t nidx = 3 * B + team + 1
    cdef Py_ssize_t n_rh = B * H if cell == CELL_GRU_RESET_BEFORE else 0
    cdef Py_ssize_t *rows = <Py_ssize_t *> malloc(nidx * sizeof(Py_ssize_t)
                                                  + (G * H + B * O + n_rh) * esize + 8)
    if rows == NULL:
        return 1
    for k in range(B):
        rows[k] = lengths[k] if lengths != NULL else T
        rows[B + k] = order[k] if order != NULL else k
    work.lengths = rows + 2 * B
    work.h = <char *> (rows + nidx) + G * H * esize
    work.bounds = NULL
    if ragged and not by_units and team > 1:
        # chunks of rows in order, balanced by their total length (as functional.Schedule)
        work.bounds = rows + 3 * B
        total = 0
        for k in range(B):
            total += rows[k]
        work.bounds[0], acc, k = 0, 0, 0
        for c in range(1, team):
            while k < B - (team - c) and (k < c or acc * team < c * total):
                acc += rows[rows[B + k]]
                k += 1
            work.bounds[c] = k
        work.bounds[team] = B
    memset(&p, 0, sizeof(Plan))
    p.cell, p.G, p.T, p.B, p.I, p.H, p.O = cell, G, T, B, I, H, O
    p.lengths, p.order = rows, rows + B
    p.pack_ih, p.pack_hh = pack_ih, pack_hh
    p.w_ih, p.w_hh, p.w_hr, p.x, p.h0, p.c0 = w_ih, w_hh, w_hr, x, h0, c0
    p.y, p.ldy, p.h_n, p.c_n = y, ldy if ldy > 0 else O, h_n, c_n
    p.reverse = reverse
    if cell == CELL_GRU_RESET_BEFORE:
        p.rh = <char *> work.h + B * O * esize
    if single:
        run_small_typed(<float *> y, &p, <const float *> b_ih, <const float *> b_hh,
                        <float *> (rows + nidx), n_threads, by_units, known, &work, &fail)
    else:
        run_small_typed(<double *> y, &p, <const double *> b_ih, <const double *> b_hh,
                        <double *> (rows + nidx), n_threads, by_units, known, &work, &fail)
    free(rows)
    return fail


def forward_small(int cell, y, h_n, c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                  bint pack_ih, bint pack_hh):
    """One layer on the calling thread, every array checked (ValueError naming it):
    x (T, B, I) float32 or float64, y (T, B, H), h_n, c_n, h0, c0 (B, H) (c_n, c0 for
    the LSTM only; h0, c0 None for zeros), w_ih (G*H, I), w_hh (G*H, H), b_ih, b_hh
    (G*H,) or both None, all C-contiguous of x's dtype (frozen weights: not hashed,
    frozen_known). What fastrnn._fastpath's `kernel_only` times; eval_layer /
    eval_cell run the same `run_small`."""
    cdef int typenum
    cdef Py_ssize_t T, B, I, G = cell_gates(cell), H
    cdef const void *b1
    cdef const void *b2
    cdef void *py
    cdef void *phn
    cdef void *pcn
    cdef const void *px
    cdef const void *ph0
    cdef const void *pc0
    cdef const void *pih
    cdef const void *phh
    cdef bint lstm = cell == CELL_LSTM
    cdef int fail
    cdef uint64_t known[2]
    cdef tuple kd
    if not 0 <= cell <= CELL_GRU_RESET_BEFORE:
        raise ValueError(f"forward_small: cell must be a CELL_RNN_*, CELL_LSTM, CELL_GRU or "
                         f"CELL_GRU_RESET_BEFORE (0-{<int> CELL_GRU_RESET_BEFORE}), got {cell}")
    if (type(x) is not cnp.ndarray or cnp.PyArray_NDIM(<cnp.ndarray> x) != 3
            or type(w_ih) is not cnp.ndarray or cnp.PyArray_NDIM(<cnp.ndarray> w_ih) != 2):
        raise ValueError("forward_small: x must be a (T, B, I) and w_ih a (G*H, I) ndarray")
    typenum = cnp.PyArray_TYPE(<cnp.ndarray> x)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise ValueError(f"forward_small: x must be float32 or float64, got {x.dtype}")
    T, B, I = x.shape
    H = w_ih.shape[0] // G
    px = data_or_null(x, typenum, b"x", 3, T, B, I)
    pih = data_or_null(w_ih, typenum, b"w_ih", 2, G * H, I, 0)
    phh = data_or_null(w_hh, typenum, b"w_hh", 2, G * H, H, 0)
    py = data_or_null(y, typenum, b"y", 3, T, B, H)
    phn = data_or_null(h_n, typenum, b"h_n", 2, B, H, 0)
    pcn = data_or_null(c_n, typenum, b"c_n", 2, B, H, 0) if lstm else NULL
    ph0 = data_or_null(h0, typenum, b"h0", 2, B, H, 0)
    pc0 = data_or_null(c0, typenum, b"c0", 2, B, H, 0) if lstm else NULL
    b1 = data_or_null(b_ih, typenum, b"b_ih", 1, G * H, 0, 0)
    b2 = data_or_null(b_hh, typenum, b"b_hh", 1, G * H, 0, 0)
    if phh == NULL or py == NULL or phn == NULL or (lstm and pcn == NULL) or (b1 == NULL) != (b2 == NULL):
        raise ValueError("forward_small: w_hh, y, h_n (and c_n for the LSTM) are required, "
                         "and b_ih and b_hh go together")
    if T < 1 or B < 1:
        raise ValueError(f"forward_small: empty input {(T, B, I)}")
    kd = frozen_known(True, w_ih, w_hh)
    if kd is not None:
        known[0], known[1] = kd[0], kd[1]
    with nogil:
        fail = run_small(cell, typenum == cnp.NPY_FLOAT32, T, B, I, H, px, py, phn, pcn,
                         ph0, pc0, pih, phh, b1, b2, pack_ih, pack_hh, 1, False,
                         known if kd is not None else NULL)
    if fail:
        raise MemoryError("fastrnn recurrent forward: out of memory")


cdef inline bint plan_stale(tuple params):
    """A parameter of the plan got a new array, or its array a new shape, since the
    plan was built, or a frozen array whose digest the plan took is no longer the
    same read-only memory of the same bytes object (NumPy's __setstate__ can swap an
    array's memory in place) (params: ((Parameter, array, shape, frozen), ...),
    fastrnn._fastpath; frozen: None, or (that bytes object, the data's address))."""
    cdef tuple entry, shape, frozen
    cdef int k, ndim
    for entry in params:
        arr = entry[1]
        if entry[0].data is not arr:
            return True
        frozen = <tuple> entry[3]
        if frozen is not None and not still_frozen(<cnp.ndarray> arr, frozen):
            return True
        shape = <tuple> entry[2]
        ndim = cnp.PyArray_NDIM(<cnp.ndarray> arr)
        if ndim != len(shape):
            return True
        for k in range(ndim):   # in C: arr.shape would build a tuple per parameter
            if cnp.PyArray_DIMS(<cnp.ndarray> arr)[k] != <Py_ssize_t> shape[k]:
                return True
    return False


cdef inline bint still_frozen(cnp.ndarray arr, tuple frozen):
    """arr is read-only, at the address it had, and its base chain still ends at the
    bytes object frozen[0] (frozen = (bytes object, address))."""
    cdef object o = arr
    if cnp.PyArray_ISWRITEABLE(arr) or <size_t> cnp.PyArray_DATA(arr) != <size_t> frozen[1]:
        return False
    while type(o) is cnp.ndarray:
        o = cnp.get_array_base(<cnp.ndarray> o)
    return o is frozen[0]


cdef inline const uint64_t *layer_digests(tuple digests, Py_ssize_t k, uint64_t *known):
    """known := the plan's digests of layer k's w_ih and w_hh, taken when the plan was
    built from frozen weights (their values cannot have changed since, and the plan
    is stale once an array is replaced); NULL if it has none."""
    d = digests[k]
    if d is None:
        return NULL
    known[0], known[1] = (<tuple> d)[0], (<tuple> d)[1]
    return known


cdef inline tuple schedule_of(plan, Py_ssize_t T, Py_ssize_t B):
    """plan.schedule(T, B), read from the plan's cache without a Python call when there."""
    s = (<dict> plan.scheds).get((T, B))
    return <tuple> (s if s is not None else plan.schedule(T, B))


cdef inline char *offset(object a, Py_ssize_t k, Py_ssize_t nbytes):
    """Address of block k of nbytes bytes in ndarray a, or NULL for None."""
    return NULL if a is None else <char *> cnp.PyArray_DATA(<cnp.ndarray> a) + k * nbytes


def eval_layer(plan, x, hx, lengths=None, order=None):
    """An eval call `module(x, hx, lengths)` of a stack, time-major: (y, h_n) or
    (y, (h_n, c_n)); None when the call does not qualify (the caller then takes the
    general path, which reports bad input); False when the plan is stale. A
    bidirectional layer (plan.D = 2) runs its directions one after the other, each
    writing its half of y ([forward | reverse], rows 2O apart), the reverse one from
    each row's last step back. lengths (B,) intp in [1, T], not all T, with order
    (B,) intp the rows by decreasing length (stable; fastrnn._fastpath checks and
    sorts them), or both None: y is 0 past a row's length, h_n (c_n) its state at
    its last step. h (y's rows, h_n, h0) has O values: H, or a projected LSTM's
    proj_size (then c_n, c0 keep H). plan: a fastrnn._fastpath._Plan, whose
    parameters were validated when it was built."""
    cdef int typenum = plan.typenum
    cdef Py_ssize_t I = plan.I, T, B
    if type(x) is not cnp.ndarray or cnp.PyArray_NDIM(<cnp.ndarray> x) != 3:
        return None
    T, B = cnp.PyArray_DIMS(<cnp.ndarray> x)[0], cnp.PyArray_DIMS(<cnp.ndarray> x)[1]
    if not fits(x, typenum, 3, T, B, I) or T == 0 or B == 0:
        return None
    cdef Py_ssize_t *plen = NULL        # a private copy of lengths, then of order
    cdef Py_ssize_t *pord = NULL
    if lengths is not None:
        if not fits(lengths, cnp.NPY_INTP, 1, B, 0, 0) or not fits(order, cnp.NPY_INTP, 1, B, 0, 0):
            return None
        plen = sorted_rows(<const Py_ssize_t *> cnp.PyArray_DATA(<cnp.ndarray> lengths),
                           <const Py_ssize_t *> cnp.PyArray_DATA(<cnp.ndarray> order), T, B)
        if plen == NULL:
            return None
        pord = plen + B
    try:
        return eval_layer_runs(plan, x, hx, T, B, plen, pord)
    finally:
        free(plen)


cdef Py_ssize_t *sorted_rows(const Py_ssize_t *lengths, const Py_ssize_t *order, Py_ssize_t T,
                             Py_ssize_t B):
    """A private copy (2B values: lengths, then order) of rows' lengths and their order,
    or NULL (also out of memory) unless every length is in [1, T] and order is a
    permutation of the rows by non-increasing length: the driver's steps count active
    rows from that order, so any slip would index times outside x and y. The caller
    frees it; the driver reads the copy, which no other thread can change."""
    cdef Py_ssize_t j, b
    cdef Py_ssize_t *out = <Py_ssize_t *> malloc(2 * B * sizeof(Py_ssize_t) + 8)
    cdef char *seen = <char *> calloc(B + 1, 1)
    cdef bint ok = out != NULL and seen != NULL
    j = 0
    while ok and j < B:
        b = order[j]
        out[j], out[B + j] = lengths[j], b
        ok = 1 <= out[j] <= T and 0 <= b < B and not seen[b]
        if ok:
            seen[b] = 1
        j += 1
    # the order checked on the copy, which no other thread can change
    j = 1
    while ok and j < B:
        ok = out[out[B + j - 1]] >= out[out[B + j]]
        j += 1
    free(seen)
    if not ok:
        free(out)
        return NULL
    return out


def _eval_layer_checks_rows(lengths, order, Py_ssize_t T):
    """Test hook: does eval_layer take these rows (sorted_rows)?"""
    cdef Py_ssize_t[::1] l = lengths
    cdef Py_ssize_t[::1] o = order
    cdef Py_ssize_t *p = sorted_rows(&l[0], &o[0], T, l.shape[0])
    cdef bint ok = p != NULL
    free(p)
    return ok


cdef eval_layer_runs(plan, x, hx, Py_ssize_t T, Py_ssize_t B, const Py_ssize_t *plen,
                     const Py_ssize_t *pord):
    """eval_layer after x (T, B, I) and the rows were checked."""
    cdef int typenum = plan.typenum, cell = plan.cell_code, fail = 0
    cdef bint lstm = plan.lstm, single = plan.typenum == cnp.NPY_FLOAT32
    cdef Py_ssize_t L = plan.L, D = plan.D, H = plan.H, O = plan.O, I = plan.I, k, d, j, esize
    cdef cnp.npy_intp dims[3]
    cdef tuple weights
    cdef tuple w_hrs = plan.w_hr
    h0 = c0 = None
    if hx is not None:
        if lstm:
            if type(hx) is not tuple or len(<tuple> hx) != 2:
                return None
            h0, c0 = hx
            if c0 is not None and not fits(c0, typenum, 3, L * D, B, H):
                return None
        else:
            h0 = hx
        if h0 is not None and not fits(h0, typenum, 3, L * D, B, O):
            return None
    if plan_stale(plan.params):
        return False
    pack_ih, pack_hh, threaded, units_ok, rows_upto = schedule_of(plan, T, B)
    cdef int n_team = plan.threads() if any(threaded) else 1
    if cell == CELL_GRU_RESET_BEFORE and n_team > 1:
        return None     # one thread only here (run_small): the general path's team runs it
    cdef bint by_units = units_ok and n_team > 1 and n_team > rows_upto, team_units
    esize = sizeof(float) if single else sizeof(double)
    dims[0], dims[1], dims[2] = L * D, B, O
    h_n = cnp.PyArray_EMPTY(3, dims, typenum, 0)
    dims[2] = H
    c_n = cnp.PyArray_EMPTY(3, dims, typenum, 0) if lstm else None
    dims[0], dims[2] = T, D * O
    layers = plan.layers
    cdef char *ph_n = offset(h_n, 0, 0)
    cdef char *pc_n = offset(c_n, 0, 0)
    cdef char *ph0 = offset(h0, 0, 0)
    cdef char *pc0 = offset(c0, 0, 0)
    cdef Py_ssize_t step = B * O * esize        # one run's block of h_n and h0
    cdef Py_ssize_t cstep = B * H * esize       # ... of c_n and c0
    cdef Py_ssize_t idx
    cdef bint pih = pack_ih, phh = pack_hh
    cdef const void *w[4]
    cdef uint64_t known[2]
    cdef const uint64_t *pknown
    cdef int n
    cdef char *py
    cdef Py_ssize_t layer_out = plan.layer_out     # a layer's output values: D * O, or O summed
    cdef const void *hr
    cdef bint summed = plan.summed
    digests = plan.digests
    y = x
    for k in range(L):
        n = n_team if threaded[k] else 1
        team_units = by_units and n > 1
        layer_in = y
        # (T, B, layer_out); 0 at padded steps, which the kernel leaves untouched
        y = cnp.PyArray_ZEROS(3, dims, typenum, 0) if plen != NULL else \
            cnp.PyArray_EMPTY(3, dims, typenum, 0)
        py = <char *> cnp.PyArray_DATA(<cnp.ndarray> y)
        for d in range(D):
            idx = k * D + d
            weights = layers[idx]
            for j in range(4):
                w[j] = offset(weights[j], 0, 0)
            pknown = layer_digests(digests, idx, known)
            hr = offset(w_hrs[idx], 0, 0)
            with nogil:
                fail = run_small(cell, single, T, B, I if k == 0 else layer_out, H,
                                 cnp.PyArray_DATA(<cnp.ndarray> layer_in), py + d * O * esize,
                                 ph_n + idx * step, pc_n + idx * cstep if lstm else NULL,
                                 ph0 + idx * step if ph0 != NULL else NULL,
                                 pc0 + idx * cstep if pc0 != NULL else NULL,
                                 w[0], w[1], w[2], w[3], pih, phh, n, team_units, pknown,
                                 D * O, d == 1, plen, pord, hr, O)
            if fail:
                raise MemoryError("fastrnn recurrent forward: out of memory")
        if summed:                                                  # merge_mode "sum"
            dims[2] = O
            both, y = y, cnp.PyArray_EMPTY(3, dims, typenum, 0)     # (T, B, O)
            dims[2] = D * O
            with nogil:
                if single:
                    sum_halves(<float *> cnp.PyArray_DATA(<cnp.ndarray> y), <const float *> py,
                               T * B, O)
                else:
                    sum_halves(<double *> cnp.PyArray_DATA(<cnp.ndarray> y), <const double *> py,
                               T * B, O)
    return (y, (h_n, c_n)) if lstm else (y, h_n)


cdef void sum_halves(floating *out, const floating *both, Py_ssize_t rows, Py_ssize_t H) noexcept nogil:
    """out[r] := both[r, :H] + both[r, H:] for r < rows: a bidirectional layer's
    directions summed (merge_mode "sum"), each element the one IEEE addition the
    general path's ys[0] + ys[1] makes."""
    cdef Py_ssize_t r, j
    for r in range(rows):
        for j in range(H):
            out[r * H + j] = both[r * 2 * H + j] + both[r * 2 * H + H + j]


def eval_cell(plan, x, hx):
    """An eval call `cell(x, hx)`: h' or (h', c'), batched (x (B, I)) or not (x (I,));
    None when the call does not qualify, False when the plan is stale (as eval_layer)."""
    cdef int typenum = plan.typenum, cell = plan.cell_code, fail = 0, ndim
    cdef bint lstm = plan.lstm, single = plan.typenum == cnp.NPY_FLOAT32
    cdef Py_ssize_t H = plan.H, I = plan.I, B, j
    cdef cnp.npy_intp dims[2]
    cdef void *y
    cdef tuple weights
    if type(x) is not cnp.ndarray:
        return None
    ndim = cnp.PyArray_NDIM(<cnp.ndarray> x)
    if ndim == 2:
        B = cnp.PyArray_DIMS(<cnp.ndarray> x)[0]
        dims[0], dims[1] = B, H
    elif ndim == 1:
        B = 1
        dims[0] = H
    else:
        return None
    if not fits(x, typenum, ndim, B if ndim == 2 else I, I, 0) or B == 0:
        return None
    h0 = c0 = None
    if hx is not None:
        if lstm:
            if (type(hx) is not tuple and type(hx) is not list) or len(hx) != 2:
                return None
            h0, c0 = hx
            if not fits(h0, typenum, ndim, dims[0], dims[1], 0) \
                    or not fits(c0, typenum, ndim, dims[0], dims[1], 0):
                return None
        elif not fits(hx, typenum, ndim, dims[0], dims[1], 0):
            return None
        else:
            h0 = hx
    if plan_stale(plan.params):
        return False
    pack_ih, pack_hh, threaded, units_ok, rows_upto = schedule_of(plan, 1, B)
    cdef int n = plan.threads() if threaded[0] else 1
    if cell == CELL_GRU_RESET_BEFORE and n > 1:
        return None     # one thread only here (run_small): the general path's team runs it
    h_n = cnp.PyArray_EMPTY(ndim, dims, typenum, 0)
    c_n = cnp.PyArray_EMPTY(ndim, dims, typenum, 0) if lstm else None
    weights = plan.layers[0]
    cdef const void *w[4]
    for j in range(4):
        w[j] = offset(weights[j], 0, 0)
    cdef const void *px = cnp.PyArray_DATA(<cnp.ndarray> x)
    cdef void *ph_n = offset(h_n, 0, 0)
    cdef void *pc_n = offset(c_n, 0, 0)
    cdef const void *ph0 = offset(h0, 0, 0)
    cdef const void *pc0 = offset(c0, 0, 0)
    cdef bint pih = pack_ih, phh = pack_hh, units = units_ok and n > rows_upto
    cdef uint64_t known[2]
    cdef const uint64_t *pknown = layer_digests(plan.digests, 0, known)
    with nogil:
        y = malloc(B * H * (sizeof(float) if single else sizeof(double)) + 8)   # h_t, copied to h_n
        if y == NULL:
            fail = 1
        else:
            fail = run_small(cell, single, 1, B, I, H, px, y, ph_n, pc_n, ph0, pc0,
                             w[0], w[1], w[2], w[3], pih, phh, n, units and n > 1, pknown)
        free(y)
    if fail:
        raise MemoryError("fastrnn recurrent forward: out of memory")
    return (h_n, c_n) if lstm else h_n


def _digested_bytes():
    """Bytes of weights this module's eval calls have hashed so far (tests)."""
    return int(digested())


def pool_stats():
    """The eval calls' worker pool (team_pool.h), for tests and docs: teams run (of the
    recurrence), tries refused because a worker was not ready, shares run by workers
    (of teams and of loops), workers made, loops run on a team (the weights' digest,
    packing), times a ready worker moved off the caller's CPU, teams in which a thread
    waited for a teammate too long ("stalls"), teams that stopped part-way for it
    ("stops"), times a worker found another thread holding its CPU ("busy"), whether
    calls run alone now for either ("contended"); the
    small-batch fast path's teams that split rows and that split hidden units."""
    cdef long out[9]
    fastrnn_pool_stats(out)
    return {"teams": out[0], "refused": out[1], "worker_shares": out[2], "workers": out[3],
            "loops": out[4], "moved": out[5], "stalls": out[6], "stops": out[7],
            "busy": out[8],
            "contended": bool(fastrnn_pool_contended()), "row_teams": TEAMS_BY_SPLIT[0],
            "unit_teams": TEAMS_BY_SPLIT[1]}


def pool_test_knobs(int refuse=0, double segment_flop=8e6, bint any_stamp=False,
                    double openmp_window=-1, bint colocated=False, int stall_at=0,
                    double backoff=-1, double first_wait=-1):
    """Test hook: the next `refuse` tries to form a team are refused as if the workers
    were not awake yet (so a call runs that many segments alone, then joins), and the
    alone segments are `segment_flop` of work; any_stamp: a waiting worker is claimed
    even when its clock stamp is stale (its vCPU not running it just then), so that the
    team forms deterministically; openmp_window: seconds after an OpenMP team during
    which fast-path calls run alone (negative: the default, team_pool.h). Setting the
    window also ends the current one; colocated: the next time a worker looks where it
    runs, it finds itself on the last caller's CPU (and moves off it as it would);
    stall_at = k >= 1: the next team is marked stalled at its k-th meeting, as if a
    thread had waited there too long for another (a unit split team of the fast path
    meets before its first step and after every step, and stops at that barrier; the
    end of a team is its last meeting, a row split team's first; until the knobs are
    restored, a real long wait does not mark a team stalled);
    backoff: seconds the next back-off window after a stall lasts (negative: the
    default); every call also ends the current window; first_wait: seconds the first
    use of a unit split's weights waits for its team (negative: the default, 1 ms;
    also forgets that a wait ran out). pool_test_knobs() restores the defaults."""
    global SEGMENT_FLOP, FIRST_WAIT_NS, FIRST_WAIT_RAN_OUT
    if refuse < 0 or segment_flop <= 0 or stall_at < 0:
        raise ValueError(f"pool_test_knobs: refuse and stall_at must be >= 0 and "
                         f"segment_flop > 0, got {refuse}, {stall_at} and {segment_flop}")
    SEGMENT_FLOP = min(segment_flop, 1e18)     # (its quotient is cast to a step count)
    FIRST_WAIT_NS = <long long> (min(first_wait, 1e3) * 1e9) if first_wait >= 0 \
        else FIRST_WAIT_DEFAULT_NS
    FIRST_WAIT_RAN_OUT = False
    fastrnn_pool_refuse(refuse, any_stamp)
    fastrnn_pool_set_openmp_window(<long long> (openmp_window * 1e9) if openmp_window >= 0
                                   else -1, False)
    fastrnn_pool_pretend_colocated(colocated)
    fastrnn_pool_pretend_stall(stall_at)
    fastrnn_pool_clear_backoff(<long long> min(backoff * 1e9, 4.0e18) if backoff > 0 else 0)


def pool_pretend_busy(double seconds):
    """Test hook: as if a pool worker had just found another thread on its CPU: calls
    run alone for `seconds`, or until that worker's next looks find nobody there for
    FASTRNN_POOL_GONE_NS (team_pool.h; not while pool_watch is off).
    pool_test_knobs() ends the window."""
    if not seconds > 0:
        raise ValueError(f"pool_pretend_busy: seconds must be > 0, got {seconds}")
    fastrnn_pool_pretend_busy(<long long> min(seconds * 1e9, 4.0e18))


def pool_watch(bint on):
    """Test hook: on=False, the pool's workers stop looking at their own run-queue time
    for another thread on their CPU (team_pool.h), so that teams form whatever else the
    machine runs; on=True (the default) again. pool_test_knobs() leaves it alone."""
    fastrnn_pool_watch_on(on)


def set_openmp_spin_window(double seconds):
    """After one of fastrnn's OpenMP teams (training) ends, fast-path eval calls run
    alone for this long, while its workers may still spin (team_pool.h); inf: always
    after the first. fastrnn/_openmp_wait.py sets it at import."""
    if not seconds >= 0:
        raise ValueError(f"seconds: expected >= 0, got {seconds}")
    fastrnn_pool_set_openmp_window(<long long> min(seconds * 1e9, 4.0e18), True)


def scatter_rows(floating[:, ::1] out, const floating[:, ::1] src, const Py_ssize_t[::1] ids,
                 int n_threads):
    """out := 0, then out[ids[r]] += src[r] for every row r of src, in row order for any
    thread count (rows_scatter_add). ids must lie in [0, len(out))."""
    cdef Py_ssize_t r, V = out.shape[0]
    if src.shape[0] != ids.shape[0] or src.shape[1] != out.shape[1]:
        raise ValueError(f"scatter_rows: src ({src.shape[0]}, {src.shape[1]}), ids "
                         f"({ids.shape[0]},) and out ({out.shape[0]}, {out.shape[1]}) "
                         "do not match")
    for r in range(ids.shape[0]):
        if ids[r] < 0 or ids[r] >= V:
            raise ValueError(f"scatter_rows: ids must lie in [0, {V}), got {ids[r]}")
    with nogil:
        rows_scatter_add(&out[0, 0] if out.shape[0] > 0 else NULL, out.shape[0],
                         &src[0, 0] if src.shape[0] > 0 else NULL,
                         &ids[0] if ids.shape[0] > 0 else NULL, NULL, src.shape[0],
                         src.shape[1], n_threads)


def openmp_spin_window():
    """The window set_openmp_spin_window (or a test hook) set, in seconds."""
    return fastrnn_pool_openmp_window() * 1e-9


def pause_ns():
    """ns one round of a busy-wait loop like libgomp's takes on this CPU (team_pool.h)."""
    cdef double ns
    with nogil:
        ns = fastrnn_pause_ns()
    return ns


def current_cpu():
    """The CPU this thread runs on now (Linux's sched_getcpu), or -1 where unknown."""
    return fastrnn_cpu_now()


def pool_hold(bint hold):
    """Test hook: hold=True puts the pool's workers to sleep and keeps them asleep (a
    call's wake-up is ignored), as after a long idle; hold=False lets them wake again.
    Returns False if the workers did not all fall asleep within a second."""
    cdef int ok
    with nogil:
        ok = fastrnn_pool_hold(hold)
    return bool(ok)


def _digests_of(cnp.ndarray a, int n):
    """Test hook: (weights_digest on n OpenMP threads, pool_digest on up to n pool
    threads) of a C-contiguous array's bytes; the two must be equal."""
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError("_digests_of: a must be C-contiguous")
    cdef const void *p = cnp.PyArray_DATA(a)
    cdef size_t nbytes = cnp.PyArray_NBYTES(a)
    cdef uint64_t d_omp, d_pool
    cdef bint owns
    with nogil:
        d_omp = weights_digest(p, nbytes, n)
        owns = n > 1 and fastrnn_pool_enter(n)
        d_pool = pool_digest(p, nbytes, n if owns else 1)
        if owns:
            fastrnn_pool_leave()
    return d_omp, d_pool


def _packings_of(cnp.ndarray w, int G, int nslices, int n):
    """Test hook: (gate_slices' packing of w (G*H, K) on n OpenMP threads, the same
    on up to n pool threads, whether a pool team packed), the packings as bytes; the
    two must be equal."""
    if cnp.PyArray_TYPE(w) != cnp.NPY_FLOAT32 or w.ndim != 2 or not cnp.PyArray_IS_C_CONTIGUOUS(w) \
            or G < 1 or w.shape[0] % G or nslices < 1 or n < 1:
        raise ValueError("_packings_of: w must be C-contiguous float32 (G*H, K), G, nslices, n >= 1")
    cdef const float *W = <const float *> cnp.PyArray_DATA(w)
    cdef Py_ssize_t H = w.shape[0] // G, K = w.shape[1]
    cdef Py_ssize_t size = slice_offset(W, G, H, K, nslices, nslices)
    cdef float *a
    cdef float *b
    cdef bint owns
    cdef long before[9]
    cdef long after[9]
    fastrnn_pool_stats(before)
    with nogil:
        # the pool's first: OpenMP's workers spin on after their packing, and a pool
        # worker that finds one on its CPU keeps the pool's loops to the caller a while
        owns = n > 1 and fastrnn_pool_enter(n)
        b = <float *> scratch_alloc((size + 1) * sizeof(float))
        if b != NULL:
            pool_pack_slices(b, W, G, H, K, nslices, n if owns else 1)
        if owns:
            fastrnn_pool_leave()
        a = gate_slices(W, G, H, K, nslices, n)
    if a == NULL or b == NULL:
        scratch_free(a); scratch_free(b)
        raise MemoryError("_packings_of")
    out_a = (<char *> a)[:size * sizeof(float)]
    out_b = (<char *> b)[:size * sizeof(float)]
    scratch_free(a); scratch_free(b)
    fastrnn_pool_stats(after)     # (the packing's loop is counted once it has run)
    return out_a, out_b, after[4] > before[4]
