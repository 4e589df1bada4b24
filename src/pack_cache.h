/* pack_cache.h: packed weights kept between eval calls (and a training call's single
 * step: fastrnn/functional.py keeps_step_packs), keyed by the weights' contents.
 *
 * Why: an eval call packs W_ih and W_hh into per-thread panels before its time
 * loop. At small batch that copy is a large share of the call (LSTM I=H=512,
 * batch 2, T=50 on the Zen 4: 12.5 %), and ONNX Runtime packs once per session.
 * fastrnn cannot see a user's in-place writes to a weight array, so instead of
 * trusting the caller it reads the weights once per call and hashes them
 * (fastrnn_digest_chunk: one vector multiply per 32 or 64 bytes, several times
 * faster than packing, which reads, transposes and writes). Same layout and same digest:
 * the packed copy made earlier is used as it is.
 *
 * The digest: 64 independent 64-bit lanes, each step a bijection of the lane
 * for a fixed word and of the word for a fixed lane (fastrnn_digest_mix), so a
 * change to any single word (any one weight) always changes the result; several
 * changes would have to cancel exactly to go unseen, and each step spreads a
 * difference over many bits in a way that depends on the lane's value, so no
 * fixed pattern of edits cancels; the lanes start from a key drawn per process
 * (fastrnn_digest_key), so an edit cannot be worked out outside the process to
 * cancel (a cache key, not a MAC: the hash is not a cryptographic one). Weights are
 * hashed in chunks of FASTRNN_DIGEST_CHUNK bytes (threads take chunks) and the
 * chunk digests combined in order: the result does not depend on the threads.
 *
 * A few entries per extension module (the header is included by each), guarded
 * by a spin lock held for a few instructions. An entry in use by a call is never
 * evicted; a call that finds its key busy or the table full packs into an
 * ordinary scratch buffer. At most FASTRNN_PACK_CACHE_KEEP bytes are kept.
 */
#ifndef FASTRNN_PACK_CACHE_H
#define FASTRNN_PACK_CACHE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "isa.h"
#include "spin_lock.h"

/* Slots: two per layer direction (W_ih, W_hh). Frozen weights at inference are read
 * packed by every call, single steps too (fastrnn/functional.py pack_flags), so a
 * process serving several frozen models must not evict one model's packings to run
 * another's: 64 slots keep 32 directions (the 256 MB cap below then binds first for
 * large ones). A lookup scans them under the lock: a pointer and a digest compare
 * each. */
#ifndef FASTRNN_PACK_CACHE_SLOTS
#define FASTRNN_PACK_CACHE_SLOTS 64
#endif
#ifndef FASTRNN_PACK_CACHE_KEEP
#define FASTRNN_PACK_CACHE_KEEP ((size_t)256 << 20)   /* bytes of packed copies kept, in all */
#endif
#define FASTRNN_DIGEST_CHUNK ((size_t)1 << 18)        /* bytes per independently hashed chunk */
#define FASTRNN_DIGEST_LANES 64                       /* independent chains (fastrnn_digest_chunk) */
#define FASTRNN_DIGEST_BLOCK (8 * FASTRNN_DIGEST_LANES) /* bytes: one word per lane */

/* Bytes of weights this module's eval calls hashed to find their packings (tests:
 * frozen weights come with their digests and add nothing). */
static size_t fastrnn_digested_bytes = 0;
static inline void fastrnn_count_digested(size_t n)
{
    __atomic_fetch_add(&fastrnn_digested_bytes, n, __ATOMIC_RELAXED);
}
static inline size_t fastrnn_digested(void)
{
    return __atomic_load_n(&fastrnn_digested_bytes, __ATOMIC_RELAXED);
}

#define FASTRNN_DIGEST_K 0xD6E8FEB8ULL       /* even 32-bit constant: see fastrnn_digest_mix */
#define FASTRNN_DIGEST_LANE0 0x13198A2E03707344ULL

