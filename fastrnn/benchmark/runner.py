"""Side-by-side benchmark: fastrnn against PyTorch CPU and ONNX Runtime.

Run it as ``fastrnn bench``, ``python -m bench`` (from a checkout) or
``python -m fastrnn.benchmark.runner``; ``--help`` lists the options and
docs/benchmarks.md explains the method. In short:

* Every engine gets the same weights and input; each peer's result is checked
  against fastrnn's once before anything is timed (a mismatch is reported and
  makes the exit status 1).
* Engines are timed in one process, interleaved: each repetition runs every
  engine once, in a rotating order, so that a noisy neighbour or a change of
  clock speed hits all of them alike. The reported time is the median over the
  repetitions, after a warm-up call. Fast calls are repeated inside one sample
  so that each sample lasts at least a few milliseconds.
* All engines use the same number of threads (``fastrnn.set_num_threads``,
  ``torch.set_num_threads``, ORT's ``intra_op_num_threads`` and, for NumPy's
  BLAS, threadpoolctl).
* Repetitions are budgeted by time (``--budget``): each case gets a share of the
  remaining budget in proportion to its FLOP count.
* GFLOP/s counts 2*T*B*G*H*(I+H) per layer and direction for a forward pass and
  three times that for forward+backward; "% peak" relates it to the machine's
  sgemm peak, measured as a 2048x2048 NumPy matmul with the same threads, in the
  run's dtype (float64 runs: dgemm).
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

from fastrnn._argtypes import nonneg_int, positive_float, positive_int, thread_count
from fastrnn.benchmark import common
from fastrnn.benchmark.engines import ENGINES, Case, EngineUnavailable, available_peers
from fastrnn.benchmark.timing import (MIN_SAMPLE_DEFAULT, machine_load,
                                      MAX_ROUNDS, MIN_ROUNDS, measure_sgemm_peak, set_threads,
                                      time_interleaved)

__all__ = ["main", "build_parser", "measure_sgemm_peak", "run_cases", "format_table"]

PEERS = ("torch", "onnxruntime")
DEFAULT_BUDGET = 330.0      # seconds of timing for the default run (< 10 min in all, quiet gaps included)
CASE_MIN_FLOP = 2e9   # budget floor per case (see run_cases)
MIN_SAMPLE = {"step": 0.05}  # seconds one sample should last, by mode
CELL_ALIASES = {"rnn": "rnn_tanh", "tanh": "rnn_tanh", "relu": "rnn_relu"}


def _log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def _csv(choices, aliases=None, allow_all=True):
    def parse(text):
        items = []
        for item in text.replace(" ", "").split(","):
            if not item:
                continue
            item = (aliases or {}).get(item, item)
            if allow_all and item == "all":
                items.extend(c for c in choices if c not in items)
                continue
            if item not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {item!r} (choose from {', '.join(choices)})")
            if item not in items:
                items.append(item)
        if not items:
            raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(choices)}")
        return items
    return parse


def _peers_arg(text):
    if text.strip().lower() in ("", "none"):
        return []
    return _csv(PEERS)(text)


def build_parser():
    p = argparse.ArgumentParser(
        prog="fastrnn bench",
        description="Time fastrnn against PyTorch CPU and ONNX Runtime, side by side "
                    "(same weights, same threads, interleaved repetitions).",
        epilog="Without any of -I/-H/-T/-B the whole config grid runs: "
               + "  ".join("(%d,%d,%d,%d)" % c[:4] + ("" if len(c) == 4 else
                    " bidirectional" if c[5] else f" {c[4]} layers") for c in common.GRID)
               + " as (I,H,T,B). Giving some of them runs one config, the rest taken "
               "from (256,256,100,64). --memory, --lengths and --quantize alone (no "
               "--mode) run only those reports. `fastrnn bench --onnx FILE.onnx` times an "
               "ONNX file imported into fastrnn against ONNX Runtime instead (its own "
               "options: fastrnn bench --onnx FILE --help).")
    p.add_argument("--cell", type=_csv(common.CELLS + ("rnn_relu",), CELL_ALIASES),
                   default=None,
                   help="comma-separated cells: rnn_tanh (alias rnn), lstm, gru, rnn_relu, "
                        "or all (default: rnn_tanh,lstm,gru; lstm,gru for --quantize)")
    p.add_argument("-I", "--input-size", type=positive_int, help="input features I")
    p.add_argument("-H", "--hidden-size", type=positive_int, help="hidden units H")
    p.add_argument("-T", "--seq-len", type=positive_int, help="time steps T")
    p.add_argument("-B", "--batch", type=positive_int, help="batch size B")
    p.add_argument("--layers", type=positive_int, default=1, help="stacked layers (default 1)")
    p.add_argument("--bidirectional", action="store_true", help="bidirectional layers")
    p.add_argument("--mode", type=_csv(("forward", "train", "step", "stream")), default=None,
                   help="comma-separated: forward (inference), train (forward+backward), "
                        "step (batch-1 single-step latency of the cells), stream (StreamPool "
                        "vs a plain batch-64 call, streaming audio vs ONNX Runtime, per-call "
                        "Python overhead, generation vs torch) (default: forward,train)")
    p.add_argument("--quantize", type=_csv(("int8", "bfloat16"), {"bf16": "bfloat16"}),
                   default=None, metavar="DTYPES",
                   help="quantised inference report: fastrnn float32 and DTYPES (int8, "
                        "bfloat16) against torch's quantize_dynamic int8 and ONNX Runtime "
                        "float32, batch 1-64 at I=H=512 T=50 and H=1024 T=25 B=1 (or the "
                        "config given by -I/-H/-T/-B), with the issue-10 targets and max abs "
                        "output errors")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=thread_count, default=2,
                   help="threads for every engine (default 2)")
    p.add_argument("--peers", type=_peers_arg, default=None,
                   help="comma-separated peers among torch,onnxruntime, or none "
                        "(default: those installed)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repetitions per case (default: as many as the time "
                        f"budget allows, {MIN_ROUNDS} to {MAX_ROUNDS})")
    p.add_argument("--warmup", type=nonneg_int, default=1,
                   help="untimed warm-ups per engine after the check call, each as many calls "
                        "as fill a sample's minimum time (at least one); the last sizes "
                        "the samples (default 1)")
    p.add_argument("--budget", type=positive_float, default=None,
                   help=f"seconds to spend timing when --repeats is not given "
                        f"(default {DEFAULT_BUDGET:.0f})")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking the peers' results against fastrnn's")
    p.add_argument("--memory", action="store_true",
                   help="report peak memory of one call on the largest config")
    p.add_argument("--lengths", action="store_true",
                   help="mixed-lengths report: time with lengths uniform in [1, T] "
                        "against all lengths T")
    p.add_argument("--stream-chunks", type=positive_int, default=40, metavar="N",
                   help="--mode stream: chunks of 64 samples per timed audio run (default 40)")
    p.add_argument("--gen-hidden", type=positive_int, default=512, metavar="H",
                   help="--mode stream: hidden size of the generation LSTM (default 512, "
                        "the quality benchmark's)")
    p.add_argument("--gen-length", type=positive_int, default=200, metavar="N",
                   help="--mode stream: tokens generated per timed run (default 200)")
    p.add_argument("--json", action="store_true",
                   help="print every result as one JSON object on the last line")
    p.add_argument("--plot", metavar="OUT.png", help="draw GFLOP/s per case (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--sgemm-size", type=positive_int, default=2048, metavar="N",
                   help="size of the matmul (in --dtype) measuring the peak (default 2048)")
    return p


def _configs(args):
    given = (args.input_size, args.hidden_size, args.seq_len, args.batch)
    if all(v is None for v in given):
        return list(common.GRID), False
    return [tuple(d if v is None else v for v, d in zip(given, common.DEFAULT_CONFIG))], True


def _cases(args, configs, explicit=True):
    cases = []
    for mode in args.mode:
        if mode == "step":
            seen = list(common.STEP_SIZES) if not explicit else []
            for (I, H, *_rest) in configs if explicit else ():
                if (I, H) not in seen:
                    seen.append((I, H))
            for cell in args.cell:
                for I, H in seen:
                    cases.append(Case(cell, "step", I, H, 1, 1, 1, False, args.dtype, args.seed))
            continue
        for cell in args.cell:
            for config in configs:
                I, H, T, B = config[:4]
                layers, bidir = config[4:] if len(config) > 4 else (args.layers,
                                                                     args.bidirectional)
                cases.append(Case(cell, mode, I, H, T, B, layers, bidir, args.dtype, args.seed))
    return cases


def _record(engine, case, seconds, rounds, number, sgemm, threads):
    gflops = case.flops / seconds / 1e9
    return {"engine": engine, "cell": case.cell, "mode": case.mode,
            "I": case.I, "H": case.H, "T": case.T, "B": case.B,
            "layers": case.layers, "bidirectional": case.bidirectional, "dtype": case.dtype,
            "threads": threads, "ms": seconds * 1e3, "gflops": gflops,
            "pct_peak": 100.0 * gflops / sgemm if sgemm else None,
            "repeats": rounds, "calls_per_sample": number}


def run_cases(cases, peers, threads, sgemm, budget, repeats=None, warmup=1, check=True,
              progress=_log):
    """Check and time every case. Returns (results, errors, checks)."""
    results, errors, checks = [], [], []
    # each case's share of the time budget: its FLOPs times the number of engines
    # that can run it, with a floor of CASE_MIN_FLOP: a round of a small case
    # costs the quiet gaps (~0.15 s per engine) whatever its FLOPs, and with only
    # the FLOPs' share the small-batch rows got 3 rounds, so one disturbed second
    # of a shared host decided their median
    weights_of = [max(c.flops, CASE_MIN_FLOP) * (1 + sum(1 for p in peers if not (
        p == "onnxruntime" and (c.mode == "train" or c.dtype != "float32")))) for c in cases]
    start = time.perf_counter()
    for index, case in enumerate(cases):
        tag = f"[{index + 1}/{len(cases)}] {case.label()}"
        weights, x, dy, h0, c0 = case.make_data()
        engines, check_time = [], {}
        for name in ["fastrnn"] + list(peers):
            cls = ENGINES[name]
            kwargs = {"threads": threads} if name == "onnxruntime" else {}
            try:
                engine = cls(case, weights, x, dy, h0, c0, **kwargs)
                t0 = time.perf_counter()
                engine.run()  # the check call, also the first warm-up
                check_time[name] = time.perf_counter() - t0
            except EngineUnavailable as exc:
                if name == "fastrnn":
                    errors.append({"engine": name, "case": case.label(), "error": str(exc)})
                    progress(f"{tag}: fastrnn unavailable: {exc}")
                continue
            except Exception as exc:  # an engine failing must not stop the others
                errors.append({"engine": name, "case": case.label(),
                               "error": f"{type(exc).__name__}: {exc}"})
                progress(f"{tag}: {name} failed: {type(exc).__name__}: {exc}")
                continue
            engines.append(engine)
        ours = next((e for e in engines if e.name == "fastrnn"), None)
        status = {}
        if check and ours is not None:
            want = ours.results()
            tol = common.TOLERANCE[case.np_dtype]
            for e in engines:
                if e is ours:
                    continue
                ok, key, err, n = common.compare(e.results(), want, tol)
                status[e.name] = ("ok" if ok else "mismatch", key, err)
                checks.append({"engine": e.name, "case": case.label(), "cell": case.cell,
                               "mode": case.mode, "ok": ok, "worst_key": key,
                               "max_rel_err": err, "keys_compared": n, "tolerance": tol})
                if not ok:
                    progress(f"{tag}: MISMATCH {e.name} vs fastrnn: max rel err {err:.3g} "
                             f"in {key!r} (tolerance {tol:g}, {n} arrays compared)")
        if not engines:
            continue
        remaining = sum(weights_of[k] for k in range(index, len(cases)))
        left = max(0.0, budget - (time.perf_counter() - start))
        case_budget = left * weights_of[index] / remaining
        # past the budget a case still gets its warm-up and MIN_ROUNDS samples
        # (timing.time_interleaved): the run overruns rather than print rows timed
        # once, from samples sized by each engine's first call
        timed = time_interleaved(engines, case_budget, repeats, warmup,
                                 MIN_SAMPLE.get(case.mode, MIN_SAMPLE_DEFAULT), check_time)
        line = []
        for e in engines:
            seconds, rounds, number, cold = timed[e.name]
            rec = _record(e.name, case, seconds, rounds, number, sgemm, threads)
            rec["cold_ms"] = cold * 1e3 if cold is not None else None
            if e.name == "fastrnn":
                rec["impl"] = e.impl
                rec["frozen"] = e.frozen     # weights as constants (Module.freeze())
            elif e.name in status:
                rec["check"], rec["check_key"], rec["max_rel_err"] = status[e.name]
            results.append(rec)
            line.append(f"{e.name} {rec['ms']:.3f} ms")
        progress(f"{tag}: " + ", ".join(line))
        del engines
    return results, errors, checks


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def _fmt_ms(ms):
    return f"{ms:.4f}" if ms < 1 else f"{ms:.2f}" if ms < 1000 else f"{ms:.0f}"


def format_table(results, peers, sgemm):
    """One row per case: fastrnn's ms, GFLOP/s and % of sgemm peak, then each
    peer's ms, GFLOP/s and ratio (peer ms / fastrnn ms; above 1 fastrnn is faster)."""
    keys, by_case = [], {}
    for r in results:
        key = (r["cell"], r["mode"], r["I"], r["H"], r["T"], r["B"], r.get("layers", 1),
               "2" if r.get("bidirectional") else "1")
        if key not in by_case:
            keys.append(key)
            by_case[key] = {}
        by_case[key][r["engine"]] = r
    header = ["cell", "mode", "I", "H", "T", "B", "L", "D", "fastrnn ms", "GFLOP/s", "% peak"]
    for peer in peers:
        header += [f"{peer} ms", "GFLOP/s", "ratio"]
    rows = []
    for key in keys:
        row = [key[0], key[1]] + [str(v) for v in key[2:]]
        ours = by_case[key].get("fastrnn")
        if ours:
            row += [_fmt_ms(ours["ms"]), f"{ours['gflops']:.1f}",
                    f"{ours['pct_peak']:.1f}" if ours.get("pct_peak") is not None else "-"]
        else:
            row += ["-", "-", "-"]
        for peer in peers:
            r = by_case[key].get(peer)
            if r is None:
                row += ["-", "-", "-"]
                continue
            ratio = f"{r['ms'] / ours['ms']:.2f}" if ours else "-"
            if r.get("check") == "mismatch":
                ratio += "!"
            row += [_fmt_ms(r["ms"]), f"{r['gflops']:.1f}", ratio]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i >= 2 else h.ljust(w)
                       for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    dtype = results[0].get("dtype", "float32") if results else "float32"
    notes = [f"% peak: of {sgemm:.1f} GFLOP/s, a {dtype} NumPy matmul here (its BLAS's "
             f"rate, not the FMA peak: a kernel can pass 100); "
             "ratio = peer ms / fastrnn ms (above 1: fastrnn is faster); "
             "! = peer result differs from fastrnn's; L layers, D directions"]
    return "\n".join(lines + notes)


