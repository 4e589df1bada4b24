/* team_pool.h: fastrnn's own worker threads for eval (inference) calls, whose calling
 * thread never waits for a worker that has not started. Training keeps OpenMP.
 *
 * Why not OpenMP here: an OpenMP team meets at the start and at the end of every
 * parallel region, so a call made after the process has been idle waits until the
 * sleeping worker is woken. On a virtual machine the idle vCPU must first be
 * scheduled again by the host: on the 2-core Zen 4 KVM guest an LSTMCell H=256 call
 * after 0.15 s idle took 9.6 ms with 2 threads against 0.35 ms on the calling thread
 * alone (docs/inference.md).
 *
 * Here a call wakes the workers without waiting for them, and a team is formed only
 * from workers that are awake and waiting ("ready"): if they are not, the caller
 * runs the work alone (fastrnn_pool_try_run returns 0 and runs nothing), and asks
 * again later (the recurrence driver asks between segments of steps, so a late
 * worker joins a long call part-way; a call that cannot be cut so runs alone, still
 * owning the pool, for the next call to find the workers ready). A worker that
 * wakes to find nothing to do waits, ready, while a call owns the pool and
 * FASTRNN_POOL_READY_NS after, then sleeps again.
 * fastrnn_pool_for runs a loop of independent chunks the same way, each chunk
 * claimed by whichever thread is free; a worker that becomes ready while chunks
 * are left joins (READY -> RUN directly, claimed alone by the caller).
 *
 * Worker w's state (state[w]); only the worker leaves READY for IDLE and only the
 * caller moves READY -> CLAIMED -> RUN (or back to READY), so a claim is race-free:
 *     IDLE (asleep) --wake--> READY --caller claims--> CLAIMED --caller: all claimed--> RUN
 *     RUN --share done--> READY;   READY --timeout--> IDLE;   CLAIMED --not all--> READY
 *     READY --a loop's caller claims it alone--> RUN (fastrnn_pool_for)
 * Within a team, threads meet at fastrnn_pool_barrier (spinning, the team's threads
 * all running; yielding after ~1000 rounds, fastrnn_pool_wait); a team whose thread
 * waits there for milliseconds has lost a CPU to another process and stops or is
 * not formed again for a while (FASTRNN_POOL_STALL_NS). One caller at a time
 * owns the pool (fastrnn_pool_enter); a second concurrent caller is refused and runs
 * alone. After fork() the child starts with no
 * workers and makes its own.
 */
#ifndef FASTRNN_TEAM_POOL_H
#define FASTRNN_TEAM_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTRNN_SPIN_PAUSE() _mm_pause()
#else
#define FASTRNN_SPIN_PAUSE() ((void)0)
#endif

#define FASTRNN_POOL_MAX 64                    /* workers; teams are at most 65 threads */
#define FASTRNN_POOL_READY_NS 2000000LL        /* a woken worker waits 2 ms for a team */

enum { FASTRNN_W_IDLE = 0, FASTRNN_W_READY = 1, FASTRNN_W_CLAIMED = 2, FASTRNN_W_RUN = 3 };

typedef void (*fastrnn_share_fn)(void *ctx, int tid, int nthr);

/* A worker that says READY may still not be running: on a virtual machine its vCPU can
 * be descheduled by the host for ~10 ms just after a long idle, or the worker may have
 * been woken on the caller's CPU. A team formed then waits at its first barrier. So a
 * READY worker also stamps the clock every few microseconds while it spins, and only a
 * worker whose stamp is fresh is claimed. A waiting worker also yields its CPU at
 * every stamp, so that it never spins away the time of a thread it shares the CPU
 * with: the caller (a call running alone took 5.8 ms instead of 1.9 when a woken
 * worker spun on its CPU), or an OpenMP worker of a training call (docs/inference.md
 * gives the figures, measured on the 2-core Zen 4 KVM guest). */
#define FASTRNN_POOL_FRESH_NS 50000LL

/* After an OpenMP team of fastrnn's (a training call) ends, libgomp's workers spin for
 * a while before they sleep; on the 2-core Zen 4 KVM guest eval steps were slow for
 * about 7 ms after a training call (mean 60-650 us a step in 0.5 ms bins against 26 us
 * after, with stalls up to 4 ms): a pool worker sharing a CPU with a spinning OpenMP
 * thread runs only when the scheduler preempts that thread. For this long after a
 * fastrnn_pool_note_openmp(), the fast path runs alone (fastrnn_pool_openmp_spinning);
 * its segments ask again, so the team forms once the window has passed. This is the
 * window until fastrnn/_openmp_wait.py sets one from OMP_WAIT_POLICY / GOMP_SPINCOUNT
 * and the CPU's pause (fastrnn_pause_ns), at import. */
#define FASTRNN_POOL_OPENMP_SPIN_NS 8000000LL

/* Another process's threads can hold a worker's CPU for whole scheduler ticks: a BLAS
 * or ONNX Runtime thread pool spins for up to ~100 ms after its last call, never
 * yielding. A team of the unit split meets at every step, so while its worker is off
 * the CPU the caller waits: on the 2-core Xeon KVM guest an LSTM I=H=512 B=2 T=50 eval
 * call right after a NumPy matmul took 16-19 ms on a team, 9.9 on the caller alone and
 * 3.0 with nothing else running (OpenBLAS's worker and fastrnn's took turns on one CPU
 * in 4 ms slices, `perf sched`). So a thread that waits at a step barrier longer than
 * FASTRNN_POOL_STALL_NS, and longer than its own share of that step took, marks the
 * team stalled (a wait at a team's or a loop's end is not a stall: a big last chunk
 * is work, not another process); a team that may stop (an eval call's unit split,
 * whose next steps can run alone from the state the team left) then stops at its next
 * step barrier, and any stalled team makes the following calls run alone for a
 * back-off window: FASTRNN_POOL_BACKOFF_MIN_NS, doubled at each stall that follows
 * (up to FASTRNN_POOL_BACKOFF_MAX_NS), back to the least after a team that ran without
 * one. A normal step's wait is microseconds; a preempted teammate's is milliseconds. */