/* The lanes start from a key drawn once per process. Unkeyed, the next word of a
 * lane could be chosen to cancel an edit (h ^ word is all the step reads): a
 * crafted model loaded beside another could then find the other's packed weights
 * under its own digest (an audit built one in about 1,000 tries). With the lanes'
 * values unknown outside the process, an edit cannot be worked out to cancel.
 * Digests are compared only within a process (the cache is per process), where
 * the key is fixed; a fork child keeps its parent's. */
static uint64_t fastrnn_digest_key_value;
static pthread_once_t fastrnn_digest_key_once = PTHREAD_ONCE_INIT;

static void fastrnn_digest_key_draw(void)
{
    uint64_t k = 0;
    FILE *f = fopen("/dev/urandom", "rb");
    if (f != NULL) {
        if (fread(&k, sizeof k, 1, f) != 1)
            k = 0;
        fclose(f);
    }
    if (k == 0) {       /* no /dev/urandom: the clock, the pid and an address */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        k = ((uint64_t)ts.tv_nsec << 32) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 20)
            ^ (uint64_t)(uintptr_t)&ts;
    }
    fastrnn_digest_key_value = k;
}

static inline uint64_t fastrnn_digest_key(void)
{
    pthread_once(&fastrnn_digest_key_once, fastrnn_digest_key_draw);
    return fastrnn_digest_key_value;
}

/* lane[] := the lanes' starting values, every coding's (keyed). */
static inline void fastrnn_digest_lanes_start(uint64_t *lane)
{
    const uint64_t key = fastrnn_digest_key();
    for (int l = 0; l < FASTRNN_DIGEST_LANES; ++l) lane[l] = (FASTRNN_DIGEST_LANE0 + (uint64_t)l) ^ key;
}

static inline uint64_t fastrnn_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

/* One step of a lane: y = h ^ word; y ^= y >> 32; y += lo32(y) * K; rotate. A
 * bijection of h for a fixed word and of the word for a fixed h: the xorshift
 * undoes itself, the low 32 bits of the sum are lo32(y) * (1 + K), and 1 + K is
 * odd, so lo32(y) and then y come back. One 32x32->64 multiply: a single
 * vpmuludq per vector in AVX2 and AVX-512 alike. The xorshift lets the high half
 * reach the multiply: without it a difference in bit 63 alone went through a
 * step as that one bit, whatever the lane held, and the lane's next word could
 * cancel it (a weight's sign flipped and one bit of the word 256 bytes later:
 * the same digest, stale packed weights; found by an audit, tested). */
static inline uint64_t fastrnn_digest_mix(uint64_t h, uint64_t word)
{
    uint64_t y = h ^ word;
    y ^= y >> 32;
    y += (uint64_t)(uint32_t)y * FASTRNN_DIGEST_K;
    return fastrnn_rotl64(y, 29);
}

/* Lanes, words, tail and the final mix: what every coding shares once the whole
 * FASTRNN_DIGEST_BLOCK-byte blocks are done (lane[] as they left them, continuing
 * at byte i). */
static inline uint64_t fastrnn_digest_finish(const unsigned char *b, size_t n, size_t i,
                                             uint64_t *lane)
{
    uint64_t h = 0x243F6A8885A308D3ULL ^ (uint64_t)n;
    for (int q = 0; i + 64 <= n; i += 64, ++q)   /* whole 64-byte blocks left: q < 8 */
        for (int l = 0; l < 8; ++l) {
            uint64_t w;
            memcpy(&w, b + i + 8 * l, 8);
            lane[8 * q + l] = fastrnn_digest_mix(lane[8 * q + l], w);
        }
    for (int l = 0; i + 8 <= n; i += 8, ++l) {    /* whole words left: one per lane, l < 8 */
        uint64_t w;
        memcpy(&w, b + i, 8);
        lane[l] = fastrnn_digest_mix(lane[l], w);
    }
    if (i < n) {                                  /* the last bytes, zero-padded */
        uint64_t last = 0;
        memcpy(&last, b + i, n - i);
        h = fastrnn_digest_mix(h, last);
    }
    for (int l = 0; l < FASTRNN_DIGEST_LANES; ++l) h = fastrnn_digest_mix(h, lane[l]);
    return h;
}

