# cython: language_level=3
"""NumPy arrays whose memory is kept between training steps (src/scratch.h).

Why: a training step allocates its caches (gates, states) and backward's work
arrays afresh, megabytes each. When a step holds several layers' or both
directions' caches at once, glibc gives the memory back to the system between
steps and the next step pays a page fault per 4 KB page: 2,060 faults a step for
a two-layer LSTM I=H=256 T=100 B=32 (116.6 ms; 112.7 with glibc told to keep
it), 3,912 for the GRU (90-92 ms; 84-85), Zen 4, 2 threads. An array made here
sits on a buffer of this module's scratch pool, which goes back to the pool
(still mapped, huge pages from 1 MB) when the array and every view of it are
gone; the next step's array of that size gets it again.

The arrays are ordinary ndarrays (C order, writable, aligned to 64 bytes) whose
base is the buffer's owner. The pool keeps at most 256 MB idle
(FASTRNN_SCRATCH_KEEP); fastrnn.release_memory() gives it back.
"""

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cython.parallel cimport prange
from libc.stdint cimport uintptr_t
from libc.string cimport memcpy
import numpy as np

cnp.import_array()

DEF POOLED_MIN = 1 << 20   # smaller arrays are np.empty's: glibc keeps those in its heap
POOLED_MIN_BYTES = POOLED_MIN


cdef extern from *:
    """
    #define FASTRNN_SCRATCH_ARRAYS 1   /* scratch.h: a slot for every live pooled array */
    """
cdef extern from "scratch.h" nogil:
    void *scratch_alloc "fastrnn_scratch_alloc"(size_t nbytes)
    void scratch_free "fastrnn_scratch_free"(void *ptr)
    void scratch_release "fastrnn_scratch_release"()


cdef class _Buffer:
    """Owner of one pooled buffer: gives it back when the last array on it goes."""
    cdef void *ptr

    def __dealloc__(self):
        scratch_free(self.ptr)


def empty(shape, dtype):
    """np.empty(shape, dtype), on a pooled buffer for float32 / float64 arrays of
    POOLED_MIN_BYTES and up (contents are whatever the last user left: write
    before reading)."""
    cdef cnp.dtype dt = np.dtype(dtype)
    cdef tuple dims = tuple(shape)
    cdef cnp.npy_intp c_dims[32]
    cdef Py_ssize_t n
    cdef size_t nbytes = dt.itemsize
    cdef int nd = len(dims), i
    if nd > 32:
        raise ValueError(f"shape: at most 32 dimensions, got {nd}")
    for i in range(nd):
        n = dims[i]
        if n < 0:
            raise ValueError(f"shape: dimensions must be >= 0, got {dims}")
        if n > 0 and nbytes > (<size_t> -1) // <size_t> n:
            raise MemoryError(f"an array of shape {dims} would not fit in memory")
        c_dims[i] = n
        nbytes *= <size_t> n
    if nbytes < POOLED_MIN or not dt.isnative or dt.type_num not in (cnp.NPY_FLOAT,
                                                                      cnp.NPY_DOUBLE):
        return np.empty(dims, dt)
    cdef _Buffer owner = _Buffer.__new__(_Buffer)
    owner.ptr = scratch_alloc(nbytes)
    if owner.ptr == NULL:
        raise MemoryError(f"could not allocate {nbytes} bytes for an array of shape {dims}")
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNewFromData(nd, c_dims, dt.type_num, owner.ptr)
    cnp.set_array_base(arr, owner)   # the buffer lives as long as the array and its views
    return arr


def zeros(shape, dtype):
    """np.zeros(shape, dtype) on a pooled buffer."""
    arr = empty(shape, dtype)
    arr.fill(0)
    return arr


ctypedef fused real:
    float
    double


DEF ROWS_CHUNK_VALUES = 1 << 16   # values a thread takes at a time (256 KB of float)


