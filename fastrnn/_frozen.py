"""The pack cache's digests of frozen weights, taken once per array.

An eval call finds the packed copy of its weights by a digest of their bytes
(src/pack_cache.h), read and hashed on every call because a writeable array may
have changed. A frozen array (`Module.freeze()`, `fastrnn._buffers.frozen_copy`:
memory of an immutable bytes object) cannot, so its digest is taken once and
kept here, with the array that owns the memory, for as long as that array lives.
"""

import weakref

import numpy as np

from fastrnn import _recurrent
from fastrnn._buffers import is_frozen

__all__ = ["frozen_digests"]

# id(owner) -> (weak reference to the owner, {(address, nbytes): digest}); the
# owner is the last ndarray of an array's base chain (its base is the bytes)
_memo = {}


def _owner(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _digest(w):
    owner = _owner(w)
    key = id(owner)
    entry = _memo.get(key)
    if entry is None or entry[0]() is not owner:
        entry = (weakref.ref(owner, lambda _, key=key: _memo.pop(key, None)), {})
        _memo[key] = entry
    where = (w.ctypes.data, w.nbytes)
    d = entry[1].get(where)
    if d is None:
        d = entry[1][where] = _recurrent._digest(np.ascontiguousarray(w).reshape(-1).view(np.uint8))
    return d


def frozen_digests(w_ih, w_hh):
    """(digest of w_ih, of w_hh) as the kernels' pack cache takes them when both are
    frozen and C-contiguous, else None (the call then hashes them itself)."""
    if not (is_frozen(w_ih) and is_frozen(w_hh)
            and w_ih.flags.c_contiguous and w_hh.flags.c_contiguous):
        return None
    return _digest(w_ih), _digest(w_hh)