/* The digest of bytes [0, n) of p (any alignment): 64 lanes, lane l taking the
 * word at byte 8l of every 512-byte block, so that many independent chains (one
 * chain is bound by its step's latency: xor, shift, xor, multiply, add, rotate).
 * Zen 4, one core, 4 MB hot: 32 lanes ran at 55 GB/s with AVX-512 once the step
 * had its xorshift (83 without), 64 lanes at 67; with AVX2 47 -> 49 GB/s, though
 * its 16 accumulators do not all fit in registers. Three codings of the same
 * integer arithmetic, hence the same value on every ISA (tested): 8 zmm or 16
 * ymm of lanes, or scalar. Intrinsics, not one body
 * on GCC vector types built per ISA (isa.h): GCC 12 turned that body's
 * (y & 0xFFFFFFFF) * K into vpmuludq for AVX-512 only, and the AVX2 build ran at
 * 8.8 GB/s against 55 here. */
#if FASTRNN_HAVE_DISPATCH
#include <immintrin.h>
FASTRNN_TARGET_AVX512 static uint64_t fastrnn_digest_chunk_avx512(const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    const __m512i k = _mm512_set1_epi64((long long)FASTRNN_DIGEST_K);
    __m512i acc[8];
    uint64_t lane[FASTRNN_DIGEST_LANES];
    size_t i = 0;
    fastrnn_digest_lanes_start(lane);
    for (int q = 0; q < 8; ++q) acc[q] = _mm512_loadu_si512(lane + 8 * q);
    for (; i + FASTRNN_DIGEST_BLOCK <= n; i += FASTRNN_DIGEST_BLOCK)
        for (int q = 0; q < 8; ++q) {
            __m512i y = _mm512_xor_si512(acc[q], _mm512_loadu_si512(b + i + 64 * q));
            y = _mm512_xor_si512(y, _mm512_srli_epi64(y, 32));
            y = _mm512_add_epi64(y, _mm512_mul_epu32(y, k));
            acc[q] = _mm512_rol_epi64(y, 29);
        }
    for (int q = 0; q < 8; ++q) _mm512_storeu_si512(lane + 8 * q, acc[q]);
    return fastrnn_digest_finish(b, n, i, lane);
}

FASTRNN_TARGET_AVX2 static uint64_t fastrnn_digest_chunk_avx2(const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    const __m256i k = _mm256_set1_epi64x((long long)FASTRNN_DIGEST_K);
    uint64_t lane[FASTRNN_DIGEST_LANES];
    size_t i = 0;
    fastrnn_digest_lanes_start(lane);
    __m256i acc[16];
    for (int q = 0; q < 16; ++q) acc[q] = _mm256_loadu_si256((const __m256i *)(lane + 4 * q));
    for (; i + FASTRNN_DIGEST_BLOCK <= n; i += FASTRNN_DIGEST_BLOCK)
        for (int q = 0; q < 16; ++q) {
            __m256i y = _mm256_xor_si256(acc[q],
                                         _mm256_loadu_si256((const __m256i *)(b + i + 32 * q)));
            y = _mm256_xor_si256(y, _mm256_srli_epi64(y, 32));
            y = _mm256_add_epi64(y, _mm256_mul_epu32(y, k));
            acc[q] = _mm256_or_si256(_mm256_slli_epi64(y, 29), _mm256_srli_epi64(y, 35));
        }
    for (int q = 0; q < 16; ++q) _mm256_storeu_si256((__m256i *)(lane + 4 * q), acc[q]);
    return fastrnn_digest_finish(b, n, i, lane);
}
#endif

static uint64_t fastrnn_digest_chunk_scalar(const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    uint64_t lane[FASTRNN_DIGEST_LANES];
    size_t i = 0;
    fastrnn_digest_lanes_start(lane);
    for (; i + FASTRNN_DIGEST_BLOCK <= n; i += FASTRNN_DIGEST_BLOCK)
        for (int l = 0; l < FASTRNN_DIGEST_LANES; ++l) {
            uint64_t w;
            memcpy(&w, b + i + 8 * l, 8);
            lane[l] = fastrnn_digest_mix(lane[l], w);
        }
    return fastrnn_digest_finish(b, n, i, lane);
}

