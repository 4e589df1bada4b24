"""Inference copies of modules with int8, bfloat16 (or packed float32) weights.

    q = fastrnn.quantize(lstm, dtype="int8")        # or "bfloat16", "float32"
    out, (h_n, c_n) = q(x)                          # same call signature as lstm
    fastrnn.save("lstm-int8.npz", q)                # stays int8 (about 1/4 of the bytes)

What is quantised (see docs/inference.md):

- int8: W_ih, W_hh (and a Linear's weight) as int8 with one symmetric scale per
  output row, s = max|w_row| / 127, q = rint(w / s) in [-127, 127]. The GEMM
  inputs are either kept float32 and multiplied by the weights widened in
  registers (``mode="weight_only"``), or quantised per call and row to int8
  the same way (``mode="dynamic"``, integer dot products, exact int32 sums);
  ``mode="auto"`` picks per GEMM by the number of rows (see AUTO_* below).
- bfloat16: weights rounded to the nearest bf16 (ties to even), float32 sums.
  ``mode="weight_only"`` keeps the GEMM inputs float32 (weights widened in
  registers); ``mode="dynamic"`` rounds them to bf16 too, so that each pair of
  products is one ``vdpbf16ps`` on CPUs with AVX512-BF16 (emulated with the same
  numbers up to summation order elsewhere); ``mode="auto"`` is dynamic where
  vdpbf16ps runs at the FMA rate (AMD with AVX512-BF16, measured on Zen 4) and
  weight-only elsewhere (see _quantized.bf16_dot_pays and src/quant_gemm.h).
- float32: the weights packed for the same kernels (what `StreamPool` runs
  for a float model).

Biases, the cell state and the gate passes stay float32. The copies are
inference only: `backward` raises. Their packed weights are built once, on
first use, under a lock (so any number of threads may call a module at once),
and rebuilt after `load_state_dict`.

ISA: the kernels (src/quant_gemm.h) exist as plain C, AVX2+FMA and AVX-512
(F/BW/VL/DQ/VNNI), plus ``avx512_bf16`` (the same with vdpbf16ps for bf16
dynamic). They follow the float kernels' level (fastrnn.set_isa, FASTRNN_ISA);
`set_isa` here overrides it for the quantised kernels alone.
"""

import os
import threading
from collections import OrderedDict

import numpy as np

from fastrnn import _hugepages, _precision
from fastrnn import _isa as _kernel_isa
from fastrnn import _quantized
from fastrnn._config import get_num_threads
from fastrnn._validate import describe
from fastrnn.modules.module import Module

__all__ = ["quantize", "QUANT_DTYPES", "MODES", "isa", "available_isas", "set_isa",
           "bf16_auto_is_dynamic",
           "QuantizedRNN", "QuantizedLSTM", "QuantizedGRU", "QuantizedRNNCell",
           "QuantizedLSTMCell", "QuantizedGRUCell", "QuantizedLinear",
           "QuantizedLanguageModel"]

QUANT_DTYPES = ("int8", "bfloat16", "float32")
MODES = ("auto", "dynamic", "weight_only")
ISAS = {"baseline": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3}
ISA_NAMES = {v: k for k, v in ISAS.items()}
ISA_NEEDS = {"avx2": "AVX2 and FMA", "avx512": "AVX-512 F, BW, VL, DQ and VNNI",
             "avx512_bf16": "AVX-512 F, BW, VL, DQ, VNNI and BF16"}

# mode="auto" (int8): integer dot products when a GEMM has at least this many rows
# (measured on the AVX-512 machine, docs/inference.md); fewer rows: weight-only.
AUTO_DYNAMIC_MIN_ROWS = 1

# int8 dynamic sums its products q * w (each at most 127 * 127 in size) exactly in
# int32 arithmetic, modulo 2^32: VNNI's offset sum of (q + 128) * w may wrap on the way,
# and subtracting 128 * sum(w) undoes that (src/quant_gemm.h), so what must fit is the
# true sum. A dot product of more terms than this could wrap: such GEMMs run
# weight-only (float32 sums) under "auto", and mode "dynamic" refuses them.
INT8_DYNAMIC_MAX_K = (2 ** 31 - 1) // (127 * 127)     # 133144
SMALL_WORK_FLOP = 2e6   # calls below this run on one thread (waking a team costs more)
# Stacks: threads split batch rows (no barrier per step; each streams all of W_hh) from
# this many rows per thread, hidden units below. Measured: see docs/inference.md.
ROW_SPLIT_MIN_ROWS = 16
# bf16 stacks and cells: batches of at least this many rows run the float32 driver on
# the bf16 weights widened to float32 (the same numbers up to rounding order): once a
# step is compute-bound, widening in every tile costs more than the bytes it saves.
# Measured on the AVX-512 Xeon (LSTM / GRU I=H=512 T=50, ms, bf16 kernel against
# float32): B=8 10.5 / 8.2 against 11.0 / 7.7, B=16 21.5 / 16.6 against 20.4 / 14.5,
# B=64 85.5 / 68.5 against 74.1 / 53.3.
BF16_FLOAT_MIN_BATCH = 16
# bfloat16 "dynamic" and "auto" from this many batch rows, on a CPU with AMX-BF16 tiles:
# the float32 twin with bf16 products on the tiles (bf16_on_amx). Xeon (AMX, 2 threads),
# LSTM I=H=512 T=50, ms at B = 1 / 2 / 8 / 64: the tiles 1.20 / 1.37 / 2.14 / 12.7,
# weight-only 1.17 / 1.75 / 5.55 / 42.4, vdpbf16ps (half rate there) 1.20 / 2.35 / 8.91 /
# 71.4; LSTM I=H=1024 T=25 B=1: 5.55 against 4.59 and 4.89 (session 33).
BF16_AMX_MIN_BATCH = 2

