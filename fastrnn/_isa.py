"""Which instruction set the kernels run.

The micro-kernels and elementwise passes are compiled for three ISAs from one
source (src/isa.h): AVX-512 (x86-64-v4: F, BW, DQ, VL), AVX2+FMA (x86-64-v3)
and baseline x86-64. At import the best one the CPU has is used, unless the
environment variable FASTRNN_ISA names a lower one (for tests and A/B
benchmarks); `set_isa` switches in-process. Results are bitwise identical
for any thread count within one ISA; across ISAs they agree to float
tolerance (different vector widths and FMA contraction round differently).
"""

import importlib
import os
import sys

from fastrnn import _openmp

__all__ = ["ISAS", "available_isas", "get_isa", "set_isa", "cpu_model", "cpu_vector_flags"]

ISAS = ("baseline", "avx2", "avx512")    # index = the level src/isa.h uses
# Every extension module that includes src/isa.h has its own copy of the level.
KERNEL_MODULES = ("_recurrent", "_dense")

_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq",
                 "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512_fp16",
                 "amx_bf16", "amx_int8")

_current = None
_forced = None    # FASTRNN_ISA's value while the ISA it chose is in use (forced_by())


def available_isas():
    """The ISAs this CPU can run, lowest first (e.g. ['baseline', 'avx2', 'avx512'])."""
    return [name for level, name in enumerate(ISAS) if _openmp.isa_supported(level)]


def get_isa():
    """The ISA the kernels run now: 'avx512', 'avx2' or 'baseline'."""
    return _current


def forced_by():
    """FASTRNN_ISA's value if the ISA in use is the one it chose (not replaced since by
    set_isa), else None."""
    return _forced


def set_isa(isa):
    """Run the kernels with `isa` ('avx512', 'avx2', 'baseline'; or None for the best).

    Asking for an ISA the CPU lacks raises ValueError. Not for use while
    another thread runs a kernel.
    """
    global _current, _forced
    _forced = None
    if isa is None:
        isa = ISAS[_openmp.isa_best()]
    if not isinstance(isa, str) or isa.lower() not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)} (or None), got {isa!r}")
    isa = isa.lower()
    have = available_isas()
    if isa not in have:
        raise ValueError(f"isa {isa!r} is not supported by this CPU ({cpu_model()}); "
                         f"it supports: {', '.join(have)}")
    level = ISAS.index(isa)
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"fastrnn.{name}")
        if not module._set_isa(level):   # cannot happen after the check above
            raise RuntimeError(f"fastrnn.{name} refused ISA {isa!r}")
    _current = isa
    quantized = sys.modules.get("fastrnn.quantization")   # follows on import otherwise
    if quantized is not None:
        quantized._follow(level)


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown"


def cpu_family_model():
    """'family F model M' of an x86 CPU (Linux /proc/cpuinfo), or None: a KVM guest's
    model name may say only 'AMD EPYC', and family 25 model 17 (Zen 4) against
    model 1 (Zen 3) is what tells them apart."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        return None
    if "cpu family" in fields and "model" in fields:
        return f"family {fields['cpu family']} model {fields['model']}"
    return None


def cpu_vector_flags():
    """The vector-ISA flags the CPU reports (Linux /proc/cpuinfo), e.g. ['avx2', 'fma', ...]."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in _VECTOR_FLAGS if flag in flags]
    except OSError:
        pass
    return []


def _init():
    env = os.environ.get("FASTRNN_ISA", "").strip()
    if not env:
        set_isa(None)
        return
    try:
        set_isa(env)
    except ValueError as e:
        raise ValueError(f"FASTRNN_ISA={env!r}: {e}") from None
    global _forced
    _forced = env


_init()