static inline uint64_t fastrnn_digest_chunk(const void *p, size_t n)
{
#if FASTRNN_HAVE_DISPATCH
    if (fastrnn_isa_level() == FASTRNN_ISA_AVX512)
        return fastrnn_digest_chunk_avx512(p, n);
    if (fastrnn_isa_level() == FASTRNN_ISA_AVX2)
        return fastrnn_digest_chunk_avx2(p, n);
#endif
    return fastrnn_digest_chunk_scalar(p, n);
}

/* Combine chunk digests d[0:nchunks] in order (fastrnn_digest_chunk of each
 * FASTRNN_DIGEST_CHUNK-byte chunk). */
static inline uint64_t fastrnn_digest_combine(const uint64_t *d, size_t nchunks)
{
    uint64_t h = 0x452821E638D01377ULL ^ (uint64_t)nchunks;
    for (size_t c = 0; c < nchunks; ++c) h = fastrnn_digest_mix(h, d[c]);
    return fastrnn_digest_mix(h, 0xBE5466CF34E90C6CULL);
}

/* The same digest of bytes [0, n) of p on one thread, without a chunk array. */
static uint64_t fastrnn_digest_serial(const void *p, size_t n)
{
    size_t nchunks = (n + FASTRNN_DIGEST_CHUNK - 1) / FASTRNN_DIGEST_CHUNK;
    uint64_t h = 0x452821E638D01377ULL ^ (uint64_t)nchunks;
    for (size_t c = 0; c < nchunks; ++c) {
        size_t off = c * FASTRNN_DIGEST_CHUNK;
        size_t len = n - off < FASTRNN_DIGEST_CHUNK ? n - off : FASTRNN_DIGEST_CHUNK;
        h = fastrnn_digest_mix(h, fastrnn_digest_chunk((const unsigned char *)p + off, len));
    }
    return fastrnn_digest_mix(h, 0xBE5466CF34E90C6CULL);
}

/* What, besides the weights' bytes, decides a packed copy's contents; and where the
 * bytes were read. */
typedef struct {
    int kind;         /* which packing (the caller's constant) */
    int isa;          /* panel widths depend on the ISA */
    int elem;         /* sizeof the weight type */
    int nslices;      /* thread slices */
    ptrdiff_t G, H, K;
    const void *src;  /* the weights array packed. Not part of the key (equal contents
                       * anywhere share a copy), but a newer packing of the same array
                       * in the same layout makes an idle older one stale: it is
                       * reused for the new packing (fastrnn_pack_cache_take_stale)
                       * or evicted (fastrnn_pack_cache_keep) */
} fastrnn_pack_layout;

static struct {
    void *ptr;                  /* NULL: free entry */
    size_t bytes;
    fastrnn_pack_layout layout;
    uint64_t digest;
    int users;                  /* calls reading it now; evicted only at 0 */
    unsigned long long used;    /* last use, for LRU eviction */
} fastrnn_pack_entry[FASTRNN_PACK_CACHE_SLOTS];
static unsigned long long fastrnn_pack_tick;
static int fastrnn_pack_cache_off;   /* 1: find nothing, keep nothing (A/B timing) */

static inline int fastrnn_pack_cache_is_off(void)
{
    return __atomic_load_n(&fastrnn_pack_cache_off, __ATOMIC_RELAXED);
}

FASTRNN_DEFINE_SPIN_LOCK(pack)   /* fastrnn_pack_lock / _unlock (spin_lock.h) */

static inline int fastrnn_pack_same(const fastrnn_pack_layout *a, const fastrnn_pack_layout *b)
{
    return a->kind == b->kind && a->isa == b->isa && a->elem == b->elem
           && a->nslices == b->nslices && a->G == b->G && a->H == b->H && a->K == b->K;
}