_CPU_LEVEL = _quantized.cpu_level()
_BF16_DOT_PAYS = _quantized.bf16_dot_pays()
_isa_level = None       # chosen on first use (FASTRNN_ISA or the best available)
_isa_lock = threading.Lock()


def available_isas():
    """ISA levels this CPU runs, lowest first (e.g. ['baseline', 'avx2', 'avx512'])."""
    return [ISA_NAMES[k] for k in range(_CPU_LEVEL + 1)]


def set_isa(name=None):
    """Force an ISA level ('baseline', 'avx2', 'avx512', 'avx512_bf16'), or None for
    FASTRNN_ISA / the best ('avx512' there means the best AVX-512 level).

    Asking for a level the CPU lacks raises RuntimeError naming what is missing.
    """
    global _isa_level
    if name is None:
        name = os.environ.get("FASTRNN_ISA", "").strip().lower() or ISA_NAMES[_CPU_LEVEL]
        source = "FASTRNN_ISA" if os.environ.get("FASTRNN_ISA", "").strip() else "default"
    else:
        source = "isa"
    if name not in ISAS:
        raise ValueError(f"{source}: expected one of {sorted(ISAS)}, got {name!r}")
    level = ISAS[name]
    if source == "FASTRNN_ISA":           # the float kernels' names
        level = _from_float_level(level)
    if level > _CPU_LEVEL:
        raise RuntimeError(f"{source}: {name!r} needs {ISA_NEEDS[name]}, which this CPU lacks "
                           f"(it runs {', '.join(available_isas())})")
    with _isa_lock:
        _isa_level = level
    return name


def isa():
    """The ISA level the quantised kernels use now (a name)."""
    return ISA_NAMES[_level()]


def bf16_auto_is_dynamic():
    """Whether bfloat16 mode "auto" rounds GEMM inputs to bf16 at the current ISA level:
    at avx512_bf16, on CPUs where vdpbf16ps pays (AMD Zen 4: src/quant_gemm.h) or that
    have AMX-BF16 tiles (bf16_on_amx: calls of BF16_AMX_MIN_BATCH rows or more run on
    them, and the rest on vdpbf16ps, so that a mode's numbers do not depend on the
    batch)."""
    return _level() == ISAS["avx512_bf16"] and (_BF16_DOT_PAYS or bf16_on_amx())


def bf16_on_amx():
    """Do bfloat16 stacks in mode "dynamic" or "auto" run calls of BF16_AMX_MIN_BATCH
    rows or more on AMX tiles (their float32 twin with bf16 products: the numbers of
    "dynamic", every GEMM input rounded to bf16)? Where the CPU has AMX-BF16, the float
    kernels run at ISA avx512 and the quantised ones at avx512_bf16 (not forced lower)."""
    from fastrnn import _isa as float_isa, _recurrent
    return (_level() == ISAS["avx512_bf16"] and float_isa.get_isa() == "avx512"
            and _recurrent._amx_bf16())


def _level():
    lv = _isa_level
    if lv is None:
        _follow(ISAS[_kernel_isa.get_isa()])
        lv = _isa_level
    return lv


def _follow(level):
    """Run at the float kernels' ISA level (fastrnn.set_isa / FASTRNN_ISA), or the
    highest below it this CPU has for the quantised kernels (their AVX-512 path
    also needs VNNI; float 'avx512' means avx512_bf16 where the CPU has BF16)."""
    global _isa_level
    with _isa_lock:
        _isa_level = min(_from_float_level(level), _CPU_LEVEL)


def _from_float_level(level):
    """The quantised level a float kernel level names: 'avx512' there is every AVX-512
    level here (avx512_bf16 where the CPU has it)."""
    return max(level, _CPU_LEVEL) if level >= ISAS["avx512"] else level


# ---------------------------------------------------------------------------- weights
def quantize_int8(w):
    """w (N, K) -> q int8 (N, K), scale float32 (N,): q = rint(w / s), s = max|row| / 127."""
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float64)
    if w.size and not (np.isfinite(w.max()) and np.isfinite(w.min())):   # (no mask of w's size)
        raise ValueError("quantize: weights must be finite to quantise, got NaN or inf")
    # (abs: max(+0.0, -0.0) may be either zero, and a -0.0 scale would be other bits)
    amax = (np.abs(np.maximum(w.max(axis=1), -w.min(axis=1))).astype(np.float64)
            if w.shape[1] else np.zeros(w.shape[0]))
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1).astype(np.float64)
    t = w / safe[:, None]               # float64, in place from here (one temporary)
    np.rint(t, out=t)
    np.clip(t, -127, 127, out=t)
    return t.astype(np.int8), scale


def bf16_bits(a):
    """a -> uint16 bit patterns of bf16, round to nearest, ties to even; a NaN stays a
    (quiet) NaN. The kernels' qg_bf16_bits (src/quant_gemm.h), element-wise."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    # in uint32: u + 0x8000 wraps only for a NaN with its sign bit set (u above
    # 0xFFFF7FFF), whose result the NaN branch replaces
    r = (u >> 16) & 1
    r += u
    r += 0x7FFF
    r >>= 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        r[nan] = (u[nan] >> 16) | 0x40
    return r.astype(np.uint16)


def quantize_bf16(w):
    """w -> uint16 bit patterns of bf16, round to nearest, ties to even."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize: weights must be finite to quantise, got NaN or inf")
    return bf16_bits(w)


