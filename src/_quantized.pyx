# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Inference kernels on packed float32 / bfloat16 / int8 weights (quant_gemm.h, quant_rnn.h).

`Stack` holds the packed weights of a uni- or bidirectional RNN/LSTM/GRU stack
(built once by fastrnn.quantize) and runs a whole forward in one call, without
the GIL; `Linear` does the same for a dense layer. Every array argument is
checked here (dtype, contiguity, shape) before any nogil code; the messages name
the argument and give the expected and actual value.
"""
cimport numpy as cnp
from libc.stdlib cimport calloc, malloc, free
from libc.stdint cimport int32_t, uint32_t

import numpy as np

cnp.import_array()

cdef extern from "quant_rnn.h" nogil:
    ctypedef struct qg_run:
        int cell, G
        Py_ssize_t Kin, H
        const void *w_ih
        const void *w_hh
        const float *s_ih
        const float *s_hh
        const int32_t *z_ih
        const int32_t *z_hh
        const float *b_x
        const float *b_hn
        int reverse, in_layer, layer
        Py_ssize_t out_col, out_stride
        const float *h0
        const float *c0
        float *hn
        float *cn
    ctypedef struct qg_stack:
        int isa, fmt, dyn_ih, dyn_hh, n_runs, n_threads, row_split_min
        Py_ssize_t T, B
        const qg_run *runs
        const float *x
        float *const *ys
        const Py_ssize_t *rows_in
        const Py_ssize_t *rows_out
    int qg_stack_forward(const qg_stack *S)
    int qg_split_by_rows(Py_ssize_t B, int nt, int row_split_min)
    int qg_linear_forward(int isa, int fmt, int dyn, Py_ssize_t M, Py_ssize_t K, Py_ssize_t N,
                          const float *x, float *y, const void *w, const float *ws,
                          const int32_t *wz, const float *bias, int n_threads)
    int qg_cpu_level()
    int qg_bf16_dot_pays()
    Py_ssize_t qg_round4(Py_ssize_t k)
    size_t qg_panel_bytes(int fmt, Py_ssize_t Kp)

FORMATS = {"float32": 0, "bfloat16": 1, "int8": 2}
CELLS = {"rnn_tanh": 0, "rnn_relu": 1, "rnn_identity": 2, "lstm": 3, "gru": 4}
GATES = {0: 1, 1: 1, 2: 1, 3: 4, 4: 3}


cdef extern from "scratch.h" nogil:
    void scratch_release "fastrnn_scratch_release"()


def _release_scratch():
    """Free the work buffers this module keeps between calls (src/scratch.h)."""
    scratch_release()


def cpu_level():
    """3: AVX-512 F/BW/VL/DQ/VNNI + BF16, 2: the same without BF16, 1: AVX2+FMA,
    0: baseline (what this CPU runs)."""
    return qg_cpu_level()


def split_by_rows(Py_ssize_t B, int n_threads, int row_split_min):
    """Whether Stack.forward's threads split batch rows (True) or hidden units."""
    return bool(qg_split_by_rows(B, max(1, n_threads), row_split_min))