#define FASTRNN_POOL_STALL_NS 500000LL
#define FASTRNN_POOL_BACKOFF_MIN_NS 10000000LL
#define FASTRNN_POOL_BACKOFF_MAX_NS 320000000LL

/* A stall is found late: the caller has already waited, and waits on until the
 * preempted worker finishes its step (up to a scheduler tick). So a worker also
 * watches its own time in the run queue (run_delay in /proc/thread-self/schedstat,
 * Linux): when it grew by more than FASTRNN_POOL_QUEUED_NS between two looks a few
 * microseconds apart, another thread holds its CPU, and calls run alone for up to
 * FASTRNN_POOL_BUSY_NS (a window of its own, beside a stall's; no team is formed). A woken
 * worker yields once and looks before it says it is ready. Spinning alone for 5 s on
 * the idle Xeon guest, a worker's look never found more than 100 us (11 switches,
 * 0.16 ms in all); beside OpenBLAS's spinning worker, each look after a yield finds
 * milliseconds. The wait to be scheduled after a wake is not counted. */
#define FASTRNN_POOL_QUEUED_NS 200000LL
#define FASTRNN_POOL_BUSY_NS 20000000LL

/* ... unless the other thread has gone: a worker that found one keeps looking (after
 * every yield, which hands the CPU to a runnable thread, and after every share), and
 * when FASTRNN_POOL_GONE_NS have passed since its find with no look finding another,
 * it ends that window. A thread that ran once and left (the other half of a NumPy
 * matmul whose BLAS workers then sleep, as with OPENBLAS_THREAD_TIMEOUT=4) is gone at
 * the next looks; one that stays (a BLAS pool spinning for ~100 ms) takes the CPU at
 * each yield and is found again. On the 2-core Xeon guest an LSTM I=H=512 T=50 B=2 eval
 * call right after such a matmul ran alone for the whole 20 ms (7.7-8.2 ms a call,
 * 2.7 quiet). A fast-path call (run_small_typed) that finds only this window
 * running, no stall's, goes on in segments and asks again, rather than running the
 * rest at once (fastrnn_pool_busy_only); other calls that find it run alone. */
#define FASTRNN_POOL_GONE_NS 1000000LL

/* A worker on the caller's CPU cannot run beside it: a team of the two takes turns on
 * one CPU, every barrier a trip through the scheduler, slower than the caller alone.
 * On the 2-core Zen 4 KVM guest a woken worker sometimes landed on the caller's CPU,
 * and Linux left it there for several calls (both threads in use, so both "cache hot"
 * for its load balancer): in the benchmark runner a GRU I=H=512 B=2 T=50 eval call
 * then took 4.2-5.8 ms against 1.9-2.1 in the other rounds and 3.6 ms alone, the two
 * threads each waiting 2-6 ms per call in the run queue (/proc schedstat). So a worker
 * publishes the CPU it runs on with its stamp, the caller does not claim a worker on
 * its own CPU, and a ready worker that finds itself on the caller's CPU moves itself
 * off it (fastrnn_pool_step_aside: its affinity less that CPU, kept while it sleeps,
 * so that the next call's wake finds it off that CPU, and changed when a caller runs
 * elsewhere; with no other CPU allowed it sleeps at once). Linux only (sched_getcpu);
 * elsewhere the CPU is unknown (-1). */
#if defined(__linux__) && defined(CPU_COUNT)     /* sched_getcpu, cpu_set_t: _GNU_SOURCE */
#define FASTRNN_POOL_AFFINITY 1
#include <fcntl.h>
#include <unistd.h>
#else
#define FASTRNN_POOL_AFFINITY 0
#endif

/* This thread's file of scheduler statistics, or -1 (not Linux, or not readable). */
static int fastrnn_sched_stats_open(void)
{
#if FASTRNN_POOL_AFFINITY
    return open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
#else
    return -1;
#endif
}

/* ns this thread has waited in a run queue so far (its second number), or -1. */
static long long fastrnn_run_delay_ns(int fd)
{
#if FASTRNN_POOL_AFFINITY
    char buf[96], *end;
    if (fd < 0)
        return -1;
    ssize_t k = pread(fd, buf, sizeof buf - 1, 0);
    if (k <= 0)
        return -1;
    buf[k] = 0;
    strtoll(buf, &end, 10);                             /* time on the CPU */
    if (end == buf)
        return -1;
    char *start = end;
    long long d = strtoll(start, &end, 10);
    return end == start ? -1 : d;
#else
    (void)fd;
    return -1;
#endif
}

static inline int fastrnn_cpu_now(void)
{
#if FASTRNN_POOL_AFFINITY
    return sched_getcpu();
#else
    return -1;
#endif
}

/* One cache line per worker: the caller reads and claims them all, each worker spins on its own. */
typedef struct {
    _Alignas(64) _Atomic int v;
    _Atomic int cpu;                  /* where the worker ran at its last stamp (-1: unknown) */
    _Atomic long long stamp;
    int stats_fd;                     /* the worker's /proc/thread-self/schedstat, or -1 */
    char pad[44];
} fastrnn_pool_slot;
_Static_assert(sizeof(fastrnn_pool_slot) == 64, "one cache line per worker slot");