def copy_rows(real[:, :] dst, const real[:, :] src, int n_threads=1):
    """dst[i] := src[i] for every row, both (rows, width), each row contiguous,
    rows any stride apart (a slice of the last axis: one direction's half of a bidirectional
    output), by up to n_threads threads. Why: NumPy's concatenate and
    ascontiguousarray are one thread, 13 % of a bidirectional RNN (256, 256,
    100, 32) training step on the 2-core Xeon."""
    _check_rows("dst", dst.shape[0], dst.shape[1], src.shape[0], src.shape[1])
    if dst.shape[1] > 1:   # (a row of one value has any step: NumPy's reshape picks one)
        _check_unit_stride(dst.strides[1], src.strides[1], sizeof(real))
    cdef Py_ssize_t R = dst.shape[0], W = dst.shape[1], per, nchunks, c, i
    if R == 0 or W == 0:
        return
    per = max(1, ROWS_CHUNK_VALUES // W)
    nchunks = (R + per - 1) // per
    if n_threads < 1 or nchunks < 2:
        n_threads = 1
    with nogil:
        for c in prange(nchunks, schedule='static', num_threads=n_threads):
            for i in range(c * per, min(R, c * per + per)):
                memcpy(&dst[i, 0], &src[i, 0], W * sizeof(real))


def _check_unit_stride(dst_step, src_step, itemsize):
    """Rows are copied whole (memcpy): each must be contiguous."""
    for name, step in (("dst", dst_step), ("src", src_step)):
        if step != itemsize:
            raise ValueError(f"{name}: needs contiguous rows (a step of {itemsize} bytes "
                             f"along them), got a step of {step}")


def _check_rows(name, rows, width, src_rows, src_width):
    if (rows, width) != (src_rows, src_width):
        raise ValueError(f"{name}: needs src's shape ({src_rows}, {src_width}), "
                         f"got ({rows}, {width})")


def copy(src, int n_threads=1):
    """A copy of the C-contiguous array `src` made by empty() (a pooled buffer
    from 1 MB); float32 and float64 rows copied by up to n_threads threads
    (copy_rows).

    Why: a training forward hands the caller a copy of its output, which is a
    view of the states the backward reads; NumPy's copy was one thread writing
    fresh pages, 4 % of an RNN (256, 256, 100, 64) training step on the 2-core
    Xeon (6.5 MB)."""
    if not isinstance(src, np.ndarray) or not src.flags.c_contiguous:
        raise ValueError("src: needs a C-contiguous ndarray, got "
                         f"{type(src).__name__ if not isinstance(src, np.ndarray) else 'a strided one'}")
    if src.dtype.hasobject:
        raise ValueError(f"src: needs an array of plain values, got dtype {src.dtype}")
    out = empty(src.shape, src.dtype)
    if src.size and src.dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        width = src.shape[src.ndim - 1]   # (not [-1]: this module is built without wraparound)
        copy_rows(out.reshape(-1, width), src.reshape(-1, width), n_threads)
    else:
        out[...] = src
    return out


DEF FROZEN_ALIGN = 64   # a frozen copy starts on a cache line, as the parameters do


def frozen_copy(src):
    """A read-only copy of the ndarray `src` (C order, its dtype and shape) whose
    memory is an immutable bytes object, starting on a 64-byte line.

    Why: an eval call hashes the weights it packed before (8 MB for an LSTM of
    512 units) because a writeable array may have changed since. No view of an
    array on a bytes object can be made writeable (NumPy refuses the flag, bytes
    export a read-only buffer), so such weights cannot change and need no
    hash: `Module.freeze()` puts the parameters on these."""
    if not isinstance(src, np.ndarray) or src.dtype.hasobject:
        raise ValueError("src: needs an ndarray of plain values, got "
                         f"{type(src).__name__ if not isinstance(src, np.ndarray) else src.dtype}")
    cdef cnp.ndarray a = np.ascontiguousarray(src)
    cdef Py_ssize_t nbytes = a.nbytes
    # written here before anyone else can see it (what the C API allows a new bytes)
    cdef bytes buf = PyBytes_FromStringAndSize(NULL, nbytes + FROZEN_ALIGN)
    cdef char *p = PyBytes_AS_STRING(buf)
    cdef uintptr_t addr = <uintptr_t> p
    cdef Py_ssize_t start = <Py_ssize_t> ((FROZEN_ALIGN - addr % FROZEN_ALIGN) % FROZEN_ALIGN)
    if nbytes:
        memcpy(p + start, cnp.PyArray_DATA(a), nbytes)
    return np.frombuffer(buf, np.uint8, nbytes, start).view(src.dtype).reshape(src.shape)


def is_frozen(a):
    """Is ndarray a's memory an immutable bytes object (frozen_copy's, or any
    np.frombuffer of bytes)? Then its values can never change."""
    while isinstance(a, np.ndarray):
        a = a.base
    return type(a) is bytes


def _release_scratch():
    """Free the idle pooled buffers (fastrnn.release_memory())."""
    scratch_release()
