"""A layer's input given as an embedding table and ids (the functional forwards' x_ids).

Step t of sequence b reads row ids[t, b] of x (V, I): the same as x[ids], as a
language model's first layer reads its embeddings. When the table has no more rows
than the call has steps (V <= T*B, a character vocabulary), the input projection
x W_ih^T is taken once per row of the table, table = x W_ih^T (V, G*H), and the
time loop copies rows of it instead of multiplying every step's input (the driver's
x_ids). Backward then sums the gradient of each step's projection into its table
row, dtable (V, G*H), and the rest are two small products:

    dx = dtable W_ih  (V, I),        dW_ih = dtable^T x  (G*H, I)

in place of dx = da W_ih over T*B rows and dW_ih = da^T x over T*B rows. For the
char LSTM of bench/quality.py (V=65, I=64, H=512, T*B=2048) that removes the three
products with K or N = I, about 11 % of the layer's FLOP.

Otherwise (a larger vocabulary, or bf16 products, which the driver's table mode
does not take) x[ids] is gathered and the layer runs as usual; backward then sums
dx's rows by id. Both ways give the same numbers to float rounding. (The GRU with
reset_after=False refuses ids under bf16 products: those run fastrnn.reference's loop.)
"""

import numpy as np

from fastrnn import _dense, _recurrent
from fastrnn._validate import as_ids


class IdsInput:
    """x (V, I) and ids (T, B); table (V, G*H) = x W_ih^T when fused, else None."""

    __slots__ = ("x", "ids", "table")

    def __init__(self, x, ids, table):
        self.x, self.ids, self.table = x, ids, table

    @property
    def fused(self):
        return self.table is not None


def prepare(x, x_ids, w_ih, bf16, n_threads):
    """x (V, I) and w_ih validated -> (x for the layer, IdsInput). x for the layer is
    x[ids] (T, B, I) when not fused; when fused, a read-only broadcast view of that
    shape and dtype that stands for it in shape checks and is never read (the driver
    reads the table)."""
    V, I = x.shape
    ids = as_ids("x_ids", x_ids, V)
    T, B = ids.shape
    if I != w_ih.shape[1]:
        raise ValueError(f"x must have shape (V, {w_ih.shape[1]}) to match w_ih, got {x.shape}")
    if bf16 or V > T * B or I == 0:         # (V >= 1: the ids are rows of x)
        return np.ascontiguousarray(x[ids]), IdsInput(x, ids, None)
    table = np.empty((V, w_ih.shape[0]), x.dtype)                  # (V, G*H)
    _dense.forward(table, x, w_ih, None, n_threads)
    return np.broadcast_to(x[:1][None], (T, B, I)), IdsInput(x, ids, table)


def gradient(ids_in, d, w_ih, dw_ih, accumulate, n_threads):
    """dL/dx (V, I) from what the driver's backward wrote: d = dx rows (T, B, I) when
    not fused, else dtable (V, G*H) (dw_ih is then written here, or added into with
    accumulate)."""
    x, ids = ids_in.x, ids_in.ids
    V, I = x.shape
    dx = np.empty((V, I), x.dtype)
    if not ids_in.fused:
        _recurrent.scatter_rows(dx, d.reshape(ids.size, I), ids.reshape(-1), n_threads)
        return dx
    dw_t = np.empty((I, w_ih.shape[0]), x.dtype)                  # dW_ih^T (I, G*H)
    _dense.backward(dx, dw_t, d, x, w_ih, n_threads)
    if accumulate:
        dw_ih += dw_t.T
    else:
        dw_ih[...] = dw_t.T
    return dx