typedef struct {
    fastrnn_pool_slot state[FASTRNN_POOL_MAX];
    _Atomic unsigned wake_seq;        /* bumped by every fastrnn_pool_enter */
    _Atomic int sleepers;             /* workers blocked on cv */
    _Atomic int wanted;               /* workers the current call can use: 0 .. wanted - 1 */
    _Atomic int owner;                /* 1 while a caller owns the pool */
    _Atomic int finished;             /* workers done with the current team's shares */
    int nworkers;                     /* created so far (changed only by the owner) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* the team being run (written by the owner before RUN is published) */
    fastrnn_share_fn fn;
    void *ctx;
    int nthr;
    /* the team's barrier */
    char pad1[64];
    _Atomic int bar_count;
    char pad2[60];
    _Atomic unsigned bar_gen;
    /* counters, for tests and docs: teams run, refused tries, shares run by workers */
    _Atomic long n_teams, n_refused, n_worker_shares, n_loops;
    int hold;                         /* test hook: workers ignore wakes while set */
    _Atomic int refuse;               /* test hook: refuse this many more tries */
    _Atomic int any_stamp;            /* test hook: claim READY workers, fresh or not */
    _Atomic int caller_cpu;           /* the last owner's CPU when it last looked (-1: none yet) */
    _Atomic long n_moved;             /* times a ready worker moved off the caller's CPU */
    _Atomic int pretend_colocated;    /* test hook: the next look finds a worker on the caller's CPU */
    _Atomic long long openmp_until;   /* OpenMP workers may spin until then (clock ns) */
    _Atomic long long openmp_window;  /* how long they may */
    _Atomic long long openmp_window_default;  /* what the test hook restores */
    _Atomic int stalled;              /* a thread of the current team waited too long */
    _Atomic int may_stop;             /* the current team stops at a stalled step barrier */
    _Atomic int bar_stop;             /* the last barrier's decision: stop after it */
    _Atomic int pretend_stall;        /* test hook: the next team stalls at barrier k */
    _Atomic int stall_countdown;      /* the current team's: barriers until it stalls */
    _Atomic int hook_stalls_only;     /* test hook: only pretend_stall marks a team stalled */
    _Atomic long long contended_until;    /* calls run alone until then (clock ns) */
    _Atomic long long backoff;        /* the next back-off window (ns) */
    _Atomic long n_stalls, n_stops;   /* teams that stalled; teams stopped part-way */
    _Atomic long n_busy;              /* times a worker found another thread on its CPU */
    _Atomic long long busy_until;     /* ... calls run alone until then (clock ns) */
    _Atomic long long last_busy;      /* when one last did (clock ns; 0: never) */
    _Atomic int busy_worker;          /* which */
    _Atomic int watch_off;            /* test hook: workers do not look at their run queue */
} fastrnn_pool_t;

static fastrnn_pool_t fastrnn_pool = { .mu = PTHREAD_MUTEX_INITIALIZER,
                                       .cv = PTHREAD_COND_INITIALIZER,
                                       .caller_cpu = -1,
                                       .openmp_window = FASTRNN_POOL_OPENMP_SPIN_NS,
                                       .openmp_window_default = FASTRNN_POOL_OPENMP_SPIN_NS,
                                       .backoff = FASTRNN_POOL_BACKOFF_MIN_NS };
static pthread_once_t fastrnn_pool_once = PTHREAD_ONCE_INIT;

static long long fastrnn_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One round of waiting for another thread of the team: a pause, and after the first
 * ~1000 rounds (tens of microseconds) a yield every 64, so that a team whose threads
 * the OS put on one CPU (another process holding the other) takes turns instead of
 * spinning a whole scheduler tick away at every barrier (measured: 4 ms calls of a
 * 0.4 ms LSTM with a test run holding the other vCPU). */
static inline void fastrnn_pool_wait(unsigned spin)
{
    FASTRNN_SPIN_PAUSE();
    if (spin > 1024 && (spin & 63) == 0)
        sched_yield();
}

/* When this thread last left a barrier of its team (or began its share): its work
 * since then is the step's, which a wait must outlast to be a stall. */
static _Thread_local long long fastrnn_pool_left_ns;

/* fastrnn_pool_wait at a step barrier. *since (0 before the first round) keeps the
 * time of the first yielding round; a wait that lasts from there FASTRNN_POOL_STALL_NS
 * and as long as this thread worked before it (since fastrnn_pool_left_ns) marks the
 * team stalled. The clock is read only in the yielding rounds, which a normal step's
 * wait never reaches. */
static inline void fastrnn_pool_wait_teammate(unsigned spin, long long *since)
{
    fastrnn_pool_wait(spin);
    if (spin > 1024 && (spin & 63) == 0) {
        long long now = fastrnn_now_ns();
        if (*since == 0) {
            *since = now;
        } else {
            long long work = *since - fastrnn_pool_left_ns;
            if (now - *since > (work > FASTRNN_POOL_STALL_NS ? work : FASTRNN_POOL_STALL_NS)
                    && !atomic_load_explicit(&fastrnn_pool.hook_stalls_only, memory_order_relaxed))
                atomic_store_explicit(&fastrnn_pool.stalled, 1, memory_order_relaxed);
        }
    }
}

/* *v := max(*v, to), whatever other threads write meanwhile (a window's end). */
static void fastrnn_atomic_raise(_Atomic long long *v, long long to)
{
    long long cur = atomic_load(v);
    while (cur < to && !atomic_compare_exchange_weak(v, &cur, to))
        ;
}

/* Sleep until wake_seq differs from *seen (unless held); then *seen := wake_seq. */
static void fastrnn_pool_sleep(unsigned *seen)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    pthread_mutex_lock(&P->mu);
    atomic_fetch_add(&P->sleepers, 1);
    while (atomic_load(&P->wake_seq) == *seen || P->hold)
        pthread_cond_wait(&P->cv, &P->mu);
    atomic_fetch_sub(&P->sleepers, 1);
    *seen = atomic_load(&P->wake_seq);
    pthread_mutex_unlock(&P->mu);
}

/* The worker's affinity before it narrowed it (read when it narrows; a mask set on the
 * thread since, seen when it next looks, replaces it: that is what it keeps to). */
typedef struct {
#if FASTRNN_POOL_AFFINITY
    cpu_set_t before;
#endif
    int away_from;      /* the CPU it moved off (-1: its affinity is as it found it) */
} fastrnn_pool_affinity;

/* The CPU this worker runs on, published in its slot. If the last caller ran on that
 * CPU too (the last caller, not only a running one: a worker on the caller's CPU runs
 * mostly when the call is over and the caller waits for its next one), or on another
 * one than the worker moved off, it moves off the caller's CPU within its affinity.
 * Returns 1 when it cannot (no other CPU allowed): it is then of no use to a caller
 * on that CPU and should sleep rather than spin beside it. */
