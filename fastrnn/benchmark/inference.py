"""Inference reports of the runner (issue 10): ``--quantize`` and ``--mode stream``.

``quantize_report``: fastrnn float32 / int8 / bfloat16 against torch's
``quantize_dynamic`` int8 (LSTM and GRU; torch has no dynamically quantised
``nn.RNN``, so the RNN rows have no torch peer) and ONNX Runtime float32, on the
same torch-layout weights and inputs (``common.make_weights`` /
``make_inputs``), interleaved, medians. Each row gives the ratios the issue
targets and the max abs output error against fastrnn float32 of fastrnn int8,
fastrnn bf16 and torch int8.

``stream_report``, four parts:

* ``pool``: ``StreamPool.step`` over 64 of 1024 open streams (one frame each)
  against a plain batch-64 call of the float module with the state passed in,
  and against the same call of the packed float32 copy (the pool's kernel).
* ``audio``: an LSTM with I = 1, H = 32 fed chunks of 64 samples with the
  state carried (fastrnn module, fastrnn StreamPool, ONNX Runtime with the
  state as model inputs); samples/s.
* ``overhead``: an eval call at batch 1 (T = 4 for layers, one step for cells),
  H = I = 32, against the kernel call alone with every array prepared
  (``fastrnn._fastpath.kernel_only``); the difference is the Python overhead.
* ``generate``: tokens/s of ``fastrnn.generate.generate_ids`` (one sequence,
  batch 1) against a plain torch ``nn.Embedding`` + ``nn.LSTM`` + ``nn.Linear``
  loop on the same weights, both sampling at temperature 1.

Every timed engine is checked against fastrnn float32 before timing.
"""

import time
import warnings

import numpy as np

from fastrnn.benchmark import common

__all__ = ["QUANT_GRID", "quantize_report", "format_quantize", "stream_report",
           "format_stream", "TARGETS"]

#: (I, H, T, B) rows of --quantize without -I/-H/-T/-B.
QUANT_GRID = tuple((512, 512, 50, B) for B in (1, 2, 4, 8, 16, 64)) + ((1024, 1024, 25, 1),)

#: The issue's targets (ratios: above is better; overhead: below).
TARGETS = {"int8_vs_torch_int8": 1.2, "int8_vs_f32_small_batch": 2.0,
           "bf16_vs_f32_small_batch": 1.6, "large_batch_vs_f32": 1.0,
           "pool_vs_plain": 1.1, "audio_vs_ort": 1.5, "overhead_us": 3.0,
           "generate_vs_torch": 3.0}
SMALL_BATCH = 8   # "batch 1-8" of the targets

_LAYER = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


class _Engine:
    """A named zero-argument call, as runner.time_interleaved wants."""

    def __init__(self, name, fn):
        self.name, self._fn, self.out = name, fn, None

    def run(self):
        self.out = self._fn()


def _time(engines, budget, repeats, min_sample):
    from fastrnn.benchmark.timing import time_interleaved
    first = {}
    for e in engines:
        t0 = time.perf_counter()
        e.run()
        first[e.name] = time.perf_counter() - t0
    return time_interleaved(engines, budget, repeats, 1, min_sample, first)


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _fastrnn_module(cell, I, H, weights):
    import fastrnn
    kw = {"nonlinearity": cell.split("_", 1)[1]} if cell.startswith("rnn") else {}
    m = getattr(fastrnn, _LAYER[cell])(I, H, **kw)
    m.load_state_dict(weights)
    return m.eval()


def _torch_module(cell, I, H, weights, tdtype=None):
    import torch
    kw = {"nonlinearity": cell.split("_", 1)[1]} if cell.startswith("rnn") else {}
    m = getattr(torch.nn, _LAYER[cell])(I, H, **kw)
    m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    return m.eval()


def _ort_session(cell, weights, I, H, T, B, threads, with_state=False):
    import onnxruntime as ort
    from fastrnn.benchmark.onnx_model import build_model
    model = build_model(cell, weights, I, H, T, B, 1, False, np.float32, with_state=with_state)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------
# --quantize
# ---------------------------------------------------------------------------

def _target(value, target, applies=True, below=False):
    if value is None or not applies:
        return None
    return {"value": value, "target": target,
            "met": bool(value <= target if below else value >= target)}