/* An idle entry packed from the same array in the same layout as `layout` (so with
 * contents the array no longer has, when the caller has just missed), or -1 (call
 * with the lock held). A training loop that evaluates after every update would
 * otherwise fill the cache with stale copies of one model's weights (256 MB). */
static int fastrnn_pack_stale_locked(const fastrnn_pack_layout *layout)
{
    for (int i = 0; i < FASTRNN_PACK_CACHE_SLOTS; ++i)
        if (fastrnn_pack_entry[i].ptr != NULL && fastrnn_pack_entry[i].users == 0
                && fastrnn_pack_entry[i].layout.src == layout->src
                && fastrnn_pack_same(&fastrnn_pack_entry[i].layout, layout))
            return i;
    return -1;
}

/* After a miss: the buffer of a stale entry for the same array and layout, taken out
 * of the cache for the caller to pack into (its pages are mapped already: a fresh
 * buffer of an LSTM H=1024's weights faults in and zeroes 32 MB), with its size in
 * *bytes; or NULL. The caller keeps it again (fastrnn_pack_cache_keep) or frees it. */
static void *fastrnn_pack_cache_take_stale(const fastrnn_pack_layout *layout, size_t *bytes)
{
    void *ptr = NULL;
    int i;
    *bytes = 0;
    if (fastrnn_pack_cache_is_off()) return NULL;
    fastrnn_pack_lock();
    i = fastrnn_pack_stale_locked(layout);
    if (i >= 0) {
        ptr = fastrnn_pack_entry[i].ptr;
        *bytes = fastrnn_pack_entry[i].bytes;
        fastrnn_pack_entry[i].ptr = NULL;
        fastrnn_pack_entry[i].bytes = 0;
    }
    fastrnn_pack_unlock();
    return ptr;
}

/* The entry holding (layout, digest), or -1 (call with the lock held). */
static int fastrnn_pack_index_locked(const fastrnn_pack_layout *layout, uint64_t digest)
{
    for (int i = 0; i < FASTRNN_PACK_CACHE_SLOTS; ++i)
        if (fastrnn_pack_entry[i].ptr != NULL && fastrnn_pack_entry[i].digest == digest
                && fastrnn_pack_same(&fastrnn_pack_entry[i].layout, layout))
            return i;
    return -1;
}

/* The cached copy for (layout, digest), now in use by the caller (give it back
 * with fastrnn_pack_cache_release), or NULL. */
static void *fastrnn_pack_cache_find(const fastrnn_pack_layout *layout, uint64_t digest)
{
    void *ptr = NULL;
    int i;
    if (fastrnn_pack_cache_is_off()) return NULL;
    fastrnn_pack_lock();
    i = fastrnn_pack_index_locked(layout, digest);
    if (i >= 0) {
        fastrnn_pack_entry[i].users += 1;
        fastrnn_pack_entry[i].used = ++fastrnn_pack_tick;
        ptr = fastrnn_pack_entry[i].ptr;
    }
    fastrnn_pack_unlock();
    return ptr;
}

/* Keep ptr (bytes, just packed for layout and digest, owned by the caller) in the
 * cache, in use by the caller. Evicts idle stale copies of the same array first,
 * then least recently used idle entries to make room. Returns 1 if kept (the cache
 * owns ptr from now on), 0 if not (no idle entry, over the cap, or the key is already
 * there): the caller still owns it. */
