/* scratch.h: large per-call buffers (packed weights) kept between calls.
 *
 * Why: a packed copy of W_ih or W_hh is megabytes, and a fresh malloc of that
 * size is a fresh mmap: the kernel faults in and zeroes every page on first
 * touch. Measured on a 2-core Xeon (AVX-512), LSTM H=1024, batch 1: page
 * clearing and faults took 18 % of a 25-step forward. Buffers released here
 * stay mapped and are handed to the next call that fits.
 *
 * A few slots per extension module (the header is included by each), guarded
 * by a spin lock (held for a handful of instructions, never during a kernel),
 * so calls from several Python threads each get their own buffer. At most
 * FASTRNN_SCRATCH_KEEP bytes are kept idle; a buffer beyond that, or one that
 * finds every slot busy, is an ordinary malloc/free. Contents are not
 * preserved: every user overwrites what it reads.
 */
#ifndef FASTRNN_SCRATCH_H
#define FASTRNN_SCRATCH_H

#include <stdlib.h>
#include "spin_lock.h"
#include <stddef.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef FASTRNN_SCRATCH_SLOTS
#if defined(__SANITIZE_ADDRESS__)
#define FASTRNN_SCRATCH_SLOTS 0   /* under ASan every buffer is a fresh malloc, so overreads show */
#elif defined(FASTRNN_SCRATCH_ARRAYS)
#define FASTRNN_SCRATCH_SLOTS 64  /* _buffers.pyx: every live pooled array holds a slot */
#else
#define FASTRNN_SCRATCH_SLOTS 8
#endif
#endif
#ifndef FASTRNN_SCRATCH_KEEP
#define FASTRNN_SCRATCH_KEEP ((size_t)256 << 20)   /* bytes kept idle, all slots together */
#endif

static struct {
    void *ptr;
    size_t size;
    int busy;
} fastrnn_scratch_slot[FASTRNN_SCRATCH_SLOTS + 1];   /* + 1: never an empty array */

#define FASTRNN_HUGE_PAGE ((size_t)2 << 20)

/* malloc, 64-byte aligned, and a buffer of 1 MB or more is 2 MB-aligned, rounded up to whole
 * 2 MB pages and marked for transparent huge pages (Linux, where THP is
 * "madvise" or "always"). Why: a packed W_hh slice that about fills a core's
 * L2 lands, in 4 KB pages, on whatever cache sets its physical pages happen to
 * map to, so some processes ran a batch-1 LSTM H=256 forward at 0.85 ms and
 * others at 1.5 ms (Zen 4, 1 MB L2); one huge page is physically contiguous.
 * Release with free(). */
static void *fastrnn_big_malloc(size_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= ((size_t)1 << 20)) {
        void *ptr = NULL;
        size_t whole = (bytes + FASTRNN_HUGE_PAGE - 1) / FASTRNN_HUGE_PAGE * FASTRNN_HUGE_PAGE;
        if (posix_memalign(&ptr, FASTRNN_HUGE_PAGE, whole) != 0) return NULL;
        madvise(ptr, whole, MADV_HUGEPAGE);   /* advice only: failure leaves 4 KB pages */
        return ptr;
    }
#endif
    {   /* 64-byte aligned (a cache line, a zmm) like the big ones */
        void *ptr = NULL;
        return posix_memalign(&ptr, 64, bytes) == 0 ? ptr : NULL;
    }
}

FASTRNN_DEFINE_SPIN_LOCK(scratch)   /* fastrnn_scratch_lock / _unlock (spin_lock.h) */

/* Idle bytes held by the slots (call with the lock held). */
static inline size_t fastrnn_scratch_idle_locked(void)
{
    size_t idle = 0;
    for (int i = 0; i < FASTRNN_SCRATCH_SLOTS; ++i)
        if (!fastrnn_scratch_slot[i].busy) idle += fastrnn_scratch_slot[i].size;
    return idle;
}

/* A buffer of at least `bytes` (NULL if out of memory); give it back with
 * fastrnn_scratch_free. */
