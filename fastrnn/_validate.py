"""Argument checks run before any kernel: every bad input becomes a Python exception.

Each message names the argument and gives the expected and the actual value,
because the kernels behind these checks trust their arguments and run without
the GIL: nothing unchecked may reach them.
"""

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def describe(value):
    """What `value` is, for an error message: "a tuple of length 3", "ndarray"."""
    if type(value) in (tuple, list):
        return f"a {type(value).__name__} of length {len(value)}"
    return type(value).__name__


def as_float_array(name, value, ndim, dtype=None):
    """`value` as a C-contiguous float32/float64 array of rank `ndim`.

    With `dtype` given, the array must already have it: mixing float32 and
    float64 is an error, never a silent cast. Non-contiguous input is copied.
    """
    if value is None:
        raise TypeError(f"{name} must be an array, got None")
    arr = np.asarray(value)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name} has dtype {arr.dtype} but the other arrays are {np.dtype(dtype)};"
                        f" convert it explicitly (e.g. {name}.astype(np.{np.dtype(dtype)}))")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def as_rows_array(name, value, ndim, dtype=None):
    """as_float_array, but a (T, B, O) view whose rows the kernels can step through
    (rows_evenly_spaced) is kept as it is, not copied: a column block of a wider
    array (a bidirectional layer's half of dL/dy), read with a row stride."""
    arr = np.asarray(value) if value is not None else value
    if (isinstance(arr, np.ndarray) and ndim == 3 and arr.ndim == 3
            and arr.dtype in FLOAT_DTYPES and (dtype is None or arr.dtype == dtype)
            and arr.size > 0 and rows_evenly_spaced(arr)):
        return arr
    return as_float_array(name, value, ndim, dtype)


def rows_evenly_spaced(arr):
    """Are the T*B rows t*B + b of a (T, B, O) array each contiguous and evenly spaced
    without overlap (like a[:, :, :O] of a (T, B, 2O) array)? What the kernels' row
    stride (p.ldy, p.lddy) can express."""
    T, B, O = arr.shape
    size = arr.itemsize
    s_t, s_b, s_o = arr.strides
    row = s_b if B > 1 else s_t   # bytes from row t*B + b to the next
    spaced = T * B <= 1 or ((T == 1 or B == 1 or s_t == B * s_b)
                            and row >= O * size and row % size == 0)
    return s_o == size and spaced


def check_shape(name, arr, expected):
    """Raise ValueError unless arr.shape == expected."""
    if arr.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {arr.shape}")


def optional_state(name, value, shape, dtype):
    """A (B, H) state array or None (zeros)."""
    if value is None:
        return None
    arr = as_float_array(name, value, len(shape), dtype)
    check_shape(name, arr, shape)
    return arr


def as_lengths(lengths, B, T):
    """Validated (B,) intp lengths in [1, T], or None when absent."""
    if lengths is None:
        return None
    arr = np.asarray(lengths)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and arr.size and np.all(arr == np.round(arr)):
            arr = arr.astype(np.intp)
        else:
            raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) (one per batch row), got {arr.shape}")
    if B and (arr.min() < 1 or arr.max() > T):
        bad = int(arr.min()) if arr.min() < 1 else int(arr.max())
        raise ValueError(f"lengths must lie in [1, T={T}], got {bad}")
    return np.ascontiguousarray(arr, dtype=np.intp)


def as_ids(name, ids, V):
    """Validated (T, B) intp ids in [0, V) with T, B >= 1 (rows of a (V, I) table)."""
    arr = np.asarray(ids)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have shape (T, B) with T, B >= 1, got {arr.shape}")
    if arr.min() < 0 or arr.max() >= V:
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(f"{name} must lie in [0, {V}) (rows of x), got {bad}")
    return np.ascontiguousarray(arr, dtype=np.intp)


def check_weights(w_ih, w_hh, b_ih, b_hh, gates, dtype, proj=None):
    """Validate (G*H, I), (G*H, H) weights and the optional biases; returns arrays and H.

    With `proj` (an LSTM's w_hr, (P, H), already an array) w_hh is (G*H, P).
    """
    w_ih = as_float_array("w_ih", w_ih, 2, dtype)
    w_hh = as_float_array("w_hh", w_hh, 2, dtype)
    gh = w_hh.shape[0]
    if gh % gates or gh == 0:
        raise ValueError(f"w_hh must have shape ({gates}*H, {'P' if proj is not None else 'H'}),"
                         f" got {w_hh.shape}")
    H = gh // gates
    if proj is None:
        check_shape("w_hh", w_hh, (gates * H, H))
    else:
        P = proj.shape[0]
        if P < 1:
            raise ValueError(f"w_hr must have shape (P, {H}) with P >= 1, got {proj.shape}")
        check_shape("w_hr", proj, (P, H))
        check_shape("w_hh", w_hh, (gates * H, P))
    if w_ih.shape[0] != gates * H:
        raise ValueError(f"w_ih must have shape ({gates * H}, I) for H={H}, got {w_ih.shape}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be arrays or both be None")
    if b_ih is not None:
        b_ih = as_float_array("b_ih", b_ih, 1, dtype)
        b_hh = as_float_array("b_hh", b_hh, 1, dtype)
        check_shape("b_ih", b_ih, (gates * H,))
        check_shape("b_hh", b_hh, (gates * H,))
    return w_ih, w_hh, b_ih, b_hh, H


def check_input(x, w_ih):
    """x must be (T, B, I) with I = w_ih.shape[1], T >= 1, B >= 1."""
    T, B, I = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"x must have T >= 1 steps and B >= 1 rows, got shape {x.shape}")
    if I != w_ih.shape[1]:
        raise ValueError(f"x must have shape (T, B, {w_ih.shape[1]}) to match w_ih, got {x.shape}")


def check_rows_out(name, out, shape, dtype, inputs):
    """`out` as the array a kernel writes (T, B, H) rows into: an ndarray of
    `dtype` and `shape`, writeable, each row contiguous and the T*B rows evenly
    spaced without overlap (a column block of a (T, B, D*H) array qualifies),
    sharing no memory with the arrays in `inputs` (None entries are skipped)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    check_shape(name, out, shape)
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    if not rows_evenly_spaced(out):
        raise ValueError(f"{name}: each (T, B) row must be contiguous and the rows evenly "
                         f"spaced without overlap (like out[:, :, :H] of a (T, B, 2H) "
                         f"array), got strides {out.strides} for shape {out.shape}")
    for arr in inputs:
        if arr is not None and np.may_share_memory(out, arr):
            raise ValueError(f"{name} must not share memory with the inputs or weights")
