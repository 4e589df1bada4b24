"""The size of one core's L2 cache, which decides how small-batch calls split work.

Read once from Linux's sysfs (the kernel's cpuid-derived cache description);
0 where it cannot be read (another OS, a container hiding /sys): the callers
then keep the split they use when they know nothing about the cache.
FASTRNN_L2_BYTES overrides it (benchmarks and tests of the rule).
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
                    return _parse_size(f.read())
    except (OSError, ValueError):
        pass
    return 0


def l2_bytes():
    """Bytes of L2 per core, or 0 if unknown."""
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
