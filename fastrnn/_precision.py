"""float32 matmul precision for the recurrent layers: PyTorch's set_float32_matmul_precision.

    fastrnn.set_float32_matmul_precision("medium")   # bf16 products where they are faster

"highest" (the default) and "high": every product of a float32 layer in float32.
"medium": the recurrent layers' GEMMs (input projection, recurrent product,
backward's dh = da W_hh) may round their operands to bf16 and sum in float32
(src/bf16_gemm.h, src/amx_bf16.h), and so may backward's dX and dW GEMMs after the
loop, as PyTorch allows under "medium". fastrnn does so where the CPU runs bf16 dot
products faster than float32 FMAs, with the float kernels at ISA avx512: AMX-BF16
tiles (Intel Xeon from Sapphire Rapids on) or AVX512-BF16 on AMD (Zen 4: twice the
rate). Elsewhere "medium" runs float32, as "highest" does. A projected LSTM
(proj_size), the single-step cells and float64 stay in full precision
(docs/precision.md).

Each product then carries bf16's rounding (8 bits of mantissa: a relative error
up to 2^-9 per operand); see docs/precision.md for what that does to training.
"""

import threading
from contextlib import contextmanager

import numpy as np

__all__ = ["set_float32_matmul_precision", "get_float32_matmul_precision", "PRECISIONS"]

PRECISIONS = ("highest", "high", "medium")

_precision = "highest"
_force_bf16 = False   # tests: run the bf16 path at any ISA (widening kernels where no vdpbf16ps)
_local = threading.local()   # .full / .bf16: this thread's setting (the classes below)


def set_float32_matmul_precision(precision):
    """Set the internal precision of float32 matrix products: "highest" (default),
    "high" (the same here) or "medium" (bf16 operands, float32 sums, where faster)."""
    global _precision
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    _precision = precision


def get_float32_matmul_precision():
    """The current float32 matmul precision ("highest", "high" or "medium")."""
    return _precision


@contextmanager
def scoped(precision):
    """Run a block at `precision` (None: leave it as it is), then restore the setting."""
    before = _precision
    if precision is not None:
        set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        set_float32_matmul_precision(before)


def medium_runs_bf16():
    """Does "medium" run bf16 products on this machine (else it runs float32)?
    True where the float kernels run at ISA avx512 on a CPU whose AVX512-BF16
    dot product issues at the FMA rate (AMD Zen 4), or with AMX-BF16 tiles (Intel
    Sapphire Rapids and later: src/amx_bf16.h)."""
    if _force_bf16:
        return True
    from fastrnn import _isa, _quantized, _recurrent
    return _isa.get_isa() == "avx512" and (_quantized.bf16_dot_pays() or _recurrent._amx_bf16())


class _ThreadFlag:
    """Sets this thread's flag `_name` on `_local` for a with-block, then restores it.
    A class, not a generator: it wraps every cell step (0.8 us a step as a generator,
    on steps of 20)."""
    __slots__ = ("_before",)
    _name = None

    def __enter__(self):
        self._before = getattr(_local, self._name, False)
        setattr(_local, self._name, True)

    def __exit__(self, *exc):
        setattr(_local, self._name, self._before)


class full_precision(_ThreadFlag):
    """`with full_precision():` this thread's products in float32 for the block,
    whatever the setting: the single-step cells stay in full precision (their eval
    fast path, which runs float32 kernels only, and their general path then give the
    same numbers)."""
    __slots__ = ()
    _name = "full"


class bf16_precision(_ThreadFlag):
    """`with bf16_precision():` this thread's float32 products on bf16 operands for the
    block, where "medium" would run them so, whatever the setting: what a bf16 quantised
    stack's float32 twin runs on AMX tiles (fastrnn/quantization.py). Other threads keep
    their setting."""
    __slots__ = ()
    _name = "bf16"


def bf16_products(dtype):
    """Do a layer's GEMMs on arrays of `dtype` run on bf16 operands now? (The cheap
    test first: the eval fast path asks on every layer call.)"""
    if _precision != "medium" and not getattr(_local, "bf16", False):
        return False
    if getattr(_local, "full", False) or np.dtype(dtype) != np.float32:
        return False
    return medium_runs_bf16()