def bf16_to_float(b):
    return (np.asarray(b, dtype=np.uint32) << 16).view(np.float32)


def dequantize(stored, scale, qdtype):
    """The float32 weights the kernels multiply by."""
    if qdtype == "int8":
        return stored.astype(np.float32) * scale[:, None]
    if qdtype == "bfloat16":
        return bf16_to_float(stored)
    return stored.astype(np.float32)


def block_order(G, H):
    """Row permutation of the kernels' blocked gate order: blocks of 16 units, each
    with its G gate panels; -1 marks padding rows (units >= H)."""
    nblk = (H + 15) // 16
    u = np.arange(nblk)[:, None, None] * 16 + np.arange(16)[None, None, :]   # (nblk, 1, 16)
    g = np.arange(G)[None, :, None]
    rows = g * H + u                                                         # (nblk, G, 16)
    return np.where(u < H, rows, -1).reshape(-1)


def _pack(stored, qdtype, perm):
    """Stored weights (N, K) -> packed panels (uint8), rows in order `perm` (-1: zero)."""
    N, K = stored.shape
    Kp = (K + 3) // 4 * 4
    rows = np.zeros((len(perm), Kp), stored.dtype)
    ok = perm >= 0
    rows[ok, :K] = stored[perm[ok]]
    P = len(perm) // 16
    if qdtype == "float32":
        packed = rows.reshape(P, 16, Kp).transpose(0, 2, 1)
    elif qdtype == "bfloat16":
        packed = rows.reshape(P, 16, Kp // 2, 2).transpose(0, 2, 1, 3)
    else:
        packed = rows.reshape(P, 16, Kp // 4, 4).transpose(0, 2, 1, 3)
    return _hugepages.copy(packed).view(np.uint8).reshape(-1)   # read every step: see _hugepages


def _permute(vec, perm, fill=0):
    out = np.full(len(perm), fill, dtype=vec.dtype)
    ok = perm >= 0
    out[ok] = vec[perm[ok]]
    return out


def _pack_matrix(stored, scale, qdtype, perm):
    """(packed, scales, zero-point sums) for the kernels."""
    packed = _pack(stored, qdtype, perm)
    if qdtype != "int8":
        return packed, None, None
    s = _permute(scale.astype(np.float32), perm).astype(np.float32)
    z = _permute(128 * stored.astype(np.int32).sum(axis=1).astype(np.int32), perm)
    return packed, s, z.astype(np.int32)


class _Buffer:
    """A stored array of a quantised module (quantised weights, scales, biases).

    Lives where a Parameter would, so state_dict / load_state_dict / fastrnn.save
    see it, but has no gradient: quantised modules are inference only."""

    __slots__ = ("data", "code_range")
    grad = None

    def __init__(self, data, code_range=None):
        self.data = np.ascontiguousarray(data)
        # (lo, hi): the integer values load_state_dict accepts (Module), or None: the
        # dtype's range. int8 weight codes stop at +-127 (quantize_int8), which
        # INT8_DYNAMIC_MAX_K's bound on a dot product's int32 sum assumes
        self.code_range = code_range

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"Buffer(shape={self.data.shape}, dtype={self.data.dtype})"


def _storage_dtype(qdtype):
    return {"int8": np.int8, "bfloat16": np.uint16, "float32": np.float32}[qdtype]


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


class _QuantizedBase(Module):
    """Buffers, the packed-weight cache (built once under a lock) and inference-only rules."""

    _amx_auto = False     # bf16 "auto" dynamic on AMX machines too (_QuantizedRecurrent)

    def __init__(self, qdtype, mode):
        super().__init__()
        self.qdtype = _check_choice("dtype", qdtype, QUANT_DTYPES)
        self.qmode = _check_choice("mode", mode, MODES)
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_packed", None)
        object.__setattr__(self, "_twin", None)     # bf16: the float32 module for large batches
        object.__setattr__(self, "_int8_sums_fit", True)   # (_check_dot_lengths)
        self.training = False

    def _check_dot_lengths(self, lengths):
        """lengths: (what, K) for each GEMM's dot-product length K. int8 dynamic sums
        of more than INT8_DYNAMIC_MAX_K terms could wrap in int32: mode "dynamic"
        refuses them, "auto" runs this module weight-only (_dyn)."""
        if self.qdtype != "int8" or self.qmode == "weight_only":
            return
        for what, k in lengths:
            if k > INT8_DYNAMIC_MAX_K:
                if self.qmode == "dynamic":
                    raise ValueError(
                        f"{what}: int8 mode 'dynamic' sums at most {INT8_DYNAMIC_MAX_K} "
                        f"products in int32, got {k}; use mode='weight_only' or 'auto' "
                        f"(which runs weight-only at this size)")
                object.__setattr__(self, "_int8_sums_fit", False)

    def _add_weight(self, name, shape):
        self._parameters[name] = _Buffer(np.zeros(shape, _storage_dtype(self.qdtype)),
                                         (-127, 127) if self.qdtype == "int8" else None)
        if self.qdtype == "int8":
            self._parameters[name + "_scale"] = _Buffer(np.zeros(shape[0], np.float32))

    def _add_float(self, name, shape):
        self._parameters[name] = _Buffer(np.zeros(shape, np.float32))

    def _set_weight(self, name, w):
        w = np.asarray(w)
        if self.qdtype == "int8":
            q, s = quantize_int8(w)
            self._parameters[name].data[...] = q
            self._parameters[name + "_scale"].data[...] = s
        elif self.qdtype == "bfloat16":
            self._parameters[name].data[...] = quantize_bf16(w)
        else:
            self._parameters[name].data[...] = w.astype(np.float32)

    def _stored(self, name):
        s = self._parameters.get(name + "_scale")
        return self._parameters[name].data, (None if s is None else s.data)

    def dequantized(self, name):
        """The float32 weights `name` as the kernels see them."""
        stored, scale = self._stored(name)
        return dequantize(stored, scale, self.qdtype)

    def load_state_dict(self, state_dict, strict=True):
        result = super().load_state_dict(state_dict, strict)
        with self._lock:
            for _, m in self.named_modules():
                if isinstance(m, _QuantizedBase):
                    object.__setattr__(m, "_packed", None)
                    object.__setattr__(m, "_twin", None)
        return result

    def _kernels(self):
        """The packed weights, built on first use (once, under the lock)."""
        p = self._packed
        if p is None:
            with self._lock:
                p = self._packed
                if p is None:
                    p = self._build()
                    object.__setattr__(self, "_packed", p)
        return p

    def _dyn(self, rows):
        """1: the GEMM of `rows` rows quantises its inputs (int8) or rounds them to bf16."""
        if self.qdtype == "float32" or self.qmode == "weight_only" or not self._int8_sums_fit:
            return 0
        if self.qmode == "dynamic":
            return 1
        if self.qdtype == "int8":
            return 1 if rows >= AUTO_DYNAMIC_MIN_ROWS else 0
        if self._amx_auto:
            return 1 if bf16_auto_is_dynamic() else 0
        return 1 if _level() == ISAS["avx512_bf16"] and _BF16_DOT_PAYS else 0

    def _dyn_for(self, rows, *inputs, state_rows=None):
        """(_dyn(r) for r in rows) for a call on these inputs (arrays or None; with
        state_rows, the inputs after the first are state tables read at those rows).
        int8 codes have no NaN or inf, so a call with one in its inputs runs on the float
        inputs instead (weight-only), which carry them through as the float module does
        (an inf in x saturates a gate, finite). A row that comes to hold one inside the
        call (a ReLU state that overflows) gets a NaN scale (src/quant_gemm.h,
        qg_row_scale): NaN, not the finite numbers it became before session 33. The
        check is a C loop over the values the call reads (a StreamPool's step: its rows
        of the state table, not the whole table, as the NumPy sum before read)."""
        dyn = [self._dyn(r) for r in rows]
        if any(dyn) and self.qdtype == "int8":
            for k, a in enumerate(inputs):
                if not _quantized.all_finite(a, state_rows if k > 0 else None):
                    return [0] * len(dyn)
        return dyn

    def train(self, mode=True):
        # switching a quantised copy to training mode changes nothing it computes
        return super().train(mode)

    def backward(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is an inference-only quantised copy; "
                           f"train the float module and quantise it again")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        raise RuntimeError(f"{type(self).__name__} has no gradients (inference only)")


# ---------------------------------------------------------------------------- recurrent
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}


class _QuantizedRecurrent(_QuantizedBase):
    """Shared by the quantised stacks and cells: buffers per run and the stack kernel."""

    # bf16 "auto" is dynamic on AMX machines too (their calls of 2+ rows run on the
    # tiles); a Linear, which has no twin on them, keeps weight-only there
    _amx_auto = True

    mode_name = "LSTM"
    is_cell = False

    def _init_runs(self, input_size, hidden_size, num_layers, bidirectional, bias):
        G, H = _GATES[self.mode_name], hidden_size
        D = 2 if bidirectional else 1
        self._runs = []
        for k in range(num_layers):
            in_size = input_size if k == 0 else D * H
            for d in range(D):
                sfx = "" if self.is_cell else f"_l{k}" + ("_reverse" if d else "")
                self._add_weight(f"weight_ih{sfx}", (G * H, in_size))
                self._add_weight(f"weight_hh{sfx}", (G * H, H))
                if bias:
                    self._add_float(f"bias_ih{sfx}", (G * H,))
                    self._add_float(f"bias_hh{sfx}", (G * H,))
                self._runs.append(sfx)

    def _cell_name(self):
        if self.mode_name == "RNN":
            return "rnn_" + self.nonlinearity
        return self.mode_name.lower()

    def _build(self):
        G, H = _GATES[self.mode_name], self.hidden_size
        perm = block_order(G, H)
        nblk = (H + 15) // 16
        packs = []
        for sfx in self._runs:
            w_ih, s_ih, z_ih = _pack_matrix(*self._stored(f"weight_ih{sfx}"), self.qdtype, perm)
            w_hh, s_hh, z_hh = _pack_matrix(*self._stored(f"weight_hh{sfx}"), self.qdtype, perm)
            b_x = b_hn = None
            if self.bias:
                b_ih = self._parameters[f"bias_ih{sfx}"].data
                b_hh = self._parameters[f"bias_hh{sfx}"].data
                if self.mode_name == "GRU":
                    bx = np.concatenate((b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]))
                    b_hn = np.zeros(nblk * 16, np.float32)
                    b_hn[:H] = b_hh[2 * H:]
                else:
                    bx = b_ih + b_hh
                b_x = _permute(bx.astype(np.float32), perm).astype(np.float32)
            packs.append((w_ih, w_hh, s_ih, s_hh, z_ih, z_hh, b_x, b_hn))
        D = 2 if getattr(self, "bidirectional", False) else 1
        return _quantized.Stack(self.qdtype, self._cell_name(), self.input_size, H,
                                getattr(self, "num_layers", 1), D, packs)

    def _threads(self, T, B):
        G, H = _GATES[self.mode_name], self.hidden_size
        runs = len(self._runs)
        flop = 2.0 * T * B * G * H * (self.input_size + H) * runs
        return 1 if flop < SMALL_WORK_FLOP else get_num_threads()

    def _float_twin(self):
        """The float32 stack (a cell: one layer) holding the bf16 weights widened, built
        on first use under the lock; what bf16 calls of BF16_FLOAT_MIN_BATCH rows run."""
        twin = self._twin
        if twin is None:
            with self._lock:
                twin = self._twin
                if twin is None:
                    from fastrnn.modules.module import weights_to_be_loaded
                    from fastrnn.modules.rnn import GRU, LSTM, RNN
                    cls = {"RNN": RNN, "LSTM": LSTM, "GRU": GRU}[self.mode_name]
                    kw = {"nonlinearity": self.nonlinearity} if self.mode_name == "RNN" else {}
                    with weights_to_be_loaded():        # every parameter is set below
                        twin = cls(self.input_size, self.hidden_size,
                                   getattr(self, "num_layers", 1), bias=self.bias,
                                   bidirectional=getattr(self, "bidirectional", False),
                                   **kw).eval()
                    for sfx in self._runs:
                        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                            if name.startswith("bias") and not self.bias:
                                continue
                            src = (self.dequantized(name + sfx) if name.startswith("weight")
                                   else self._parameters[name + sfx].data)
                            getattr(twin, name + (sfx or "_l0")).data[...] = src
                    object.__setattr__(self, "_twin", twin)
        return twin

    def _run_float(self, x, h0, c0, hn, cn, bf16=False):
        """_run on the float32 twin (bf16 weights widened): same arguments and outputs.
        bf16 False (weight-only): in full precision whatever set_float32_matmul_precision
        says, the inputs stay float32 (under "medium" the twin rounded them to bf16; an
        audit). bf16 True (dynamic, on AMX tiles): every GEMM input rounded to bf16."""
        twin = self._float_twin()
        with _precision.bf16_precision() if bf16 else _precision.full_precision():
            if self.mode_name == "LSTM":
                # (h0, c0) with either None (zeros), as the kernels take them; dropping c0
                # when h0 was None started the cell from zeros (found by an audit)
                y, (h, c) = twin(x, None if h0 is None and c0 is None else (h0, c0))
                cn[...] = c
            else:
                y, h = twin(x, h0)
        hn[...] = h
        return y

    def _on_amx(self, B):
        """Does a bf16 call of B rows run its float32 twin on AMX tiles (dynamic)?"""
        return (self.qdtype == "bfloat16" and B >= BF16_AMX_MIN_BATCH and self._dyn(B)
                and bf16_on_amx())

    def _run(self, x, h0, c0, hn, cn, rows_in=None, rows_out=None, n_rows=0):
        """x (T, B, I) float32 contiguous -> y (T, B, D*H); states as in Stack.forward."""
        T, B = x.shape[0], x.shape[1]
        if self._on_amx(B):
            if rows_in is None:
                return self._run_float(x, h0, c0, hn, cn, bf16=True)
            # a StreamPool's step: its rows of the state tables, run, written back
            # (copies: the pool gives one table as h0 and hn)
            take = lambda t: None if t is None else t[:, rows_in]   # noqa: E731
            hs = np.empty((hn.shape[0], B, hn.shape[2]), np.float32)
            cs = None if cn is None else np.empty_like(hs)
            y = self._run_float(x, take(h0), take(c0), hs, cs, bf16=True)
            hn[:, rows_out] = hs
            if cn is not None:
                cn[:, rows_out] = cs
            return y
        if (self.qdtype == "bfloat16" and B >= BF16_FLOAT_MIN_BATCH and rows_in is None
                and not self._dyn(B)):
            return self._run_float(x, h0, c0, hn, cn)
        stack = self._kernels()
        dyn_x, dyn_h = self._dyn_for((T * B, B), x, h0, c0, state_rows=rows_in)
        return stack.forward(_level(), dyn_x, dyn_h, x, h0, c0, hn, cn, rows_in, rows_out,
                             n_rows, self._threads(T, B), ROW_SPLIT_MIN_ROWS)