def quantize_report(cells, configs, dtypes, peers, threads, budget, repeats=None, seed=0,
                    progress=print):
    """One row per (cell, config): ms per engine, ratios against the targets, errors."""
    import fastrnn
    rows = []
    weights_of = [c[0] * c[1] * c[2] * c[3] + c[1] * c[1] * c[2] * c[3] for c in configs] * len(cells)
    total_w = float(sum(weights_of)) or 1.0
    index = 0
    for cell in cells:
        for (I, H, T, B) in configs:
            case_budget = budget * weights_of[index] / total_w
            index += 1
            tag = f"{cell} I={I} H={H} T={T} B={B}"
            w = common.make_weights(cell, I, H, seed=seed)
            x, _ = common.make_inputs(I, H, T, B, seed=seed + 1)
            m = _fastrnn_module(cell, I, H, w)
            engines = [_Engine("fastrnn f32", lambda m=m: m(x)[0])]
            modes = {}
            for dt in dtypes:
                q = fastrnn.quantize(m, dt)
                modes[dt] = "dynamic" if q._dyn(B) else "weight_only"   # what "auto" ran
                engines.append(_Engine(f"fastrnn {dt}", lambda q=q: q(x)[0]))
            notes = []
            if "torch" in peers:
                if cell in ("lstm", "gru"):
                    import torch
                    tm = torch.nn.Sequential(_torch_module(cell, I, H, w))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        tq = torch.ao.quantization.quantize_dynamic(
                            tm, {type(tm[0]), torch.nn.Linear}, dtype=torch.qint8)
                    xt = torch.from_numpy(x)

                    def torch_int8(tq=tq, xt=xt):
                        with torch.inference_mode():
                            return tq(xt)[0].numpy()
                    engines.append(_Engine("torch int8", torch_int8))
                else:
                    notes.append("torch has no dynamically quantised nn.RNN: no torch int8 peer")
            if "onnxruntime" in peers:
                sess = _ort_session(cell, w, I, H, T, B, threads)
                engines.append(_Engine("onnxruntime f32",
                                       lambda sess=sess: sess.run(None, {"X": x})[0]))
            timed = _time(engines, case_budget, repeats, 0.02)
            ref = next(e for e in engines if e.name == "fastrnn f32").out
            ms = {e.name: 1e3 * timed[e.name][0] for e in engines}
            err = {e.name: _max_abs(e.out, ref) for e in engines if e.name != "fastrnn f32"}
            ort_ok = None
            if "onnxruntime f32" in err:
                ort_ok = common.max_rel_err(engines[-1].out, ref) <= common.TOLERANCE[
                    np.dtype(np.float32)]
                if not ort_ok:
                    notes.append(f"onnxruntime differs from fastrnn f32 (max abs "
                                 f"{err['onnxruntime f32']:.2g})")
            f32 = ms["fastrnn f32"]
            i8, bf, t8 = ms.get("fastrnn int8"), ms.get("fastrnn bfloat16"), ms.get("torch int8")
            small = B <= SMALL_BATCH
            ratios = {
                "int8_vs_torch_int8": t8 / i8 if (i8 and t8) else None,
                "int8_vs_f32": f32 / i8 if i8 else None,
                "bf16_vs_f32": f32 / bf if bf else None,
                "int8_vs_onnxruntime_f32": ms["onnxruntime f32"] / i8
                if (i8 and "onnxruntime f32" in ms) else None,
            }
            targets = {
                "int8_vs_torch_int8": _target(ratios["int8_vs_torch_int8"],
                                              TARGETS["int8_vs_torch_int8"]),
                "int8_vs_f32": _target(ratios["int8_vs_f32"],
                                       TARGETS["int8_vs_f32_small_batch"] if small
                                       else TARGETS["large_batch_vs_f32"]),
                "bf16_vs_f32": _target(ratios["bf16_vs_f32"],
                                       TARGETS["bf16_vs_f32_small_batch"] if small
                                       else TARGETS["large_batch_vs_f32"]),
            }
            if "fastrnn int8" in err and "torch int8" in err:
                targets["int8_error_below_torch"] = {
                    "value": err["fastrnn int8"], "target": err["torch int8"],
                    "met": bool(err["fastrnn int8"] < err["torch int8"])}
            row = {"cell": cell, "I": I, "H": H, "T": T, "B": B, "threads": threads, "ms": ms,
                   "modes": modes, "quantized_isa": fastrnn.quantization.isa(),
                   "max_abs_err_vs_f32": err, "ratios": ratios,
                   "targets": {k: v for k, v in targets.items() if v is not None},
                   "repeats": {k: v[1] for k, v in timed.items()}, "notes": notes,
                   "onnxruntime_agrees": ort_ok}
            rows.append(row)
            progress(f"[quantize] {tag}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
            for n in notes:
                progress(f"[quantize] {tag}: {n}")
    return rows


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _mark(t):
    return "" if t is None else (" ok" if t["met"] else " MISS")


def format_quantize(rows):
    """One line per row: ms of each engine, the three target ratios (marked ok/MISS), errors."""
    if not rows:
        return "--quantize: no rows"
    engines = []
    for r in rows:
        for k in r["ms"]:
            if k not in engines:
                engines.append(k)
    head = ["cell", "I", "H", "T", "B"] + [f"{e} ms" for e in engines] + [
        "int8/torch8", "int8/f32", "bf16/f32", "err int8", "err bf16", "err torch8"]
    lines = []
    for r in rows:
        t = r["targets"]
        e = r["max_abs_err_vs_f32"]
        cells = [r["cell"], str(r["I"]), str(r["H"]), str(r["T"]), str(r["B"])]
        cells += [_fmt(r["ms"].get(k), ".3f") for k in engines]
        cells += [_fmt(r["ratios"]["int8_vs_torch_int8"]) + _mark(t.get("int8_vs_torch_int8")),
                  _fmt(r["ratios"]["int8_vs_f32"]) + _mark(t.get("int8_vs_f32")),
                  _fmt(r["ratios"]["bf16_vs_f32"]) + _mark(t.get("bf16_vs_f32")),
                  _fmt(e.get("fastrnn int8"), ".1e") + _mark(t.get("int8_error_below_torch")),
                  _fmt(e.get("fastrnn bfloat16"), ".1e"), _fmt(e.get("torch int8"), ".1e")]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    modes = sorted({f"{dt} {md}" for r in rows for dt, md in r.get("modes", {}).items()})
    if modes:
        out.append(f"mode 'auto' ran: {', '.join(modes)} (quantised ISA "
                   f"{rows[0].get('quantized_isa')}); bfloat16 dynamic rounds the GEMM inputs "
                   f"to bf16 too (vdpbf16ps)")
    out.append(f"ratios = other ms / fastrnn ms (above 1: the fastrnn copy is faster); targets: "
               f"int8 >= {TARGETS['int8_vs_torch_int8']}x torch int8 at every batch, int8 >= "
               f"{TARGETS['int8_vs_f32_small_batch']}x and bf16 >= "
               f"{TARGETS['bf16_vs_f32_small_batch']}x fastrnn f32 at B <= {SMALL_BATCH}, "
               f"neither slower than f32 above; err = max abs output error vs fastrnn f32 on "
               f"the same weights and inputs (int8 marked ok when below torch int8's)")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# --mode stream
# ---------------------------------------------------------------------------

def _pool_part(cells, I, H, threads, budget, repeats, seed, n=64, capacity=1024):
    import fastrnn
    rows = []
    for cell in cells:
        w = common.make_weights(cell, I, H, seed=seed)
        m = _fastrnn_module(cell, I, H, w)
        packed = fastrnn.quantize(m, "float32")
        pool = fastrnn.StreamPool(m, capacity)
        ids = [pool.open() for _ in range(capacity)]
        sub = np.array(ids[::capacity // n][:n], dtype=np.intp)
        rng = np.random.default_rng(seed + 1)
        x = rng.uniform(-1, 1, (n, I)).astype(np.float32)
        x3 = x[None]
        lstm = cell == "lstm"
        h = np.zeros((1, n, H), np.float32)
        state = (h, h.copy()) if lstm else h
        # check: the first step of fresh streams is the module's first step from zeros
        got = pool.step(sub, x)
        want = m(x3, state)[0][0]
        ok = common.max_rel_err(got, want) <= 1e-4
        engines = [_Engine("pool step", lambda: pool.step(sub, x)),
                   _Engine("module call", lambda: m(x3, state)),
                   _Engine("packed f32 call", lambda: packed(x3, state))]
        timed = _time(engines, budget / len(cells), repeats, 0.05)
        us = {e.name: 1e6 * timed[e.name][0] for e in engines}
        ratio = us["pool step"] / us["module call"]
        rows.append({"part": "pool", "cell": cell, "I": I, "H": H, "streams_open": capacity,
                     "streams_stepped": n, "us": us, "check_ok": bool(ok),
                     "ratio_vs_module": ratio,
                     "ratio_vs_packed": us["pool step"] / us["packed f32 call"],
                     "target": _target(ratio, TARGETS["pool_vs_plain"], below=True)})
    return rows


def _audio_part(peers, threads, budget, repeats, seed, chunk=64, chunks=40, H=32):
    import fastrnn
    cell, I = "lstm", 1
    w = common.make_weights(cell, I, H, seed=seed)
    m = _fastrnn_module(cell, I, H, w)
    rng = np.random.default_rng(seed + 1)
    signal = np.sin(np.arange(chunk * chunks) * 0.05) + 0.1 * rng.standard_normal(chunk * chunks)
    xs = [np.ascontiguousarray(signal[k * chunk:(k + 1) * chunk].reshape(chunk, 1, 1),
                               dtype=np.float32) for k in range(chunks)]

    def run_module():
        st = None
        for c in xs:
            y, st = m(c, st)
        return y

    pool = fastrnn.StreamPool(m, 1)
    sid = pool.open()

    def run_pool():
        pool.reset(sid)
        for c in xs:
            y = pool.step([sid], c)
        return y

    engines = [_Engine("fastrnn module", run_module), _Engine("fastrnn StreamPool", run_pool)]
    if "onnxruntime" in peers:
        sess = _ort_session(cell, w, I, H, chunk, 1, threads, with_state=True)
        zero = np.zeros((1, 1, H), np.float32)

        def run_ort():
            h, c = zero, zero
            for x in xs:
                y, h, c = sess.run(None, {"X": x, "h0": h, "c0": c})
            return y
        engines.append(_Engine("onnxruntime", run_ort))
    timed = _time(engines, budget, repeats, 0.05)
    ref = engines[0].out
    checks = {e.name: bool(common.max_rel_err(e.out, ref) <= 1e-4) for e in engines[1:]}
    sps = {e.name: chunk * chunks / timed[e.name][0] for e in engines}
    ratio = sps["fastrnn module"] / sps["onnxruntime"] if "onnxruntime" in sps else None
    return [{"part": "audio", "cell": cell, "I": I, "H": H, "chunk": chunk, "chunks": chunks,
             "samples_per_s": sps, "checks_ok": checks, "ratio_vs_onnxruntime": ratio,
             "ratio_pool_vs_onnxruntime": (sps["fastrnn StreamPool"] / sps["onnxruntime"]
                                           if ratio else None),
             "target": _target(ratio, TARGETS["audio_vs_ort"])}]


def _overhead_part(cells, budget, repeats, seed, H=32, I=32, T=4):
    import fastrnn
    from fastrnn import _fastpath
    rows = []
    kinds = []
    for cell in cells:
        kinds += [(cell, "layer"), (cell, "cell")]
    for cell, kind in kinds:
        kw = {"nonlinearity": cell.split("_", 1)[1]} if cell.startswith("rnn") else {}
        name = _LAYER[cell] + ("Cell" if kind == "cell" else "")
        m = getattr(fastrnn, name)(I, H, seed=seed, **kw).eval()
        rng = np.random.default_rng(seed)
        x = rng.uniform(-1, 1, (1, I) if kind == "cell" else (T, 1, I)).astype(np.float32)
        kernel = _fastpath.kernel_only(m, x)
        engines = [_Engine("call", lambda m=m, x=x: m(x)), _Engine("kernel", kernel)]
        timed = _time(engines, budget / len(kinds), repeats, 0.05)
        call_us, kern_us = 1e6 * timed["call"][0], 1e6 * timed["kernel"][0]
        over = call_us - kern_us
        rows.append({"part": "overhead", "cell": cell, "kind": kind, "I": I, "H": H,
                     "T": 1 if kind == "cell" else T, "B": 1, "call_us": call_us,
                     "kernel_us": kern_us, "overhead_us": over,
                     "target": _target(over, TARGETS["overhead_us"], below=True)})
    return rows


def _generate_part(peers, threads, budget, repeats, seed, V=65, E=64, H=512, length=200):
    if "torch" not in peers:   # not installed, or left out with --peers
        return [{"part": "generate", "skipped": "torch is not among the peers"}]
    import torch
    import fastrnn
    from fastrnn.generate import generate_ids
    lm = fastrnn.RNNLanguageModel(V, E, H, cell="lstm", seed=seed).eval()
    sd = {k: torch.from_numpy(v.copy()) for k, v in lm.state_dict().items()}

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Embedding(V, E)
            self.rnn = torch.nn.LSTM(E, H)
            self.decoder = torch.nn.Linear(H, V)

    tm = TorchLM()
    tm.load_state_dict(sd)
    tm.eval()
    prime = np.array([1, 2, 3], np.int64)

    def torch_generate(n=length, greedy=False):
        g = torch.Generator().manual_seed(seed)
        out = []
        with torch.inference_mode():
            out_t, st = tm.rnn(tm.encoder(torch.from_numpy(prime)[:, None]))
            logits = tm.decoder(out_t[-1, 0])
            for _ in range(n):
                if greedy:
                    nxt = int(logits.argmax())
                else:
                    nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
                out.append(nxt)
                if len(out) == n:   # the last token needs no step (nor does fastrnn's)
                    break
                o, st = tm.rnn(tm.encoder(torch.tensor([[nxt]])), st)
                logits = tm.decoder(o[0, 0])
        return out

    # check on greedy decoding: same weights, so the same first tokens
    ours = generate_ids(lm, prime, 20, greedy=True).tolist()
    theirs = torch_generate(20, greedy=True)
    agree = sum(1 for a, b in zip(ours, theirs) if a == b)
    engines = [_Engine("fastrnn", lambda: generate_ids(lm, prime, length, seed=seed)),
               _Engine("torch", lambda: torch_generate())]
    timed = _time(engines, budget, repeats, 0.05)
    tps = {e.name: length / timed[e.name][0] for e in engines}
    ratio = tps["fastrnn"] / tps["torch"]
    return [{"part": "generate", "cell": "lstm", "V": V, "E": E, "H": H, "tokens": length,
             "tokens_per_s": tps, "greedy_tokens_equal": f"{agree}/20",
             "ratio_vs_torch": ratio, "target": _target(ratio, TARGETS["generate_vs_torch"])}]


def stream_report(cells, peers, threads, budget, repeats=None, seed=0, pool_size=(256, 256),
                  audio_chunks=40, gen_hidden=512, gen_length=200, progress=print):
    """The four parts (pool, audio, overhead, generate) as a list of row dicts."""
    rows = []
    share = budget / 4.0
    I, H = pool_size
    for part, fn in (("pool", lambda: _pool_part(cells, I, H, threads, share, repeats, seed)),
                     ("audio", lambda: _audio_part(peers, threads, share, repeats, seed,
                                                   chunks=audio_chunks)),
                     ("overhead", lambda: _overhead_part(cells, share, repeats, seed)),
                     ("generate", lambda: _generate_part(peers, threads, share, repeats, seed,
                                                         H=gen_hidden, length=gen_length))):
        try:
            got = fn()
        except Exception as exc:  # one part failing must not lose the others
            got = [{"part": part, "error": f"{type(exc).__name__}: {exc}"}]
        for r in got:
            progress(f"[stream] {part}: " + _describe(r))
        rows += got
    return rows


def _describe(r):
    if "error" in r or "skipped" in r:
        return r.get("error") or f"skipped ({r['skipped']})"
    t = r.get("target")
    mark = "" if t is None else (" (target met)" if t["met"] else " (target MISSED)")
    if r["part"] == "pool":
        return (f"{r['cell']} I={r['I']} H={r['H']}: pool step over {r['streams_stepped']} of "
                f"{r['streams_open']} streams {r['us']['pool step']:.1f} us, plain batch-"
                f"{r['streams_stepped']} module call {r['us']['module call']:.1f} us, packed "
                f"float32 call {r['us']['packed f32 call']:.1f} us; ratio "
                f"{r['ratio_vs_module']:.2f} (vs packed {r['ratio_vs_packed']:.2f}), target <= "
                f"{TARGETS['pool_vs_plain']}{mark}" + ("" if r["check_ok"] else " CHECK FAILED"))
    if r["part"] == "audio":
        s = r["samples_per_s"]
        ratio = r["ratio_vs_onnxruntime"]
        return (f"LSTM I=1 H={r['H']}, {r['chunks']} chunks of {r['chunk']} samples, state "
                f"carried: " + ", ".join(f"{k} {v / 1e3:,.0f}k samples/s" for k, v in s.items())
                + (f"; fastrnn/ORT {ratio:.2f}, target >= {TARGETS['audio_vs_ort']}{mark}"
                   if ratio else "; no ONNX Runtime peer")
                + ("" if all(r["checks_ok"].values()) else " CHECK FAILED"))
    if r["part"] == "overhead":
        return (f"{r['cell']} {r['kind']} B=1 T={r['T']} H={r['H']}: call {r['call_us']:.2f} us, "
                f"kernel alone {r['kernel_us']:.2f} us, Python overhead "
                f"{r['overhead_us']:.2f} us, target <= {TARGETS['overhead_us']}{mark}")
    tps = r["tokens_per_s"]
    return (f"LSTM LM V={r['V']} E={r['E']} H={r['H']}, one sequence at batch 1: fastrnn "
            f"{tps['fastrnn']:,.0f} tokens/s, torch {tps['torch']:,.0f} tokens/s, ratio "
            f"{r['ratio_vs_torch']:.2f}, target >= {TARGETS['generate_vs_torch']}{mark}; greedy "
            f"tokens equal {r['greedy_tokens_equal']}")


def format_stream(rows):
    return "\n".join(f"{r['part']:<9} " + _describe(r) for r in rows)
