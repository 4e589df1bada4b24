"""The CPU facts besides the ISA that steer how kernels split work.

- l2_bytes(): the L2 cache a thread has to itself, which decides how small-batch
  calls split work across threads (functional.rows_upto) and how long the unit
  split's input-projection blocks are. Read once from Linux's sysfs (the kernel's
  cpuid-derived cache description): a core's L2 divided by the logical CPUs that
  share it (SMT siblings). 0 where it cannot be read (another OS, a container
  hiding /sys): the callers then keep the split they use when they know nothing
  about the cache. FASTRNN_L2_BYTES overrides it (benchmarks, tests of the rule).
- FASTRNN_AMX: "0" keeps the bf16 GEMMs off Intel AMX tiles (src/amx_bf16.h reads
  it; it is checked here, at import, so that a typo is an error, not ignored).
"""

import os

_SYSFS = "/sys/devices/system/cpu/cpu0/cache"
_l2 = None


def _parse_size(text):
    """Bytes in a sysfs cache size such as '2048K' or '1M'; 0 if it is not one."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if scale != 1 else text
    return int(digits) * scale if digits.isdigit() else 0


def _count_cpus(text):
    """Logical CPUs in a sysfs list such as '0-1,4' (3); 0 if it is not one."""
    count = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return 0
        count += (int(hi) - int(lo) + 1) if hi else 1
    return count


def _read_sysfs():
    try:
        for entry in sorted(os.listdir(_SYSFS)):
            path = os.path.join(_SYSFS, entry)
            if not entry.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(path, "size")) as f:
                    size = _parse_size(f.read())
                try:
                    with open(os.path.join(path, "shared_cpu_list")) as f:
                        sharing = _count_cpus(f.read())
                except OSError:
                    sharing = 1
                return size // max(1, sharing)
    except (OSError, ValueError):
        pass
    return 0


def l2_bytes():
    """Bytes of L2 per thread (a core's, shared by its SMT siblings), or 0 if unknown."""
    global _l2
    if _l2 is None:
        forced = os.environ.get("FASTRNN_L2_BYTES", "").strip()
        if forced:
            size = _parse_size(forced)
            if size <= 0:
                raise ValueError(f"FASTRNN_L2_BYTES: expected a size in bytes such as "
                                 f"2097152 or 2048K, got {forced!r}")
            _l2 = size
        else:
            _l2 = _read_sysfs()
    return _l2


def check_amx_setting():
    """FASTRNN_AMX, if set, must be "0" (no AMX tiles) or "1" (use them where present),
    exactly: src/amx_bf16.h reads its first character (" 0" passed here, stripped, and
    the kernels then used AMX while config() said they did not; an audit)."""
    value = os.environ.get("FASTRNN_AMX")
    if value is not None and value not in ("0", "1"):
        raise ValueError(f"FASTRNN_AMX: expected '0' (no AMX tiles) or '1', got {value!r}")