static int fastrnn_pool_step_aside(fastrnn_pool_t *P, int w, fastrnn_pool_affinity *a)
{
    int cpu = fastrnn_cpu_now(), stuck = 0;
    int caller = atomic_load_explicit(&P->caller_cpu, memory_order_relaxed);
    if (atomic_exchange_explicit(&P->pretend_colocated, 0, memory_order_relaxed))
        cpu = caller;                                   /* test hook */
#if FASTRNN_POOL_AFFINITY
    if (caller >= 0 && caller < CPU_SETSIZE
            && (cpu == caller || (a->away_from >= 0 && a->away_from != caller))) {
        cpu_set_t mask;
        int ok = 1;
        if (a->away_from >= 0) {        /* a mask set on the thread since it narrowed its
                                         * own is the one it keeps to from now on */
            cpu_set_t expected = a->before;
            CPU_CLR(a->away_from, &expected);
            ok = sched_getaffinity(0, sizeof mask, &mask) == 0;
            if (ok && !CPU_EQUAL(&mask, &expected)) {
                a->before = mask;
                a->away_from = -1;
            }
        } else {
            ok = sched_getaffinity(0, sizeof a->before, &a->before) == 0;
        }
        if (ok && CPU_ISSET(caller, &a->before)) {
            mask = a->before;
            CPU_CLR(caller, &mask);
            if (CPU_COUNT(&mask) > 0 && sched_setaffinity(0, sizeof mask, &mask) == 0) {
                a->away_from = caller;
                atomic_fetch_add_explicit(&P->n_moved, 1, memory_order_relaxed);
                cpu = fastrnn_cpu_now();
            } else {
                stuck = cpu == caller;
            }
        } else if (ok && a->away_from >= 0) {   /* a caller outside its mask: all of it */
            if (sched_setaffinity(0, sizeof a->before, &a->before) == 0)
                a->away_from = -1;
        }
    }
#else
    (void)a;
#endif
    atomic_store_explicit(&P->state[w].cpu, cpu, memory_order_relaxed);
    return stuck;
}

/* Worker w's look at its time in the run queue since its last look (*queued; -1:
 * none yet), `elapsed` ns ago: if it grew by more than FASTRNN_POOL_QUEUED_NS and an
 * eighth of that time (a long share sees the odd kernel thread), another thread held
 * this CPU, and calls run alone for FASTRNN_POOL_BUSY_NS from now; if not, and w made
 * the last such find over FASTRNN_POOL_GONE_NS ago, that thread has gone: the window
 * ends. */
static void fastrnn_pool_watch(fastrnn_pool_t *P, int w, int fd, long long *queued,
                               long long elapsed)
{
    long long d = fastrnn_run_delay_ns(fd);
    if (d < 0)
        return;
    if (atomic_load_explicit(&P->watch_off, memory_order_relaxed)) {
        *queued = d;       /* so that the first look once watching again starts afresh */
        return;
    }
    if (*queued >= 0 && d - *queued > FASTRNN_POOL_QUEUED_NS && d - *queued > elapsed / 8) {
        long long now = fastrnn_now_ns();
        atomic_store(&P->last_busy, now);
        atomic_store(&P->busy_worker, w);
        fastrnn_atomic_raise(&P->busy_until, now + FASTRNN_POOL_BUSY_NS);
        atomic_fetch_add(&P->n_busy, 1);
    } else if (*queued >= 0 && atomic_load(&P->busy_worker) == w) {
        /* nobody found: has the thread found last gone? (only its finder can tell) A
         * find by another worker meanwhile changes last_busy (then nothing is cleared)
         * or busy_until (then the window stays), each checked by its CAS. */
        long long seen = atomic_load(&P->busy_until);
        long long last = atomic_load(&P->last_busy);
        if (last > 0 && fastrnn_now_ns() - last > FASTRNN_POOL_GONE_NS
                && atomic_compare_exchange_strong(&P->last_busy, &last, 0))
            atomic_compare_exchange_strong(&P->busy_until, &seen, 0);
    }
    *queued = d;
}

