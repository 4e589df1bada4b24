"""Mixed-lengths benchmark (``fastrnn bench --lengths``).

A batch whose sequences have different lengths should cost about the sum of
its lengths, not B*T: finished sequences cost no compute. For one config this
times the single-layer kernel (``fastrnn.functional``) twice, interleaved:

    full   lengths all T
    mixed  lengths drawn uniformly from [1, T] (seeded)

and reports ``time_ratio = ms_mixed / ms_full`` next to
``length_ratio = sum(lengths) / (B*T)`` (about 0.5). ``efficiency`` is
``length_ratio / time_ratio``: 1.0 means the time shrinks exactly with the work.
The mixed-lengths result is checked against ``fastrnn.reference`` first. With
torch as a peer, its packed sequences (``pack_padded_sequence``) are timed the
same way for comparison.
"""

import sys

import numpy as np

from fastrnn.benchmark import common

__all__ = ["lengths_report", "format_lengths", "mixed_lengths"]


def mixed_lengths(T, B, seed=0):
    """(B,) int64 lengths uniform in [1, T]."""
    return np.random.default_rng(seed).integers(1, T + 1, size=B).astype(np.int64)


class _Timed:
    def __init__(self, name, fn):
        self.name, self.run = name, fn


def _torch_packed(cell, weights, x, dy, lengths, mode):
    """A closure running torch on packed sequences (None if lengths is None)."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T, B, I = x.shape
    H = weights["weight_hh_l0"].shape[1]
    tdtype = torch.float32 if x.dtype == np.float32 else torch.float64
    kwargs = {"nonlinearity": cell.split("_", 1)[1]} if cell.startswith("rnn") else {}
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell, torch.nn.RNN)
    m = cls(I, H, dtype=tdtype, **kwargs)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    xt = torch.from_numpy(x.copy())
    dyt = torch.from_numpy(dy.copy())
    lt = torch.from_numpy(np.asarray(lengths, dtype=np.int64))

    def run():
        if mode == "train":
            for p in m.parameters():
                p.grad = None
            xr = xt.detach().requires_grad_(True)
            packed = pack_padded_sequence(xr, lt, enforce_sorted=False)
            out, _ = m(packed)
            y, _ = pad_packed_sequence(out, total_length=T)
            y.backward(dyt)
        else:
            with torch.inference_mode():
                packed = pack_padded_sequence(xt, lt, enforce_sorted=False)
                out, _ = m(packed)
                pad_packed_sequence(out, total_length=T)
    return run


def lengths_report(cells, configs, modes, peers=(), dtype="float32", repeats=None, seed=0,
                   progress=None, budget=None):
    """Full against mixed lengths for each cell, mode and config (B > 1 only).
    budget: seconds of timing for the whole report, shared evenly by its rows
    (default: 6 s a row, 12 with torch)."""
    import fastrnn
    from fastrnn.benchmark.timing import time_interleaved
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = []
    for (I, H, T, B) in configs:
        if B < 2:
            progress(f"lengths: skipping B={B} (needs a batch)")
            continue
        lengths = mixed_lengths(T, B, seed)
        full = np.full(B, T, dtype=np.int64)
        for cell in cells:
            weights = common.make_weights(cell, I, H, 1, False, np.dtype(dtype), seed=seed)
            w = tuple(weights[k + "_l0"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            x, dy = common.make_inputs(I, H, T, B, 1, np.dtype(dtype), seed=seed + 1)
            for mode in modes:
                row = {"cell": cell, "mode": mode, "I": I, "H": H, "T": T, "B": B,
                       "dtype": dtype, "length_ratio": float(lengths.sum()) / (B * T)}

                def call(lens):
                    return lambda: common.kernel_run(fastrnn.functional, cell, mode, x, w, dy,
                                                     lengths=lens)
                # check once: fastrnn with mixed lengths against the NumPy reference
                got = common.kernel_run(fastrnn.functional, cell, mode, x, w, dy,
                                        lengths=lengths)
                want = common.kernel_run(fastrnn.reference, cell, mode, x, w, dy,
                                         lengths=lengths)
                ok, key, err, _ = common.compare(got, want, common.TOLERANCE[np.dtype(dtype)])
                row.update(check_ok=ok, max_rel_err=err)
                if not ok:
                    progress(f"lengths {cell} {mode}: MISMATCH against the reference: "
                             f"max rel err {err:.3g} in {key!r}")
                engines = [_Timed("full", call(full)), _Timed("mixed", call(lengths))]
                if "torch" in peers:
                    engines += [_Timed(f"torch_{kind}",
                                       _torch_packed(cell, weights, x, dy, lens, mode))
                                for kind, lens in (("full", full), ("mixed", lengths))]
                for e in engines:
                    e.run()
                n_rows = len(cells) * len(modes) * sum(1 for c in configs if c[3] >= 2)
                row_budget = (6.0 * (1 + ("torch" in peers)) if budget is None
                              else budget / max(1, n_rows))
                timed = time_interleaved(engines, row_budget, repeats, warmup=1)
                row["ms_full"] = timed["full"][0] * 1e3
                row["ms_mixed"] = timed["mixed"][0] * 1e3
                row["time_ratio"] = row["ms_mixed"] / row["ms_full"]
                row["efficiency"] = row["length_ratio"] / row["time_ratio"]
                if "torch" in peers:
                    row["torch_ms_full"] = timed["torch_full"][0] * 1e3
                    row["torch_ms_mixed"] = timed["torch_mixed"][0] * 1e3
                    row["torch_time_ratio"] = row["torch_ms_mixed"] / row["torch_ms_full"]
                rows.append(row)
                progress(f"lengths {cell} {mode}: time ratio {row['time_ratio']:.2f}, "
                         f"length ratio {row['length_ratio']:.2f}")
    return rows


def format_lengths(rows):
    if not rows:
        return "lengths: nothing measured"
    torch_cols = "torch_time_ratio" in rows[0]
    head = (f"{'cell':<9}{'mode':<9}{'I':>5}{'H':>6}{'T':>5}{'B':>5}{'full ms':>10}"
            f"{'mixed ms':>10}{'time ratio':>12}{'len ratio':>11}{'efficiency':>12}")
    if torch_cols:
        head += f"{'torch ratio':>13}"
    lines = ["Mixed lengths (uniform in [1, T]) against all lengths T, fastrnn.functional",
             head]
    for r in rows:
        line = (f"{r['cell']:<9}{r['mode']:<9}{r['I']:>5}{r['H']:>6}{r['T']:>5}{r['B']:>5}"
                f"{r['ms_full']:>10.2f}{r['ms_mixed']:>10.2f}{r['time_ratio']:>12.2f}"
                f"{r['length_ratio']:>11.2f}{r['efficiency']:>12.2f}")
        if torch_cols:
            line += f"{r['torch_time_ratio']:>13.2f}"
        if not r.get("check_ok", True):
            line += "  MISMATCH vs reference"
        lines.append(line)
    lines.append("time ratio = mixed ms / full ms; len ratio = sum(lengths) / (B*T); "
                 "efficiency = len ratio / time ratio (1.0: cost follows the sum of lengths)")
    return "\n".join(lines)