static void *fastrnn_scratch_alloc(size_t bytes)
{
    int best = -1, spare = -1;
    void *old = NULL, *ptr;
    if (bytes == 0) bytes = 1;
    fastrnn_scratch_lock();
    for (int i = 0; i < FASTRNN_SCRATCH_SLOTS; ++i) {
        if (fastrnn_scratch_slot[i].busy) continue;
        if (fastrnn_scratch_slot[i].size >= bytes) {
            if (best < 0 || fastrnn_scratch_slot[i].size < fastrnn_scratch_slot[best].size) best = i;
        } else if (spare < 0 || fastrnn_scratch_slot[i].size < fastrnn_scratch_slot[spare].size) {
            spare = i;   /* the smallest idle slot, replaced if none fits */
        }
    }
    if (best >= 0) {
        fastrnn_scratch_slot[best].busy = 1;
        ptr = fastrnn_scratch_slot[best].ptr;
        fastrnn_scratch_unlock();
        return ptr;
    }
    if (spare >= 0) {   /* reserve the slot; its old buffer is freed outside the lock */
        old = fastrnn_scratch_slot[spare].ptr;
        fastrnn_scratch_slot[spare].ptr = NULL;
        fastrnn_scratch_slot[spare].size = 0;
        fastrnn_scratch_slot[spare].busy = 1;
    }
    fastrnn_scratch_unlock();
    free(old);
    ptr = fastrnn_big_malloc(bytes);
    if (spare >= 0) {
        fastrnn_scratch_lock();
        if (ptr != NULL) {
            fastrnn_scratch_slot[spare].ptr = ptr;
            fastrnn_scratch_slot[spare].size = bytes;
        } else {
            fastrnn_scratch_slot[spare].busy = 0;
        }
        fastrnn_scratch_unlock();
    }
    return ptr;
}

/* Give back a buffer from fastrnn_scratch_alloc (NULL is ignored). */
static void fastrnn_scratch_free(void *ptr)
{
    int drop = 0;
    if (ptr == NULL) return;
    fastrnn_scratch_lock();
    for (int i = 0; i < FASTRNN_SCRATCH_SLOTS; ++i) {
        if (fastrnn_scratch_slot[i].ptr == ptr && fastrnn_scratch_slot[i].busy) {
            fastrnn_scratch_slot[i].busy = 0;
            if (fastrnn_scratch_idle_locked() > FASTRNN_SCRATCH_KEEP) {   /* over the cap: let it go */
                fastrnn_scratch_slot[i].ptr = NULL;
                fastrnn_scratch_slot[i].size = 0;
                drop = 1;
            }
            fastrnn_scratch_unlock();
            if (drop) free(ptr);
            return;
        }
    }
    fastrnn_scratch_unlock();
    free(ptr);   /* not pooled: every slot was busy when it was made */
}

/* Take a buffer from fastrnn_scratch_alloc out of the pool: the caller now owns
 * it and frees it with free() (pack_cache.h keeps packed weights this way).
 * Returns its size in bytes (at least what was asked), or 0 if it was not pooled. */
static size_t fastrnn_scratch_detach(void *ptr)
{
    size_t size = 0;
    fastrnn_scratch_lock();
    for (int i = 0; i < FASTRNN_SCRATCH_SLOTS; ++i)
        if (fastrnn_scratch_slot[i].ptr == ptr && fastrnn_scratch_slot[i].busy) {
            size = fastrnn_scratch_slot[i].size;
            fastrnn_scratch_slot[i].ptr = NULL;
            fastrnn_scratch_slot[i].size = 0;
            fastrnn_scratch_slot[i].busy = 0;
            break;
        }
    fastrnn_scratch_unlock();
    return size;
}

/* Free every idle buffer (fastrnn.release_memory()). */
static void fastrnn_scratch_release(void)
{
    void *idle[FASTRNN_SCRATCH_SLOTS + 1];
    int n = 0;
    fastrnn_scratch_lock();
    for (int i = 0; i < FASTRNN_SCRATCH_SLOTS; ++i) {
        if (!fastrnn_scratch_slot[i].busy && fastrnn_scratch_slot[i].ptr != NULL) {
            idle[n++] = fastrnn_scratch_slot[i].ptr;
            fastrnn_scratch_slot[i].ptr = NULL;
            fastrnn_scratch_slot[i].size = 0;
        }
    }
    fastrnn_scratch_unlock();
    for (int i = 0; i < n; ++i) free(idle[i]);
}

#endif