static void *fastrnn_pool_worker(void *arg)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    int w = (int)(long)arg;
    _Atomic int *st = &P->state[w].v;
    /* made for the call that is entering: its wake (the bump of wake_seq after the
     * workers are made) may come before this thread runs, so it starts awake rather
     * than wait for the next call's (the first call on 2 threads ran alone: LSTM
     * I=H=1024 B=1 T=100 eval, 2-core Xeon, 127-134 ms against 29 steady) */
    unsigned seen = atomic_load(&P->wake_seq) - 1u;
    fastrnn_pool_affinity aff;
    int stats_fd = fastrnn_sched_stats_open();          /* this thread's, for its life */
    long long queued, share_start;
    P->state[w].stats_fd = stats_fd;                    /* a forked child closes it */
    aff.away_from = -1;
    for (;;) {
        /* it sleeps still kept off the last caller's CPU: woken there, it waited for
         * that busy CPU before it could move (1.6-6 ms against 50-80 us woken on the
         * other CPU, 2-core Xeon guest, a C loop of wakes 50 ms apart) */
        fastrnn_pool_sleep(&seen);
        if (w >= atomic_load(&P->wanted))
            continue;                   /* the call cannot use this worker: sleep again */
        if (fastrnn_pool_step_aside(P, w, &aff))
            continue;                                   /* on the caller's CPU, no other: sleep */
        queued = fastrnn_run_delay_ns(stats_fd);        /* the wake's own wait not counted */
        sched_yield();                                  /* is another thread waiting here? */
        fastrnn_pool_watch(P, w, stats_fd, &queued, 0);
        long long now = fastrnn_now_ns(), deadline = now + FASTRNN_POOL_READY_NS;
        atomic_store(&P->state[w].stamp, now);
        atomic_store(st, FASTRNN_W_READY);
        for (unsigned spin = 1;; ++spin) {
            int s = atomic_load_explicit(st, memory_order_acquire);
            if (s == FASTRNN_W_RUN) {                   /* the caller published the team */
                share_start = fastrnn_now_ns();             /* (queued: the last look's) */
                fastrnn_pool_left_ns = share_start;
                P->fn(P->ctx, w + 1, P->nthr);
                atomic_store(&P->state[w].stamp, fastrnn_now_ns());
                atomic_store(st, FASTRNN_W_READY);      /* before `finished`: once the caller
                                                 * sees every share finished, this worker
                                                 * is claimable again for the next team */
                atomic_fetch_add(&P->n_worker_shares, 1);
                atomic_fetch_add(&P->finished, 1);
                fastrnn_pool_watch(P, w, stats_fd, &queued, fastrnn_now_ns() - share_start);
                deadline = fastrnn_now_ns() + FASTRNN_POOL_READY_NS;
                continue;
            }
            if (s == FASTRNN_W_CLAIMED) {               /* RUN or READY follows at once */
                FASTRNN_SPIN_PAUSE();
                continue;
            }
            if (atomic_load_explicit(&P->wake_seq, memory_order_relaxed) != seen) {
                seen = atomic_load(&P->wake_seq);       /* a new call: wait for it afresh */
                deadline = fastrnn_now_ns() + FASTRNN_POOL_READY_NS;
                if (w >= atomic_load(&P->wanted)) {     /* ... unless it cannot use us */
                    int ready = FASTRNN_W_READY;
                    if (atomic_compare_exchange_strong(st, &ready, FASTRNN_W_IDLE))
                        break;
                    continue;                           /* claimed meanwhile: RUN follows */
                }
            }
            FASTRNN_SPIN_PAUSE();
            if ((spin & 63) != 0)
                continue;
            sched_yield();              /* anyone else runnable on this CPU goes first */
            fastrnn_pool_watch(P, w, stats_fd, &queued, 0);
            int stuck = fastrnn_pool_step_aside(P, w, &aff);
            now = fastrnn_now_ns();
            atomic_store_explicit(&P->state[w].stamp, now, memory_order_relaxed);
            if (atomic_load_explicit(&P->owner, memory_order_relaxed) && !stuck
                    && w < atomic_load_explicit(&P->wanted, memory_order_relaxed))
                deadline = now + FASTRNN_POOL_READY_NS;     /* a call may want us */
            else if (now > deadline || stuck) {
                int ready = FASTRNN_W_READY;
                if (atomic_compare_exchange_strong(st, &ready, FASTRNN_W_IDLE))
                    break;                              /* nobody claimed us: sleep */
            }
        }
    }
    return NULL;
}

static void fastrnn_pool_after_fork_child(void)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    pthread_mutex_init(&P->mu, NULL);
    pthread_cond_init(&P->cv, NULL);
    for (int w = 0; w < FASTRNN_POOL_MAX; ++w) {
        atomic_store(&P->state[w].v, FASTRNN_W_IDLE);
#if FASTRNN_POOL_AFFINITY
        if (w < P->nworkers && P->state[w].stats_fd >= 0)
            close(P->state[w].stats_fd);                /* the parent's thread's file */
#endif
        P->state[w].stats_fd = -1;
    }
    atomic_store(&P->sleepers, 0);
    atomic_store(&P->owner, 0);
    atomic_store(&P->finished, 0);
    atomic_store(&P->caller_cpu, -1);
    atomic_store(&P->contended_until, 0);      /* the parent's workers stalled, not ours */
    atomic_store(&P->busy_until, 0);
    atomic_store(&P->last_busy, 0);
    P->nworkers = 0;                                    /* the parent's threads are not here */
}

static void fastrnn_pool_init_once(void)
{
    pthread_atfork(NULL, NULL, fastrnn_pool_after_fork_child);
}

/* Own the pool for one call that may use up to n threads, make sure n - 1 workers
 * exist and wake them, and only them (without waiting). Returns 0 when another call
 * owns the pool, or when n - 1 workers cannot be made (this call then runs alone and
 * must not call fastrnn_pool_leave). */
static int fastrnn_pool_enter(int n)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    int free_ = 0;
    pthread_once(&fastrnn_pool_once, fastrnn_pool_init_once);
    if (!atomic_compare_exchange_strong(&P->owner, &free_, 1))
        return 0;
    if (n - 1 > FASTRNN_POOL_MAX)
        n = FASTRNN_POOL_MAX + 1;
    while (P->nworkers < n - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* no file yet: a fork before the worker opens its own must not make the
         * child close fd 0 (the slots start zeroed) */
        P->state[P->nworkers].stats_fd = -1;
        int err = pthread_create(&th, &attr, fastrnn_pool_worker, (void *)(long)P->nworkers);
        pthread_attr_destroy(&attr);
        if (err != 0)
            break;
        P->nworkers++;
    }
    if (P->nworkers < n - 1) {   /* no team of n can form (the threads limit): run alone,
                                  * not in segments asking for it forever (a review) */
        atomic_store(&P->owner, 0);
        return 0;
    }
    atomic_store(&P->caller_cpu, fastrnn_cpu_now());   /* before the wake: workers read it */
    /* the workers this call cannot use go back to sleep as soon as they wake (a call on
     * fewer threads than workers exist, after set_num_threads was lowered or a row
     * split of few rows, had every one spin through it for nothing: more CPU taken,
     * more "busy" finds; a review's count) */
    atomic_store(&P->wanted, n - 1);
    atomic_fetch_add(&P->wake_seq, 1);
    if (atomic_load(&P->sleepers) > 0) {                /* seq_cst with the sleeper's count */
        pthread_mutex_lock(&P->mu);
        pthread_cond_broadcast(&P->cv);
        pthread_mutex_unlock(&P->mu);
    }
    return 1;
}

static void fastrnn_pool_leave(void)
{
    atomic_store(&fastrnn_pool.owner, 0);
}

