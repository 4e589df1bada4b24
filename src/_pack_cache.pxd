# Packed weights kept between eval calls, keyed by the weights' contents
# (pack_cache.h says why and how). gate_slices / bf16_gate_slices with cache=True:
#
#     key = (packing kind, ISA, type, slices, G, H, K) + digest of W's bytes
#     hit  -> the copy packed earlier, no packing
#     miss -> pack into the buffer of a stale copy of the same array (packed_buffer),
#             or a scratch buffer, then keep it (the cache owns it)
#
# Every buffer from them is given back with slices_free, cached or not.
from cython.parallel cimport prange
from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc, free
from _simd cimport fastrnn_isa_level


cdef extern from "scratch.h" nogil:
    void scratch_free "fastrnn_scratch_free"(void *ptr)
    size_t scratch_detach "fastrnn_scratch_detach"(void *ptr)
    void *scratch_alloc "fastrnn_scratch_alloc"(size_t nbytes)


cdef extern from "pack_cache.h" nogil:
    ctypedef struct PackLayout "fastrnn_pack_layout":
        int kind, isa, elem, nslices
        Py_ssize_t G, H, K
        const void *src
    size_t DIGEST_CHUNK "FASTRNN_DIGEST_CHUNK"
    uint64_t digest_chunk "fastrnn_digest_chunk"(const void *p, size_t n)
    uint64_t digest_combine "fastrnn_digest_combine"(const uint64_t *d, size_t nchunks)
    uint64_t digest_serial "fastrnn_digest_serial"(const void *p, size_t n)
    void *pack_cache_find "fastrnn_pack_cache_find"(const PackLayout *layout, uint64_t digest)
    int pack_cache_keep "fastrnn_pack_cache_keep"(void *ptr, size_t nbytes,
                                                  const PackLayout *layout, uint64_t digest)
    void *pack_cache_take_stale "fastrnn_pack_cache_take_stale"(const PackLayout *layout,
                                                               size_t *nbytes)
    int pack_cache_release "fastrnn_pack_cache_release"(void *ptr)
    void pack_cache_clear "fastrnn_pack_cache_clear"()
    void pack_cache_set_off "fastrnn_pack_cache_set_off"(int off)
    int pack_cache_is_off "fastrnn_pack_cache_is_off"()
    void pack_cache_stats "fastrnn_pack_cache_stats"(size_t *entries, size_t *nbytes)
    void count_digested "fastrnn_count_digested"(size_t nbytes)
    size_t digested "fastrnn_digested"()


cdef enum:
    PACK_GATE_SLICES = 1        # gate_slices, panels (_schedule.pxd)
    PACK_BF16_GATE_SLICES = 3   # bf16_gate_slices (_bf16.pxd)


cdef inline uint64_t weights_digest(const void *W, size_t nbytes, int n_threads) noexcept nogil:
    """Digest of nbytes at W: chunks hashed on n_threads, combined in order, so
    the value does not depend on n_threads (pack_cache.h)."""
    cdef size_t nchunks = (nbytes + DIGEST_CHUNK - 1) // DIGEST_CHUNK
    cdef uint64_t *d = NULL
    cdef Py_ssize_t c
    cdef uint64_t h
    cdef const char *base = <const char *> W
    if nchunks < 2 or n_threads < 2:
        return digest_serial(W, nbytes)
    d = <uint64_t *> malloc(nchunks * sizeof(uint64_t))
    if d == NULL:
        return digest_serial(W, nbytes)
    for c in prange(<Py_ssize_t> nchunks, schedule='static', num_threads=n_threads):
        d[c] = digest_chunk(base + c * DIGEST_CHUNK, min(DIGEST_CHUNK, nbytes - c * DIGEST_CHUNK))
    h = digest_combine(d, nchunks)
    free(d)
    return h


cdef inline PackLayout pack_layout(int kind, int elem, int nslices, Py_ssize_t G, Py_ssize_t H,
                                   Py_ssize_t K) noexcept nogil:
    cdef PackLayout layout
    layout.kind, layout.isa, layout.elem, layout.nslices = kind, fastrnn_isa_level(), elem, nslices
    layout.G, layout.H, layout.K = G, H, K
    layout.src = NULL
    return layout


cdef inline void *find_packed(bint *cache, int kind, const void *W, int elem, int nslices,
                              Py_ssize_t G, Py_ssize_t H, Py_ssize_t K, int n_threads,
                              PackLayout *layout, uint64_t *digest,
                              const uint64_t *known=NULL) noexcept nogil:
    """A packer's first step when asked to cache (*cache): the copy kept for W
    (G*H x K values of elem bytes) packed as `kind` in nslices, or NULL, having
    set *layout and *digest for keep_packed. *cache := False if the cache is off.
    known: W's digest when the caller has it (weights_digest's value), else NULL."""
    cache[0] = cache[0] and not pack_cache_is_off()
    if not cache[0]:
        return NULL
    layout[0] = pack_layout(kind, elem, nslices, G, H, K)
    layout.src = W
    if known == NULL:
        count_digested(G * H * K * elem)
    digest[0] = known[0] if known != NULL else weights_digest(W, G * H * K * elem, n_threads)
    return pack_cache_find(layout, digest[0])


cdef inline void *packed_buffer(bint cache, const PackLayout *layout, size_t nbytes) noexcept nogil:
    """Where a packer writes after find_packed missed: with cache, the buffer of a
    stale copy of the same array (pages already mapped), else a scratch buffer.
    NULL if out of memory."""
    cdef size_t held = 0
    cdef void *buf = pack_cache_take_stale(layout, &held) if cache else NULL
    if buf != NULL and held >= nbytes:
        return buf
    if buf != NULL:
        free(buf)
    return scratch_alloc(nbytes)


cdef inline void keep_packed(void *buf, size_t nbytes, const PackLayout *layout,
                             uint64_t digest) noexcept nogil:
    """Hand buf (from packed_buffer: a scratch buffer of nbytes or a stale copy's
    buffer, just packed) to the cache. If the cache does not keep it, slices_free
    still frees it (it is out of the scratch pool either way)."""
    cdef size_t held = scratch_detach(buf)
    pack_cache_keep(buf, held if held > nbytes else nbytes, layout, digest)


cdef inline void slices_free(void *ptr) noexcept nogil:
    """Give back a buffer from gate_slices / bf16_gate_slices, cached or not."""
    if not pack_cache_release(ptr):
        scratch_free(ptr)
