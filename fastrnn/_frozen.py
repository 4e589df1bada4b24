"""The pack cache's digests of frozen weights, taken once per array.

An eval call finds the packed copy of its weights by a digest of their bytes
(src/pack_cache.h), read and hashed on every call because a writeable array may
have changed. A frozen array (`Module.freeze()`, `fastrnn._buffers.frozen_copy`:
memory of an immutable bytes object) cannot, so its digest is taken once and
kept here, with the array that owns the memory, for as long as that array lives
and its memory is that same bytes object (NumPy's `__setstate__` can give an
array other memory in place: then the digest is taken again).
"""

import weakref

import numpy as np

from fastrnn import _recurrent
from fastrnn._buffers import is_frozen

__all__ = ["both_frozen", "frozen_digests", "frozen_mark", "still_frozen"]

# id(owner) -> (weak reference to the owner, the bytes object under it,
# {(address, nbytes): digest}); the owner is the last ndarray of an array's base
# chain, whose base is the bytes
_memo = {}


def _owner(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _digest(w):
    owner = _owner(w)
    key = id(owner)
    entry = _memo.get(key)
    if entry is None or entry[0]() is not owner or entry[1] is not owner.base:
        entry = (weakref.ref(owner, lambda _, key=key: _memo.pop(key, None)), owner.base, {})
        _memo[key] = entry
    where = (w.ctypes.data, w.nbytes)
    d = entry[2].get(where)
    if d is None:
        d = entry[2][where] = _recurrent._digest(w.reshape(-1).view(np.uint8))
    return d


def both_frozen(w_ih, w_hh):
    """Are w_ih and w_hh both frozen, C-contiguous ndarrays: weights whose packings an
    eval call finds without reading them (and so may keep for short sequences too:
    functional.pack_flags)?"""
    return (isinstance(w_ih, np.ndarray) and isinstance(w_hh, np.ndarray)
            and is_frozen(w_ih) and is_frozen(w_hh)
            and w_ih.flags.c_contiguous and w_hh.flags.c_contiguous)


def frozen_digests(w_ih, w_hh):
    """(digest of w_ih, of w_hh) as the kernels' pack cache takes them when both are
    frozen, C-contiguous ndarrays, else None (the call then hashes them itself)."""
    if not both_frozen(w_ih, w_hh):
        return None
    return _digest(w_ih), _digest(w_hh)


def frozen_mark(a):
    """(the bytes object under a, a's data address) when a is frozen, else None:
    what still_frozen checks (the fast path's plans, per call)."""
    if not isinstance(a, np.ndarray):
        return None
    under = _owner(a).base
    return (under, a.ctypes.data) if type(under) is bytes else None


def still_frozen(a, mark):
    """a is read-only, at the address it had, on the same bytes object as when
    frozen_mark(a) gave `mark`."""
    return (isinstance(a, np.ndarray) and not a.flags.writeable
            and a.ctypes.data == mark[1] and _owner(a).base is mark[0])
