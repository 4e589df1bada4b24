# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Adam's update of one parameter in a single pass (fastrnn.optim.Adam calls it).

The NumPy version made twelve passes over every parameter per step, about 3 %
of a char-LSTM training step. This is the same arithmetic in the same order,
element by element, so the results are bitwise those of the NumPy version:

    m <- m + (1 - b1) (g - m)              (torch's lerp)
    v <- b2 v + (1 - b2) g^2
    p <- p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
"""
from cython.parallel cimport prange
from libc.math cimport sqrt

ctypedef fused floating:
    float
    double

DEF CHUNK = 4096   # elements per task


def step(floating[::1] p, const floating[::1] g, floating[::1] m, floating[::1] v,
         double b1, double b2, double step_size, double bc2_sqrt, double eps,
         int n_threads):
    """One Adam update of p in place (m, v updated too); all arrays (N,) of one dtype."""
    cdef Py_ssize_t n = p.shape[0], c, i, i1
    cdef floating one_b1 = <floating> (1 - b1), fb2 = <floating> b2
    cdef floating one_b2 = <floating> (1 - b2), fstep = <floating> step_size
    cdef floating fbc2 = <floating> bc2_sqrt, feps = <floating> eps
    cdef floating d, t
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError(f"p, g, m, v must have one length, got {n}, {g.shape[0]}, "
                         f"{m.shape[0]}, {v.shape[0]}")
    for c in prange((n + CHUNK - 1) // CHUNK, nogil=True, schedule='static',
                    num_threads=n_threads):
        i1 = min(n, (c + 1) * CHUNK)
        for i in range(c * CHUNK, i1):
            d = (g[i] - m[i]) * one_b1
            m[i] = m[i] + d
            t = g[i] * g[i]
            v[i] = v[i] * fb2 + t * one_b2
            t = <floating> sqrt(v[i]) / fbc2 + feps
            p[i] = p[i] - (m[i] / t) * fstep