def _float32_input(name, x):
    if type(x) is not np.ndarray:
        raise TypeError(f"{name}: expected a numpy array of dtype float32, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32 (quantised modules compute in float32), "
                        f"got {x.dtype}; convert with .astype(np.float32)")
    return x


class _QuantizedStack(_QuantizedRecurrent):
    """A quantised RNN/LSTM/GRU stack: the float module's call signature (no `lengths`)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 bidirectional=False, nonlinearity="tanh", dtype="int8", mode="auto"):
        super().__init__(dtype, mode)
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers = int(num_layers)
        self.bias, self.batch_first = bool(bias), bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.nonlinearity = _check_choice("nonlinearity", nonlinearity,
                                          ("tanh", "relu", "identity"))
        lengths = [("input_size", self.input_size), ("hidden_size", self.hidden_size)]
        if self.num_layers > 1:
            lengths.append(("num_directions * hidden_size (the upper layers' input)",
                            self.num_directions * self.hidden_size))
        self._check_dot_lengths(lengths)
        self._init_runs(self.input_size, self.hidden_size, self.num_layers, self.bidirectional,
                        self.bias)

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def out_hidden_size(self):
        return self.hidden_size

    @property
    def output_size(self):
        return self.num_directions * self.hidden_size

    def config(self):
        cfg = dict(input_size=self.input_size, hidden_size=self.hidden_size,
                   num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                   bidirectional=self.bidirectional, dtype=self.qdtype, mode=self.qmode)
        if self.mode_name == "RNN":
            cfg["nonlinearity"] = self.nonlinearity
        return cfg

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, dtype={self.qdtype!r}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    def _state(self, name, h, B):
        if h is None:
            return None
        h = _float32_input(name, h)
        shape = (self.num_layers * self.num_directions, B, self.hidden_size)
        if h.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {h.shape}")
        return np.ascontiguousarray(h)

    def forward(self, x, hx=None, lengths=None):
        """out, h_n (RNN/GRU) or out, (h_n, c_n) (LSTM); x (T,B,I) or (B,T,I) if batch_first,
        or unbatched as the float module takes it: x (T,I), states (L·D,H), out (T,D·H)."""
        if lengths is not None:
            raise ValueError("lengths: quantised modules run full-length sequences only; got "
                             "lengths (split the batch by length or use the float module)")
        x = _float32_input("x", x)
        lstm = self.mode_name == "LSTM"
        if not lstm:
            states = [("hx", hx)]
        elif hx is None:
            states = [("hx[0]", None), ("hx[1]", None)]
        elif type(hx) not in (tuple, list) or len(hx) != 2:
            raise TypeError(f"hx: expected a tuple (h, c) for an LSTM, got {describe(hx)}")
        else:
            states = [("hx[0]", hx[0]), ("hx[1]", hx[1])]
        if x.ndim != 2:
            return self._forward_batched(x, states)
        # unbatched: a batch of one, its axis dropped
        shape = (self.num_layers * self.num_directions, self.hidden_size)
        for k, (name, h) in enumerate(states):
            if h is not None:
                h = _float32_input(name, h)
                if h.shape != shape:
                    raise ValueError(f"{name}: expected shape {shape} with an unbatched x "
                                     f"(T, I), got {h.shape}")
                states[k] = (name, h[:, None])                        # (L·D, 1, H)
        out, state = self._forward_batched(x[None] if self.batch_first else x[:, None], states)
        out = out[0] if self.batch_first else out[:, 0]               # (T, D·H)
        return (out, (state[0][:, 0], state[1][:, 0])) if lstm else (out, state[:, 0])

    def _forward_batched(self, x, states):
        """forward() of a 3-D x; states [(name, h or None)]: hx, or the LSTM's h and c."""
        T_axis = 1 if self.batch_first else 0
        if x.ndim != 3 or x.shape[2] != self.input_size or x.shape[T_axis] == 0:
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"x: expected a 3-D array {layout} with T >= 1 and I = "
                             f"{self.input_size}, got shape {x.shape}")
        if self.batch_first:
            x = x.transpose(1, 0, 2)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        T, B = x.shape[0], x.shape[1]
        R = self.num_layers * self.num_directions
        lstm = self.mode_name == "LSTM"
        h0, c0 = [self._state(name, h, B) for name, h in states] + [None] * (2 - len(states))
        if B == 0:           # an empty batch: empty results, as the float layers give
            F = self.num_directions * self.hidden_size
            out = np.zeros((0, T, F) if self.batch_first else (T, 0, F), np.float32)
            hn = np.zeros((R, 0, self.hidden_size), np.float32)
            return (out, (hn, hn.copy())) if lstm else (out, hn)
        hn = np.empty((R, B, self.hidden_size), np.float32)
        cn = np.empty((R, B, self.hidden_size), np.float32) if lstm else None
        y = self._run(x, h0, c0, hn, cn)
        if self.batch_first:
            y = np.ascontiguousarray(y.transpose(1, 0, 2))
        return (y, (hn, cn)) if lstm else (y, hn)