def all_finite(a, rows=None):
    """Are the values of `a` (a float32 array, C-contiguous; None: True) all finite?
    With `rows` (intp, each in range): `a` is a (S, R, H) state table and only its rows
    `rows` of axis 1 count (a StreamPool passes its whole table and the rows a step
    uses). A C loop over the exponent bits (vectorised: an OR of comparisons): the NumPy
    sum used before cost a one-step call 4 us and a pool step of 8 of 1,024 streams
    115 us."""
    if a is None:
        return True
    if not isinstance(a, np.ndarray):
        raise TypeError(f"all_finite: expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray> a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise TypeError("all_finite: expected a C-contiguous float32 array")
    cdef const uint32_t *u = <const uint32_t *> cnp.PyArray_DATA(arr)
    cdef Py_ssize_t k, s, S, R, H, nr
    cdef const Py_ssize_t *pr
    cdef uint32_t bad = 0
    if rows is None:
        with nogil:
            bad = nonfinite_bits(u, cnp.PyArray_SIZE(arr))
        return bad == 0
    if cnp.PyArray_NDIM(arr) != 3:
        raise ValueError(f"all_finite: rows need a (S, R, H) table, got shape {a.shape}")
    S, R, H = arr.shape[0], arr.shape[1], arr.shape[2]
    nr = np.size(rows)
    pr = <const Py_ssize_t *> _data("rows", rows, cnp.NPY_INTP, nr)
    for k in range(nr):
        if pr[k] < 0 or pr[k] >= R:
            raise IndexError(f"rows: row {pr[k]} out of range [0, {R})")
    with nogil:
        for s in range(S):
            for k in range(nr):
                bad |= nonfinite_bits(u + (s * R + pr[k]) * H, H)
    return bad == 0


cdef inline uint32_t nonfinite_bits(const uint32_t *u, Py_ssize_t n) noexcept nogil:
    """Nonzero when some of the n floats (as bits) is NaN or +-inf: exponent all ones."""
    cdef uint32_t bad = 0
    cdef Py_ssize_t i
    for i in range(n):
        bad |= (u[i] & 0x7F800000u) == 0x7F800000u
    return bad


def bf16_dot_pays():
    """True where bf16 mode "auto" rounds activations to bf16 too (vdpbf16ps at the
    FMA rate: AMD with AVX512-BF16; src/quant_gemm.h)."""
    return bool(qg_bf16_dot_pays())


cdef const void *_data(name, object a, int typenum, Py_ssize_t size) except NULL:
    """Pointer to the data of a C-contiguous array of numpy type `typenum` and `size` items."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray> a
    if cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(f"{name}: expected dtype {np.dtype(cnp.PyArray_DescrFromType(typenum))}, "
                        f"got {a.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name}: expected a C-contiguous array")
    if cnp.PyArray_SIZE(arr) != size:
        raise ValueError(f"{name}: expected {size} values, got shape {a.shape}")
    return cnp.PyArray_DATA(arr)


cdef const void *_opt(name, object a, int typenum, Py_ssize_t size) except? NULL:
    if a is None:
        return NULL
    return _data(name, a, typenum, size)


cdef inline const float *_state(name, object a, Py_ssize_t R, Py_ssize_t N, Py_ssize_t H) except? NULL:
    """A (R, N, H) float32 state table or None."""
    if a is None:
        return NULL
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray> a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32:
        raise TypeError(f"{name}: expected dtype float32, got {a.dtype}")
    if (cnp.PyArray_NDIM(arr) != 3 or arr.shape[0] != R or arr.shape[1] != N
            or arr.shape[2] != H):
        raise ValueError(f"{name}: expected shape {(R, N, H)}, got {a.shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name}: expected a C-contiguous array")
    return <const float *> cnp.PyArray_DATA(arr)


cdef _check_distinct_rows(const Py_ssize_t *rows, Py_ssize_t B, Py_ssize_t n_rows):
    """ValueError unless the B rows (each in [0, n_rows)) are distinct: two batch
    rows writing one state row would race (threads split the batch)."""
    cdef unsigned char *seen = <unsigned char *> calloc(n_rows if n_rows > 0 else 1, 1)
    cdef Py_ssize_t i, dup = -1
    if seen == NULL:
        raise MemoryError()
    for i in range(B):
        if seen[rows[i]]:
            dup = rows[i]
            break
        seen[rows[i]] = 1
    free(seen)
    if dup >= 0:
        raise ValueError(f"rows_out: row {dup} is written for two batch rows; each needs "
                         f"its own")


cdef class Stack:
    """Packed weights of L layers x D directions (runs r = l*D + d).

    packs[r] = (w_ih, w_hh, s_ih, s_hh, z_ih, z_hh, b_x, b_hn): uint8 packed
    panels, float32 scales, int32 zero-point sums, float32 biases (or None).
    """
    cdef qg_run *runs
    cdef readonly int fmt, cell, G, L, D, n_runs
    cdef readonly Py_ssize_t input_size, hidden_size
    cdef list keep
    cdef bint ready      # __init__ ran to its end (forward runs only then)

    def __cinit__(self):
        self.runs = NULL

    def __dealloc__(self):
        free(self.runs)

    def __init__(self, fmt, cell, Py_ssize_t input_size, Py_ssize_t hidden_size, int L, int D,
                 list packs):
        # once only: a second call that failed half-way left new sizes over the old
        # runs, which forward then read past (found by an audit)
        if self.runs != NULL:
            raise RuntimeError("Stack: already initialised")
        if fmt not in FORMATS:
            raise ValueError(f"fmt: expected one of {sorted(FORMATS)}, got {fmt!r}")
        if cell not in CELLS:
            raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {cell!r}")
        if input_size < 1 or hidden_size < 1 or L < 1 or D not in (1, 2):
            raise ValueError("Stack: sizes must be >= 1 and D 1 or 2")
        if len(packs) != L * D:
            raise ValueError(f"packs: expected {L * D} runs, got {len(packs)}")
        self.fmt = FORMATS[fmt]
        self.cell = CELLS[cell]
        self.G = GATES[self.cell]
        self.L, self.D, self.n_runs = L, D, L * D
        self.input_size, self.hidden_size = input_size, hidden_size
        self.keep = []
        self.runs = <qg_run *> malloc(sizeof(qg_run) * self.n_runs)
        if self.runs == NULL:
            raise MemoryError()
        cdef Py_ssize_t H = hidden_size, nblk = (H + 15) // 16, I, npan
        cdef int r, l, d
        cdef qg_run *R
        for r in range(self.n_runs):
            l, d = r // D, r % D
            I = input_size if l == 0 else D * H
            npan = nblk * self.G
            w_ih, w_hh, s_ih, s_hh, z_ih, z_hh, b_x, b_hn = packs[r]
            self.keep.append(packs[r])
            R = &self.runs[r]
            R.cell, R.G, R.Kin, R.H = self.cell, self.G, I, H
            R.w_ih = _data(f"packs[{r}].w_ih", w_ih, cnp.NPY_UINT8,
                           npan * qg_panel_bytes(self.fmt, qg_round4(I)))
            R.w_hh = _data(f"packs[{r}].w_hh", w_hh, cnp.NPY_UINT8,
                           npan * qg_panel_bytes(self.fmt, qg_round4(H)))
            need_scale = self.fmt == 2
            if need_scale and (s_ih is None or s_hh is None or z_ih is None or z_hh is None):
                raise ValueError("packs: int8 weights need scales and zero-point sums")
            R.s_ih = <const float *> _opt(f"packs[{r}].s_ih", s_ih, cnp.NPY_FLOAT32, npan * 16)
            R.s_hh = <const float *> _opt(f"packs[{r}].s_hh", s_hh, cnp.NPY_FLOAT32, npan * 16)
            R.z_ih = <const int32_t *> _opt(f"packs[{r}].z_ih", z_ih, cnp.NPY_INT32, npan * 16)
            R.z_hh = <const int32_t *> _opt(f"packs[{r}].z_hh", z_hh, cnp.NPY_INT32, npan * 16)
            R.b_x = <const float *> _opt(f"packs[{r}].b_x", b_x, cnp.NPY_FLOAT32, npan * 16)
            R.b_hn = <const float *> _opt(f"packs[{r}].b_hn", b_hn, cnp.NPY_FLOAT32, nblk * 16)
            R.reverse = d
            R.in_layer = l - 1
            R.layer = l
            R.out_col = d * H
            R.out_stride = D * H
            R.h0 = R.c0 = NULL
            R.hn = R.cn = NULL
        self.ready = True

    def forward(self, int isa, int dyn_ih, int dyn_hh, x, h0, c0, hn, cn, rows_in, rows_out,
                Py_ssize_t n_rows, int n_threads, int row_split_min=0):
        """y (T, B, D*H) of the last layer for x (T, B, I) float32.

        h0/c0: (L*D, n_rows, H) tables read at rows rows_in (B,) intp (None: rows 0..B-1,
        n_rows = B); None states are zeros. hn/cn: tables written at rows_out. c0/cn only
        for LSTM. The same table may be given as h0 and hn (a stream pool).
        row_split_min: threads split batch rows from this many rows per thread, hidden
        units below (0: always units).
        """
        if not self.ready:
            raise RuntimeError("Stack: not initialised (its __init__ failed or did not run)")
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x: expected a numpy array, got {type(x).__name__}")
        cdef cnp.ndarray xa = <cnp.ndarray> x
        if cnp.PyArray_TYPE(xa) != cnp.NPY_FLOAT32:
            raise TypeError(f"x: expected dtype float32, got {x.dtype}")
        if cnp.PyArray_NDIM(xa) != 3 or xa.shape[2] != self.input_size:
            raise ValueError(f"x: expected shape (T, B, {self.input_size}), got {x.shape}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(xa):
            raise ValueError("x: expected a C-contiguous array")
        cdef Py_ssize_t T = xa.shape[0], B = xa.shape[1], H = self.hidden_size, i
        if T < 1 or B < 1:
            raise ValueError(f"x: expected T >= 1 and B >= 1, got shape {x.shape}")
        if isa < 0 or isa > qg_cpu_level():
            raise ValueError(f"isa: expected 0..{qg_cpu_level()} on this CPU, got {isa}")
        if self.cell != 3 and (c0 is not None or cn is not None):
            raise ValueError("c0/cn: only an LSTM has a cell state")
        cdef Py_ssize_t R = self.n_runs
        if rows_in is None:
            n_rows = B
        cdef const float *p_h0 = _state("h0", h0, R, n_rows, H)
        cdef const float *p_c0 = _state("c0", c0, R, n_rows, H)
        cdef float *p_hn = <float *> _state("hn", hn, R, n_rows, H)
        cdef float *p_cn = <float *> _state("cn", cn, R, n_rows, H)
        cdef const Py_ssize_t *p_in
        cdef const Py_ssize_t *p_out
        cdef Py_ssize_t *own = NULL
        if rows_in is None:
            own = <Py_ssize_t *> malloc(sizeof(Py_ssize_t) * B)
            if own == NULL:
                raise MemoryError()
            for i in range(B):
                own[i] = i
            p_in = p_out = own
        else:
            p_in = <const Py_ssize_t *> _data("rows_in", rows_in, cnp.NPY_INTP, B)
            p_out = <const Py_ssize_t *> _data("rows_out", rows_out, cnp.NPY_INTP, B)
            for i in range(B):
                if p_in[i] < 0 or p_in[i] >= n_rows or p_out[i] < 0 or p_out[i] >= n_rows:
                    raise IndexError(f"rows_in/rows_out: row out of range [0, {n_rows})")
            _check_distinct_rows(p_out, B, n_rows)
            if (hn is not None and hn is h0) or (cn is not None and cn is c0):
                for i in range(B):   # in place: a row read for one batch row, written for another
                    if p_in[i] != p_out[i]:
                        raise ValueError("rows_in/rows_out: with the same table as h0 and hn "
                                         "(or c0 and cn) each batch row must read and write "
                                         f"one row; batch row {i} reads {p_in[i]}, writes "
                                         f"{p_out[i]}")
        cdef list ys = []
        cdef float *yp[64]
        if self.L > 64:
            free(own)
            raise ValueError(f"Stack: at most 64 layers, got {self.L}")
        cdef cnp.npy_intp dims[3]
        dims[0], dims[1], dims[2] = T, B, self.D * H
        cdef int l, r
        for l in range(self.L):
            y = cnp.PyArray_EMPTY(3, dims, cnp.NPY_FLOAT32, 0)
            ys.append(y)
            yp[l] = <float *> cnp.PyArray_DATA(<cnp.ndarray> y)
        cdef qg_run *runs = <qg_run *> malloc(sizeof(qg_run) * R)   # per call: thread safe
        if runs == NULL:
            free(own)
            raise MemoryError()
        for r in range(R):
            runs[r] = self.runs[r]
            runs[r].h0 = p_h0 + r * n_rows * H if p_h0 != NULL else NULL
            runs[r].c0 = p_c0 + r * n_rows * H if p_c0 != NULL else NULL
            runs[r].hn = p_hn + r * n_rows * H if p_hn != NULL else NULL
            runs[r].cn = p_cn + r * n_rows * H if p_cn != NULL else NULL
        cdef qg_stack S
        S.isa, S.fmt = isa, self.fmt
        S.dyn_ih, S.dyn_hh = dyn_ih != 0 and self.fmt != 0, dyn_hh != 0 and self.fmt != 0
        S.n_runs, S.n_threads, S.T, S.B = R, max(1, n_threads), T, B
        S.row_split_min = max(0, row_split_min)
        S.runs = runs
        S.x = <const float *> cnp.PyArray_DATA(xa)
        S.ys = yp
        S.rows_in, S.rows_out = p_in, p_out
        cdef int rc
        with nogil:
            rc = qg_stack_forward(&S)
        free(runs)
        free(own)
        if rc != 0:
            raise MemoryError("fastrnn quantised forward: out of memory")
        return ys[self.L - 1]


cdef class Linear:
    """Packed weights of a dense layer: y = x W^T + b."""
    cdef readonly int fmt
    cdef readonly Py_ssize_t in_features, out_features
    cdef const void *w
    cdef const float *ws
    cdef const int32_t *wz
    cdef const float *bias
    cdef tuple keep
    cdef bint ready      # __init__ ran to its end (forward runs only then)

    def __init__(self, fmt, Py_ssize_t in_features, Py_ssize_t out_features, w, ws, wz, bias):
        if self.keep is not None:    # once only (see Stack.__init__)
            raise RuntimeError("Linear: already initialised")
        if fmt not in FORMATS:
            raise ValueError(f"fmt: expected one of {sorted(FORMATS)}, got {fmt!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError("Linear: sizes must be >= 1")
        self.fmt = FORMATS[fmt]
        self.in_features, self.out_features = in_features, out_features
        cdef Py_ssize_t npan = (out_features + 15) // 16
        self.keep = (w, ws, wz, bias)
        self.w = _data("w", w, cnp.NPY_UINT8, npan * qg_panel_bytes(self.fmt, qg_round4(in_features)))
        if self.fmt == 2 and (ws is None or wz is None):
            raise ValueError("Linear: int8 weights need scales and zero-point sums")
        self.ws = <const float *> _opt("ws", ws, cnp.NPY_FLOAT32, npan * 16)
        self.wz = <const int32_t *> _opt("wz", wz, cnp.NPY_INT32, npan * 16)
        self.bias = <const float *> _opt("bias", bias, cnp.NPY_FLOAT32, out_features)
        self.ready = True

    def forward(self, int isa, int dyn, x, int n_threads):
        """y (M, N) for x (M, K) float32 C-contiguous."""
        if not self.ready:
            raise RuntimeError("Linear: not initialised (its __init__ failed or did not run)")
        cdef const float *px = <const float *> _data("x", x, cnp.NPY_FLOAT32, np.size(x))
        if np.ndim(x) != 2 or x.shape[1] != self.in_features or x.shape[0] < 1:
            raise ValueError(f"x: expected shape (M, {self.in_features}) with M >= 1, "
                             f"got {np.shape(x)}")
        if isa < 0 or isa > qg_cpu_level():
            raise ValueError(f"isa: expected 0..{qg_cpu_level()} on this CPU, got {isa}")
        cdef Py_ssize_t M = x.shape[0]
        cdef cnp.npy_intp dims[2]
        dims[0], dims[1] = M, self.out_features
        y = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
        cdef float *py = <float *> cnp.PyArray_DATA(<cnp.ndarray> y)
        cdef int rc
        cdef int d = dyn != 0 and self.fmt != 0
        with nogil:
            rc = qg_linear_forward(isa, self.fmt, d, M, self.in_features, self.out_features,
                                   px, py, self.w, self.ws, self.wz, self.bias, max(1, n_threads))
        if rc != 0:
            raise MemoryError("fastrnn quantised linear: out of memory")
        return y