def plot_results(results, sgemm, path, peers):
    """Bar chart of GFLOP/s per case and engine, one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("forward", "train", "step") if any(r["mode"] == m for r in results)]
    engines = ["fastrnn"] + [p for p in peers if any(r["engine"] == p for r in results)]
    ncases = max(len({(r["cell"], r["I"], r["H"], r["T"], r["B"])
                      for r in results if r["mode"] == m}) for m in modes)
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(8.0, 0.3 * ncases * len(engines) + 2), 3.6 * len(modes)))
    for ax, mode in zip(axes[:, 0], modes):
        rows = [r for r in results if r["mode"] == mode]
        cases = []
        for r in rows:
            key = (r["cell"], r["I"], r["H"], r["T"], r["B"])
            if key not in cases:
                cases.append(key)
        present = [e for e in engines if any(r["engine"] == e for r in rows)]
        width = 0.8 / len(present)
        for k, eng in enumerate(present):
            vals = {(r["cell"], r["I"], r["H"], r["T"], r["B"]): r["gflops"]
                    for r in rows if r["engine"] == eng}
            xs = [i + (k - (len(present) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [vals.get(c, 0.0) for c in cases], width, label=eng,
                   color=f"C{engines.index(eng)}")
        if sgemm:
            ax.axhline(sgemm, color="k", linestyle="--", linewidth=1,
                       label=f"sgemm peak {sgemm:.0f}")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c[0]}\n{c[1]}/{c[2]}/{c[3]}/{c[4]}" for c in cases], fontsize=7)
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"{mode}  (labels: cell, I/H/T/B)")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_header(peers, threads):
    """One line naming what ran: CPU, its vector ISAs, the ISA fastrnn used, versions."""
    import fastrnn
    v = _versions(peers)
    peer_text = ", ".join(f"{p} {v.get(p, '?')}" for p in peers) or "no peers"
    fm = f", {v['cpu_family_model']}" if v.get("cpu_family_model") else ""
    return (f"CPU: {v['cpu']} ({v['cpu_count']} CPUs{fm}; vector ISAs: "
            f"{' '.join(v['cpu_vector_flags']) or 'unknown'}); fastrnn ISA: {v['fastrnn_isa']}"
            f"{' (FASTRNN_ISA)' if os.environ.get('FASTRNN_ISA') else ''}; "
            + ("" if v["fastrnn_pack_cache"] else "weights packed per call (FASTRNN_PACK_CACHE=0); ")
            + f"{threads} thread(s); python {v['python']}, numpy {v['numpy']}, {peer_text}")


def _versions(peers):
    import fastrnn
    from fastrnn import _isa, _recurrent
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "fastrnn": getattr(fastrnn, "__version__", "?"), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "cpu": _isa.cpu_model(),
           "cpu_family_model": _isa.cpu_family_model(),
           "cpu_vector_flags": _isa.cpu_vector_flags(), "fastrnn_isa": _isa.get_isa(),
           "fastrnn_isas_available": _isa.available_isas(),
           "fastrnn_pack_cache": _recurrent._pack_cache_enabled()}
    try:
        out["fastrnn_config"] = fastrnn.config()
    except Exception:
        pass
    for peer in peers:
        try:
            out[peer] = __import__(peer).__version__
        except Exception:
            pass
    return out


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None):
    """Command-line entry point (``fastrnn bench`` forwards its arguments here)."""
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        build_parser().error("--threads must be at least 1")
    configs, explicit = _configs(args)
    run_main = args.mode is not None or not (args.memory or args.lengths or args.quantize)
    if args.mode is None:
        args.mode = ["forward", "train"] if run_main else []
    run_stream = "stream" in args.mode
    args.mode = [m for m in args.mode if m != "stream"]
    run_main = run_main and bool(args.mode)
    cells_given = args.cell is not None
    if args.cell is None:
        args.cell = list(common.CELLS)
    installed = available_peers()
    if args.peers is None:
        peers = installed
    else:
        peers = [p for p in args.peers if p in installed]
        for p in args.peers:
            if p not in installed:
                _log(f"peer {p} is not installed: skipped")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
            plot_ok = True
        except ImportError:
            plot_ok = False
            _log("--plot needs matplotlib, which is not installed "
                 "(pip install matplotlib); the plot will be skipped")
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET
    status = 0
    summary = {"sgemm_gflops": None, "threads": args.threads, "dtype": args.dtype,
               "layers": args.layers, "bidirectional": args.bidirectional,
               "peers": peers, "results": [],
               # how it was timed (each row's own repeats are in its record)
               "budget": budget, "repeats": args.repeats, "warmup": args.warmup,
               "seed": args.seed, "check": args.check}
    load, ncpu = machine_load()
    summary["load_average"] = load
    if load is not None and load >= (ncpu or 1):
        _log(f"warning: the machine is busy (load average {load:.1f} on {ncpu} CPUs): "
             "timings will be noisy, and OpenMP engines that spin-wait (torch, fastrnn) "
             "can be slowed down badly when cores are oversubscribed")
    with set_threads(args.threads, peers):
        # the peak of the run's dtype: float64 rows against dgemm (they were divided by
        # the float32 peak, halving their % peak; found by an audit)
        sgemm = measure_sgemm_peak(args.sgemm_size, dtype=args.dtype)
        summary["sgemm_gflops"], summary["peak_dtype"] = sgemm, args.dtype
        header = machine_header(peers, args.threads)
        summary["machine"] = header
        print(header)
        _log(f"{'sgemm' if args.dtype == 'float32' else 'dgemm'} peak: {sgemm:.1f} GFLOP/s with {args.threads} thread(s); peers: "
             f"{', '.join(peers) or 'none'}")
        if run_main:
            cases = _cases(args, configs, explicit)
            results, errors, checks = run_cases(cases, peers, args.threads, sgemm, budget,
                                                args.repeats, args.warmup, args.check)
            # the peak is a best case: measure again after the run, keep the higher
            sgemm_end = measure_sgemm_peak(args.sgemm_size, dtype=args.dtype)
            summary["sgemm_gflops_start"], summary["sgemm_gflops_end"] = sgemm, sgemm_end
            if sgemm_end > sgemm:
                sgemm = summary["sgemm_gflops"] = sgemm_end
                for r in results:
                    r["pct_peak"] = 100.0 * r["gflops"] / sgemm
            summary.update(results=results, errors=errors, checks=checks)
            print(format_table(results, peers, sgemm))
            if any(not c["ok"] for c in checks):
                status = 1
                print("MISMATCHES:")
                for c in checks:
                    if not c["ok"]:
                        print(f"  {c['engine']} vs fastrnn, {c['case']}: max rel err "
                              f"{c['max_rel_err']:.3g} in {c['worst_key']!r} "
                              f"(tolerance {c['tolerance']:g})")
            fastrnn_errors = [e for e in errors if e["engine"] == "fastrnn"]
            if fastrnn_errors:
                status = 1
            if errors:
                print("ERRORS:")
                for e in errors:
                    print(f"  {e['engine']}, {e['case']}: {e['error']}")
        if args.quantize:
            from fastrnn.benchmark import inference
            qcells = args.cell if cells_given else ["lstm", "gru"]
            qconfigs = [c[:4] for c in configs] if explicit else list(inference.QUANT_GRID)
            quant = inference.quantize_report(qcells, qconfigs, args.quantize, peers,
                                              args.threads, budget, args.repeats, args.seed,
                                              progress=_log)
            summary["quantize"] = quant
            print(inference.format_quantize(quant))
        if run_stream:
            from fastrnn.benchmark import inference
            scells = args.cell if cells_given else ["rnn_tanh", "lstm", "gru"]
            pool_size = (args.input_size or 256, args.hidden_size or 256)
            stream = inference.stream_report(scells, peers, args.threads, budget, args.repeats,
                                             args.seed, pool_size=pool_size,
                                             audio_chunks=args.stream_chunks,
                                             gen_hidden=args.gen_hidden,
                                             gen_length=args.gen_length, progress=_log)
            summary["stream"] = stream
            print(inference.format_stream(stream))
            if any("error" in r for r in stream):
                status = 1
        if args.memory:
            from fastrnn.benchmark.memory import memory_report, format_memory
            mem_modes = [m for m in args.mode if m != "step"] or ["forward", "train"]
            memory = memory_report(args.cell, configs, mem_modes, peers, args.threads,
                                   args.dtype, args.layers, args.bidirectional, args.seed)
            summary["memory"] = memory
            print(format_memory(memory))
            if any("error" in r for r in memory if r["engine"] == "fastrnn"):
                status = 1      # as for the main table: fastrnn failed (a peer may fail alone)
        if args.lengths:
            from fastrnn.benchmark.lengths import lengths_report, format_lengths
            len_modes = [m for m in args.mode if m != "step"] or ["forward", "train"]
            len_configs = configs if explicit else [common.DEFAULT_CONFIG]
            lengths = lengths_report(args.cell, len_configs, len_modes, peers, args.dtype,
                                     args.repeats, args.seed, budget=args.budget)
            summary["lengths"] = lengths
            print(format_lengths(lengths))
            if any(not r.get("check_ok", True) for r in lengths):
                status = 1
    if args.plot and not run_main:
        _log("--plot draws the main table, which --memory/--lengths alone do not run")
    if args.plot and run_main:
        if plot_ok and summary["results"]:
            plot_results(summary["results"], summary["sgemm_gflops"], args.plot, peers)
            _log(f"plot written to {args.plot}")
        elif plot_ok:
            _log("nothing to plot")
        else:
            _log("--plot: matplotlib is not installed (pip install matplotlib); no plot written")
            status = status or 2
    summary["versions"] = _versions(peers)
    if args.json:
        sys.stdout.flush()
        print(json.dumps(_clean(summary), allow_nan=False))
    return status


def _clean(obj):
    """JSON-safe copy: NumPy scalars to Python, inf/nan to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