class QuantizedRNN(_QuantizedStack):
    mode_name = "RNN"


class QuantizedLSTM(_QuantizedStack):
    mode_name = "LSTM"


class QuantizedGRU(_QuantizedStack):
    mode_name = "GRU"


class _QuantizedCell(_QuantizedRecurrent):
    is_cell = True

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", dtype="int8",
                 mode="auto"):
        super().__init__(dtype, mode)
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.bias = bool(bias)
        self.nonlinearity = _check_choice("nonlinearity", nonlinearity,
                                          ("tanh", "relu", "identity"))
        self._check_dot_lengths([("input_size", self.input_size),
                                 ("hidden_size", self.hidden_size)])
        self._init_runs(self.input_size, self.hidden_size, 1, False, self.bias)

    def config(self):
        cfg = dict(input_size=self.input_size, hidden_size=self.hidden_size, bias=self.bias,
                   dtype=self.qdtype, mode=self.qmode)
        if self.mode_name == "RNN":
            cfg["nonlinearity"] = self.nonlinearity
        return cfg

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, dtype={self.qdtype!r}"

    def _cell_state(self, name, h, B, batched):
        if h is None:
            return None
        h = _float32_input(name, h)
        shape = (B, self.hidden_size) if batched else (self.hidden_size,)
        if h.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {h.shape}")
        return np.ascontiguousarray(h).reshape(1, B, self.hidden_size)

    def forward(self, input, hx=None):
        x = _float32_input("input", input)
        if x.ndim == 2 and x.shape[1] == self.input_size and x.shape[0]:
            batched, B = True, x.shape[0]
        elif x.ndim == 1 and x.shape[0] == self.input_size:
            batched, B = False, 1
        else:
            raise ValueError(f"input: expected shape (B, {self.input_size}) with B >= 1 or "
                             f"({self.input_size},), got {x.shape}")
        x3 = np.ascontiguousarray(x).reshape(1, B, self.input_size)
        lstm = self.mode_name == "LSTM"
        if lstm and hx is not None:
            if type(hx) not in (tuple, list) or len(hx) != 2:
                raise TypeError(f"hx: expected a tuple (h, c), got {describe(hx)}")
            h0 = self._cell_state("hx[0]", hx[0], B, batched)
            c0 = self._cell_state("hx[1]", hx[1], B, batched)
        else:
            h0, c0 = self._cell_state("hx", hx, B, batched), None
        hn = np.empty((1, B, self.hidden_size), np.float32)
        cn = np.empty((1, B, self.hidden_size), np.float32) if lstm else None
        self._run(x3, h0, c0, hn, cn)
        h1 = hn[0] if batched else hn[0, 0]
        if lstm:
            return h1, (cn[0] if batched else cn[0, 0])
        return h1