/* May the caller, on CPU `caller`, claim worker w now: its stamp fresh (it is running)
 * and its CPU not the caller's? (The test hook any_stamp claims it whatever.) */
static inline int fastrnn_pool_claimable(fastrnn_pool_t *P, int w, long long now, int caller)
{
    if (atomic_load(&P->any_stamp))
        return 1;
    if (now - atomic_load_explicit(&P->state[w].stamp, memory_order_relaxed) > FASTRNN_POOL_FRESH_NS)
        return 0;
    int cpu = atomic_load_explicit(&P->state[w].cpu, memory_order_relaxed);
    return caller < 0 || cpu < 0 || cpu != caller;
}

/* The owner's CPU now, published for the workers (fastrnn_pool_step_aside). */
static inline int fastrnn_pool_caller_cpu(fastrnn_pool_t *P)
{
    int cpu = fastrnn_cpu_now();
    atomic_store_explicit(&P->caller_cpu, cpu, memory_order_relaxed);
    return cpu;
}

/* Are n - 1 workers ready and running now? (A hint: one may still time out before a claim.) */
static int fastrnn_pool_ready(int n)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    if (n < 2 || n - 1 > P->nworkers)
        return 0;
    if (atomic_load(&P->refuse) > 0)
        return 1;                                       /* try_run refuses (and counts) */
    long long now = fastrnn_now_ns();
    int caller = fastrnn_pool_caller_cpu(P);
    for (int w = 0; w < n - 1; ++w)
        if (atomic_load_explicit(&P->state[w].v, memory_order_relaxed) != FASTRNN_W_READY
                || !fastrnn_pool_claimable(P, w, now, caller))
            return 0;
    return 1;
}

/* After a team: a stall starts the back-off window (and doubles the next one), a
 * team without one sets the window back to the least. */
static void fastrnn_pool_after_team(fastrnn_pool_t *P)
{
    long long b = atomic_load(&P->backoff);
    if (atomic_load(&P->stalled)) {
        atomic_fetch_add(&P->n_stalls, 1);
        fastrnn_atomic_raise(&P->contended_until, fastrnn_now_ns() + b);
        atomic_store(&P->backoff, 2 * b < FASTRNN_POOL_BACKOFF_MAX_NS ? 2 * b
                                                                     : FASTRNN_POOL_BACKOFF_MAX_NS);
    } else if (b != FASTRNN_POOL_BACKOFF_MIN_NS) {
        atomic_store(&P->backoff, FASTRNN_POOL_BACKOFF_MIN_NS);
    }
}

/* Did a recent team stall, or a worker find another thread on its CPU (calls should
 * run alone until the back-off window ends)? */
static int fastrnn_pool_contended(void)
{
    long long now = fastrnn_now_ns();
    return now < atomic_load_explicit(&fastrnn_pool.contended_until, memory_order_relaxed)
        || now < atomic_load_explicit(&fastrnn_pool.busy_until, memory_order_relaxed);
}

/* Asked while fastrnn_pool_contended(): do calls run alone only because a worker found
 * another thread on its CPU, a window that ends as soon as that thread is seen gone,
 * and no stall's window holds? */
static int fastrnn_pool_busy_only(void)
{
    return fastrnn_now_ns() >= atomic_load_explicit(&fastrnn_pool.contended_until,
                                                    memory_order_relaxed);
}

/* Run fn(ctx, tid, n) on n threads, the caller as tid 0, if n - 1 workers are ready
 * and running (fresh stamps);
 * return 1 when it ran (every share finished), 0 when it did not run at all.
 * may_stop: fn's threads stop together at a step barrier once the team has stalled
 * (fastrnn_pool_barrier returns 1; fn must then leave a state the caller can go on
 * from alone). The caller must own the pool (fastrnn_pool_enter). */
static int fastrnn_pool_try_run(int n, fastrnn_share_fn fn, void *ctx, int may_stop)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    int w, claimed = 0;
    if (n < 2 || n - 1 > P->nworkers)
        return 0;
    if (atomic_load(&P->refuse) > 0) {                  /* test hook: as if not awake */
        atomic_fetch_sub(&P->refuse, 1);
        atomic_fetch_add(&P->n_refused, 1);
        return 0;
    }
    long long now = fastrnn_now_ns();
    int caller = fastrnn_pool_caller_cpu(P);
    for (w = 0; w < n - 1; ++w) {
        int ready = FASTRNN_W_READY;
        if (!fastrnn_pool_claimable(P, w, now, caller))
            break;                                      /* not running now, or on our CPU */
        if (!atomic_compare_exchange_strong(&P->state[w].v, &ready, FASTRNN_W_CLAIMED))
            break;
        ++claimed;
    }
    if (claimed < n - 1) {                              /* not all awake: give them back */
        for (w = 0; w < claimed; ++w)
            atomic_store(&P->state[w].v, FASTRNN_W_READY);
        atomic_fetch_add(&P->n_refused, 1);
        return 0;
    }
    P->fn = fn;
    P->ctx = ctx;
    P->nthr = n;
    atomic_store(&P->bar_count, 0);
    /* (written only when they change: the workers read these lines at every barrier) */
    if (atomic_load_explicit(&P->bar_stop, memory_order_relaxed))
        atomic_store(&P->bar_stop, 0);
    if (atomic_load_explicit(&P->may_stop, memory_order_relaxed) != may_stop)
        atomic_store(&P->may_stop, may_stop);
    if (atomic_load_explicit(&P->stalled, memory_order_relaxed))
        atomic_store(&P->stalled, 0);
    if (atomic_load_explicit(&P->pretend_stall, memory_order_relaxed))
        atomic_store(&P->stall_countdown, atomic_exchange(&P->pretend_stall, 0));
    atomic_store(&P->finished, 0);
    for (w = 0; w < n - 1; ++w)                         /* release: the fields above first */
        atomic_store_explicit(&P->state[w].v, FASTRNN_W_RUN, memory_order_release);
    fastrnn_pool_left_ns = fastrnn_now_ns();
    fn(ctx, 0, n);
    /* the end: a worker's last share may be long (work, not a stall) */
    for (unsigned spin = 1; atomic_load_explicit(&P->finished, memory_order_acquire) < n - 1; ++spin)
        fastrnn_pool_wait(spin);
    if (atomic_load_explicit(&P->stall_countdown, memory_order_relaxed)
            && atomic_exchange(&P->stall_countdown, 0) == 1)   /* test hook: the end is its last meeting */
        atomic_store(&P->stalled, 1);
    atomic_fetch_add(&P->n_teams, 1);
    fastrnn_pool_after_team(P);
    return 1;
}