static int fastrnn_pack_cache_keep(void *ptr, size_t bytes, const fastrnn_pack_layout *layout,
                                   uint64_t digest)
{
    void *evicted[FASTRNN_PACK_CACHE_SLOTS + 1];
    int nev = 0, kept = 0;
    if (bytes > FASTRNN_PACK_CACHE_KEEP || fastrnn_pack_cache_is_off()) return 0;
    fastrnn_pack_lock();
    if (fastrnn_pack_index_locked(layout, digest) >= 0) {   /* another call kept the same */
        fastrnn_pack_unlock();
        return 0;
    }
    for (int i; (i = fastrnn_pack_stale_locked(layout)) >= 0;) {
        evicted[nev++] = fastrnn_pack_entry[i].ptr;
        fastrnn_pack_entry[i].ptr = NULL;
        fastrnn_pack_entry[i].bytes = 0;
    }
    for (;;) {
        size_t held = 0;
        int free_slot = -1, lru = -1;
        for (int i = 0; i < FASTRNN_PACK_CACHE_SLOTS; ++i) {
            if (fastrnn_pack_entry[i].ptr == NULL) {
                if (free_slot < 0) free_slot = i;
                continue;
            }
            held += fastrnn_pack_entry[i].bytes;
            if (fastrnn_pack_entry[i].users == 0
                    && (lru < 0 || fastrnn_pack_entry[i].used < fastrnn_pack_entry[lru].used))
                lru = i;
        }
        if (free_slot >= 0 && held + bytes <= FASTRNN_PACK_CACHE_KEEP) {
            fastrnn_pack_entry[free_slot].ptr = ptr;
            fastrnn_pack_entry[free_slot].bytes = bytes;
            fastrnn_pack_entry[free_slot].layout = *layout;
            fastrnn_pack_entry[free_slot].digest = digest;
            fastrnn_pack_entry[free_slot].users = 1;
            fastrnn_pack_entry[free_slot].used = ++fastrnn_pack_tick;
            kept = 1;
            break;
        }
        if (lru < 0) break;   /* everything held is in use: do not keep this one */
        evicted[nev++] = fastrnn_pack_entry[lru].ptr;
        fastrnn_pack_entry[lru].ptr = NULL;
        fastrnn_pack_entry[lru].bytes = 0;
    }
    fastrnn_pack_unlock();
    for (int i = 0; i < nev; ++i) free(evicted[i]);
    return kept;
}

/* Done reading ptr. Returns 1 if it is a cached copy (now released), 0 if the
 * cache does not know it (the caller frees it as it was allocated). */
static int fastrnn_pack_cache_release(void *ptr)
{
    int found = 0;
    if (ptr == NULL) return 1;
    fastrnn_pack_lock();
    for (int i = 0; i < FASTRNN_PACK_CACHE_SLOTS; ++i)
        if (fastrnn_pack_entry[i].ptr == ptr) {
            fastrnn_pack_entry[i].users -= 1;
            found = 1;
            break;
        }
    fastrnn_pack_unlock();
    return found;
}

/* Free every idle cached copy (fastrnn.release_memory()). */
static void fastrnn_pack_cache_clear(void)
{
    void *idle[FASTRNN_PACK_CACHE_SLOTS + 1];
    int n = 0;
    fastrnn_pack_lock();
    for (int i = 0; i < FASTRNN_PACK_CACHE_SLOTS; ++i)
        if (fastrnn_pack_entry[i].ptr != NULL && fastrnn_pack_entry[i].users == 0) {
            idle[n++] = fastrnn_pack_entry[i].ptr;
            fastrnn_pack_entry[i].ptr = NULL;
            fastrnn_pack_entry[i].bytes = 0;
        }
    fastrnn_pack_unlock();
    for (int i = 0; i < n; ++i) free(idle[i]);
}

/* Turn the cache off (1) or on (0); off also frees what is idle. */
static void fastrnn_pack_cache_set_off(int off)
{
    __atomic_store_n(&fastrnn_pack_cache_off, off, __ATOMIC_RELAXED);
    if (off) fastrnn_pack_cache_clear();
}

/* Cached copies and their bytes (for tests and fastrnn.config()). */
static void fastrnn_pack_cache_stats(size_t *entries, size_t *bytes)
{
    *entries = 0;
    *bytes = 0;
    fastrnn_pack_lock();
    for (int i = 0; i < FASTRNN_PACK_CACHE_SLOTS; ++i)
        if (fastrnn_pack_entry[i].ptr != NULL) {
            *entries += 1;
            *bytes += fastrnn_pack_entry[i].bytes;
        }
    fastrnn_pack_unlock();
}

#endif