class QuantizedRNNCell(_QuantizedCell):
    mode_name = "RNN"


class QuantizedLSTMCell(_QuantizedCell):
    mode_name = "LSTM"

    def __init__(self, input_size, hidden_size, bias=True, dtype="int8", mode="auto"):
        super().__init__(input_size, hidden_size, bias, "tanh", dtype, mode)

    def config(self):
        return {k: v for k, v in super().config().items() if k != "nonlinearity"}


class QuantizedGRUCell(_QuantizedCell):
    mode_name = "GRU"

    def __init__(self, input_size, hidden_size, bias=True, dtype="int8", mode="auto"):
        super().__init__(input_size, hidden_size, bias, "tanh", dtype, mode)

    def config(self):
        return {k: v for k, v in super().config().items() if k != "nonlinearity"}


# ---------------------------------------------------------------------------- dense
class QuantizedLinear(_QuantizedBase):
    """y = x W^T + b with quantised W; x (..., in_features) float32."""

    def __init__(self, in_features, out_features, bias=True, dtype="int8", mode="auto"):
        super().__init__(dtype, mode)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._check_dot_lengths([("in_features", self.in_features)])
        self._add_weight("weight", (self.out_features, self.in_features))
        if bias:
            self._add_float("bias", (self.out_features,))

    @property
    def has_bias(self):
        return "bias" in self._parameters

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.has_bias, dtype=self.qdtype, mode=self.qmode)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self.qdtype!r}")

    def _build(self):
        N = self.out_features
        perm = np.arange((N + 15) // 16 * 16)
        perm[perm >= N] = -1
        w, s, z = _pack_matrix(*self._stored("weight"), self.qdtype, perm)
        b = self._parameters["bias"].data if self.has_bias else None
        return _quantized.Linear(self.qdtype, self.in_features, N, w, s, z, b)

    def forward(self, x):
        x = _float32_input("x", x)
        if x.shape[-1:] != (self.in_features,) or x.size == 0:
            raise ValueError(f"x: expected shape (..., {self.in_features}) and at least one "
                             f"row, got {x.shape}")
        x2 = np.ascontiguousarray(x).reshape(-1, self.in_features)
        M = x2.shape[0]
        flop = 2.0 * M * self.in_features * self.out_features
        y = self._kernels().forward(_level(), self._dyn_for((M,), x2)[0], x2,
                                    1 if flop < SMALL_WORK_FLOP else get_num_threads())
        return y.reshape(x.shape[:-1] + (self.out_features,))


# ---------------------------------------------------------------------------- language model
class QuantizedLanguageModel(Module):
    """Embedding (float32) -> quantised stack -> quantised decoder; ids (T, B) -> logits."""

    def __init__(self, vocab_size, embed_size=64, hidden_size=256, num_layers=1, cell="lstm",
                 dtype="int8", mode="auto"):
        super().__init__()
        from fastrnn.nn import Embedding
        self.vocab_size, self.embed_size = int(vocab_size), int(embed_size)
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.cell = _check_choice("cell", cell, ("lstm", "gru", "rnn_tanh", "rnn_relu"))
        self.qdtype = _check_choice("dtype", dtype, QUANT_DTYPES)
        self.qmode = _check_choice("mode", mode, MODES)
        self.dtype = np.dtype(np.float32)
        self.encoder = Embedding(self.vocab_size, self.embed_size, dtype=np.float32)
        kw = dict(num_layers=self.num_layers, dtype=dtype, mode=mode)
        if cell == "lstm":
            self.rnn = QuantizedLSTM(self.embed_size, self.hidden_size, **kw)
        elif cell == "gru":
            self.rnn = QuantizedGRU(self.embed_size, self.hidden_size, **kw)
        else:
            self.rnn = QuantizedRNN(self.embed_size, self.hidden_size, nonlinearity=cell[4:], **kw)
        self.decoder = QuantizedLinear(self.hidden_size, self.vocab_size, dtype=dtype, mode=mode)
        self.training = False

    @property
    def is_lstm(self):
        return self.cell == "lstm"

    def config(self):
        return dict(vocab_size=self.vocab_size, embed_size=self.embed_size,
                    hidden_size=self.hidden_size, num_layers=self.num_layers, cell=self.cell,
                    dtype=self.qdtype, mode=self.qmode)

    def init_state(self, batch_size):
        shape = (self.num_layers, batch_size, self.hidden_size)
        h = np.zeros(shape, np.float32)
        return (h, np.zeros(shape, np.float32)) if self.is_lstm else h

    def forward(self, x, state=None):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x: expected (T, B) token ids, got shape {x.shape}")
        out, state = self.rnn(self.encoder(x), state)
        return self.decoder(out), state

    def backward(self, *args, **kwargs):
        raise RuntimeError("QuantizedLanguageModel is inference only")

    def load_state_dict(self, state_dict, strict=True):
        result = super().load_state_dict(state_dict, strict)
        for m in (self.rnn, self.decoder):
            object.__setattr__(m, "_packed", None)
            object.__setattr__(m, "_twin", None)
        return result


# ---------------------------------------------------------------------------- quantize()
def _copy_state(dst, src_module, names):
    """Quantise the float parameters `names` (src name -> dst name) into dst."""
    for src_name, dst_name in names:
        arr = getattr(src_module, src_name).data
        if dst_name.startswith("weight"):
            dst._set_weight(dst_name, arr)
        else:
            dst._parameters[dst_name].data[...] = arr.astype(np.float32)


def quantize(module, dtype="int8", mode="auto"):
    """An inference-only copy of `module` with `dtype` weights ("int8", "bfloat16", "float32").

    module: an RNN/LSTM/GRU stack (no proj_size; merge_mode 'concat'), a cell, a
    Linear, a Sequential of these (other children are copied) or an
    RNNLanguageModel. mode ("auto", "dynamic", "weight_only") chooses how int8
    and bfloat16 GEMMs treat their float inputs (see the module docstring). The copy is in
    eval mode, computes in float32, and takes float32 inputs.
    """
    import copy

    from fastrnn.lm import RNNLanguageModel
    from fastrnn.modules.cells import GRUCell, LSTMCell, RNNCell
    from fastrnn.modules.rnn import GRU, LSTM, RNN
    from fastrnn.nn import Linear, Sequential

    _check_choice("dtype", dtype, QUANT_DTYPES)
    _check_choice("mode", mode, MODES)
    if isinstance(module, (_QuantizedBase, QuantizedLanguageModel)):
        raise TypeError(f"quantize: {type(module).__name__} is already quantised")
    if not getattr(module, "reset_after", True):
        raise ValueError(f"quantize: {type(module).__name__} with reset_after=False is not "
                         f"supported (the seed's GRU has no quantised kernel)")
    if isinstance(module, (RNN, LSTM, GRU)):
        if module.proj_size:
            raise ValueError("quantize: LSTM proj_size > 0 is not supported, got "
                             f"proj_size={module.proj_size}")
        if module.bidirectional and module.merge_mode != "concat":
            raise ValueError(f"quantize: merge_mode must be 'concat', got {module.merge_mode!r}")
        cls = {"RNN": QuantizedRNN, "LSTM": QuantizedLSTM, "GRU": QuantizedGRU}[module.mode]
        q = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                module.batch_first, module.bidirectional, module.nonlinearity, dtype, mode)
        for name, p in module.named_parameters(remove_duplicate=False):
            if name.startswith("weight"):
                q._set_weight(name, p.data)
            else:
                q._parameters[name].data[...] = p.data.astype(np.float32)
        return q
    if isinstance(module, (RNNCell, LSTMCell, GRUCell)):
        if isinstance(module, RNNCell):
            q = QuantizedRNNCell(module.input_size, module.hidden_size, module.bias,
                                 module.nonlinearity, dtype, mode)
        else:
            cls = QuantizedLSTMCell if isinstance(module, LSTMCell) else QuantizedGRUCell
            q = cls(module.input_size, module.hidden_size, module.bias, dtype, mode)
        for name, p in module.named_parameters(remove_duplicate=False):
            if name.startswith("weight"):
                q._set_weight(name, p.data)
            else:
                q._parameters[name].data[...] = p.data.astype(np.float32)
        return q
    if isinstance(module, Linear):
        q = QuantizedLinear(module.in_features, module.out_features, module.bias is not None,
                            dtype, mode)
        q._set_weight("weight", module.weight.data)
        if module.bias is not None:
            q._parameters["bias"].data[...] = module.bias.data.astype(np.float32)
        return q
    if isinstance(module, Sequential):
        from collections import OrderedDict as OD
        children = OD()
        for name, child in module.named_children():
            try:
                children[name] = quantize(child, dtype, mode)
            except TypeError:
                children[name] = copy.deepcopy(child).eval()
        return Sequential(children).eval()
    if isinstance(module, RNNLanguageModel):
        q = QuantizedLanguageModel(module.vocab_size, module.embed_size, module.hidden_size,
                                   module.num_layers, module.cell, dtype, mode)
        q.encoder.weight.data[...] = module.encoder.weight.data.astype(np.float32)
        q.rnn = quantize(module.rnn, dtype, mode)
        q.decoder = quantize(module.decoder, dtype, mode)
        return q
    raise TypeError(f"quantize: expected an RNN/LSTM/GRU, a cell, Linear, Sequential or "
                    f"RNNLanguageModel, got {type(module).__name__}")


def _register():
    from fastrnn.io import register
    for cls in (QuantizedRNN, QuantizedLSTM, QuantizedGRU, QuantizedRNNCell, QuantizedLSTMCell,
                QuantizedGRUCell, QuantizedLinear, QuantizedLanguageModel):
        register(cls)


_register()