/* A loop of independent chunks on the pool: chunks are claimed one at a time, so
 * the caller never waits for a worker, and a worker that is running helps. */
typedef void (*fastrnn_chunk_fn)(void *ctx, long chunk);
typedef struct { fastrnn_chunk_fn fn; void *ctx; long nchunks; _Atomic long next; } fastrnn_pool_loop;

static void fastrnn_pool_loop_share(void *ctx, int tid, int nthr)
{
    fastrnn_pool_loop *L = (fastrnn_pool_loop *)ctx;
    long c;
    (void)tid; (void)nthr;
    while ((c = atomic_fetch_add(&L->next, 1)) < L->nchunks)
        L->fn(L->ctx, c);
}

/* Worker w, if it is ready and running now (not on the caller's CPU), starts the
 * published loop; 1 if it did. */
static int fastrnn_pool_join_loop(int w, long long now, int caller)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    int ready = FASTRNN_W_READY;
    if (!fastrnn_pool_claimable(P, w, now, caller))
        return 0;
    return atomic_compare_exchange_strong_explicit(&P->state[w].v, &ready, FASTRNN_W_RUN,
                                                   memory_order_acq_rel, memory_order_relaxed);
}

/* fn(ctx, c) once for every c in [0, nchunks), on the caller and on up to n - 1
 * workers: those ready and running when the loop starts, and any that becomes so
 * while the caller is still taking chunks (a worker woken by this call's
 * fastrnn_pool_enter joins part-way, as it joins the steps between segments). The
 * caller must own the pool. Which thread runs a chunk must not change its result. */
static void fastrnn_pool_for(int n, long nchunks, fastrnn_chunk_fn fn, void *ctx)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    fastrnn_pool_loop L;
    long c;
    int joined = 0, want = n - 1 < P->nworkers ? n - 1 : P->nworkers;
    if (fastrnn_pool_contended())
        want = 0;                           /* a recent team stalled: alone */
    L.fn = fn;
    L.ctx = ctx;
    L.nchunks = nchunks;
    atomic_init(&L.next, 0);
    if (nchunks < 2 || want < 1) {          /* alone: callers with n = 1 need not own the pool */
        fastrnn_pool_loop_share(&L, 0, 1);
        return;
    }
    P->fn = fastrnn_pool_loop_share;        /* a worker sees these through its RUN (release) */
    P->ctx = &L;
    P->nthr = want + 1;
    atomic_store(&P->finished, 0);
    while ((c = atomic_fetch_add(&L.next, 1)) < nchunks) {
        if (joined < want) {
            long long now = fastrnn_now_ns();
            int caller = fastrnn_pool_caller_cpu(P);
            while (joined < want && fastrnn_pool_join_loop(joined, now, caller))
                ++joined;                   /* workers join in order: 0, 1, ... */
        }
        fn(ctx, c);
    }
    for (unsigned spin = 1; atomic_load_explicit(&P->finished, memory_order_acquire) < joined; ++spin)
        fastrnn_pool_wait(spin);
    if (joined > 0)
        atomic_fetch_add(&P->n_loops, 1);
}

/* Every thread of the running team calls this the same number of times. Returns 1
 * when the team is to stop after it: it may stop and has stalled. The last thread to
 * arrive decides, before it lets the others go, so all get the same answer (the next
 * barrier cannot overwrite it before every thread has read it: it waits for them). */
static int fastrnn_pool_barrier(void)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    unsigned gen = atomic_load_explicit(&P->bar_gen, memory_order_acquire);
    int stop;
    if (atomic_fetch_add(&P->bar_count, 1) == P->nthr - 1) {
        int k = atomic_load_explicit(&P->stall_countdown, memory_order_relaxed);
        if (k > 0) {                                    /* test hook (only here: serialised) */
            atomic_store_explicit(&P->stall_countdown, k - 1, memory_order_relaxed);
            if (k == 1)
                atomic_store_explicit(&P->stalled, 1, memory_order_relaxed);
        }
        stop = atomic_load_explicit(&P->may_stop, memory_order_relaxed)
               && atomic_load_explicit(&P->stalled, memory_order_relaxed);
        atomic_store_explicit(&P->bar_stop, stop, memory_order_relaxed);
        if (stop)
            atomic_fetch_add_explicit(&P->n_stops, 1, memory_order_relaxed);
        atomic_store_explicit(&P->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&P->bar_gen, 1, memory_order_release);
    } else {
        long long since = 0;
        for (unsigned spin = 1; atomic_load_explicit(&P->bar_gen, memory_order_acquire) == gen; ++spin)
            fastrnn_pool_wait_teammate(spin, &since);
        stop = atomic_load_explicit(&P->bar_stop, memory_order_relaxed);
    }
    fastrnn_pool_left_ns = fastrnn_now_ns();
    return stop;
}

/* Test hooks: stats (teams, refused tries, worker shares, workers, loops, moves off
 * the caller's CPU, teams that stalled, teams stopped part-way, times a worker found
 * another thread on its CPU); refuse(k, a):
 * the next k tries are refused as if the workers were not awake, and with a = 1 a READY
 * worker is claimed even if its stamp is stale (so that a test's team forms however
 * the host schedules the worker: the team then waits for it, slower but the same);
 * hold = 1 keeps workers asleep (a wake is ignored until hold = 0), as a long-idle
 * worker would be. */
static void fastrnn_pool_stats(long *out)
{
    out[0] = atomic_load(&fastrnn_pool.n_teams);
    out[1] = atomic_load(&fastrnn_pool.n_refused);
    out[2] = atomic_load(&fastrnn_pool.n_worker_shares);
    out[3] = fastrnn_pool.nworkers;
    out[4] = atomic_load(&fastrnn_pool.n_loops);
    out[5] = atomic_load(&fastrnn_pool.n_moved);
    out[6] = atomic_load(&fastrnn_pool.n_stalls);
    out[7] = atomic_load(&fastrnn_pool.n_stops);
    out[8] = atomic_load(&fastrnn_pool.n_busy);
}

/* Test hooks: pretend_stall(k), k >= 1: the next team is marked stalled as its k-th
 * barrier completes, as if a thread had waited too long there (a team that may stop
 * then stops at that barrier; the fast path's unit split meets once before its first
 * step and once after every step), or at its end if that is its k-th meeting (a row
 * split team's first: it has no barrier); until pretend_stall(0), real long waits do
 * not mark a team stalled (a slow host's would add a stop the test did not place);
 * clear_backoff(ns) ends the back-off window and
 * makes the next one ns long (ns <= 0: the least). */
static void fastrnn_pool_pretend_stall(int k)
{
    atomic_store(&fastrnn_pool.pretend_stall, k > 0 ? k : 0);
    atomic_store(&fastrnn_pool.hook_stalls_only, k > 0);
}

/* Test hook: on = 0, workers stop looking at their run-queue time (so that a test's
 * team forms whatever else the machine runs); on = 1 (the default) again. */
static void fastrnn_pool_watch_on(int on)
{
    atomic_store(&fastrnn_pool.watch_off, !on);
}

/* Test hook: as if worker 0 had just found another thread on its CPU, with a window of
 * ns (not FASTRNN_POOL_BUSY_NS). */
static void fastrnn_pool_pretend_busy(long long ns)
{
    long long now = fastrnn_now_ns();
    atomic_store(&fastrnn_pool.last_busy, now);
    atomic_store(&fastrnn_pool.busy_worker, 0);
    atomic_store(&fastrnn_pool.busy_until, now + ns);
}

/* Test hook: end the back-off windows (a stall's and a worker's find) and set the next
 * stall's window to next_ns (<= 0: the least). */
static void fastrnn_pool_clear_backoff(long long next_ns)
{
    atomic_store(&fastrnn_pool.contended_until, 0);
    atomic_store(&fastrnn_pool.busy_until, 0);
    atomic_store(&fastrnn_pool.last_busy, 0);
    atomic_store(&fastrnn_pool.backoff, next_ns > 0 ? next_ns : FASTRNN_POOL_BACKOFF_MIN_NS);
}

/* Test hook: on = 1, the next time a worker looks where it runs, it finds itself on the
 * last caller's CPU (and moves off it as it would); on = 0 takes that back. */
static void fastrnn_pool_pretend_colocated(int on)
{
    atomic_store(&fastrnn_pool.pretend_colocated, on);
}

static void fastrnn_pool_refuse(int k, int any_stamp)
{
    atomic_store(&fastrnn_pool.refuse, k);
    atomic_store(&fastrnn_pool.any_stamp, any_stamp);
}

/* An OpenMP team of two or more threads has just ended (its workers now spin). */
static void fastrnn_pool_note_openmp(void)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    atomic_store_explicit(&P->openmp_until,
                          fastrnn_now_ns() + atomic_load_explicit(&P->openmp_window,
                                                                  memory_order_relaxed),
                          memory_order_relaxed);
}

/* May OpenMP workers still be spinning (within the window of the last note)? */
static int fastrnn_pool_openmp_spinning(void)
{
    return fastrnn_now_ns() < atomic_load_explicit(&fastrnn_pool.openmp_until,
                                                   memory_order_relaxed);
}

/* The window after an OpenMP team, in ns (negative: the default); it also ends the
 * current one. make_default: what a negative ns restores from now on. */
static void fastrnn_pool_set_openmp_window(long long ns, int make_default)
{
    if (ns >= 0 && make_default)
        atomic_store(&fastrnn_pool.openmp_window_default, ns);
    atomic_store(&fastrnn_pool.openmp_window,
                 ns < 0 ? atomic_load(&fastrnn_pool.openmp_window_default) : ns);
    atomic_store(&fastrnn_pool.openmp_until, 0);
}

static long long fastrnn_pool_openmp_window(void)
{
    return atomic_load(&fastrnn_pool.openmp_window);
}

/* How long one round of a busy-wait loop like libgomp's takes here (a relaxed load and
 * a pause), in ns: the least of three timed runs of 4096 rounds, so that a preemption
 * in one does not count. The pause alone differs several-fold between CPUs. */
static double fastrnn_pause_ns(void)
{
    static _Atomic int flag;
    double best = 1e30;
    for (int run = 0; run < 3; run++) {
        long long t0 = fastrnn_now_ns();
        for (int i = 0; i < 4096; i++) {
            if (atomic_load_explicit(&flag, memory_order_relaxed))
                break;
            FASTRNN_SPIN_PAUSE();
        }
        double ns = (double)(fastrnn_now_ns() - t0) / 4096.0;
        if (ns < best)
            best = ns;
    }
    return best;
}

/* Set the hold; with hold = 1 also wait (up to 1 s) until every worker is asleep. */
static int fastrnn_pool_hold(int hold)
{
    fastrnn_pool_t *P = &fastrnn_pool;
    pthread_mutex_lock(&P->mu);
    P->hold = hold;
    if (!hold)
        pthread_cond_broadcast(&P->cv);
    pthread_mutex_unlock(&P->mu);
    if (!hold)
        return 1;
    long long give_up = fastrnn_now_ns() + 1000000000LL;
    while (atomic_load(&P->sleepers) < P->nworkers) {
        if (fastrnn_now_ns() > give_up)
            return 0;
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    return 1;
}

#endif
