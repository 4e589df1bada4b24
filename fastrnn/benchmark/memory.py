"""Peak memory of one call (``fastrnn bench --memory``).

Every measurement runs in a fresh subprocess, so that nothing an earlier case
allocated (or left in an allocator's free lists) hides this one's peak:

1. the child makes one call on a tiny case (so that one-time set-up such as
   thread pools or torch's autograd engine is not counted), then builds the
   engine, its weights and its input, collects garbage and reads its resident
   set size (RSS);
2. it resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux) and
   makes one call; the extra peak RSS is ``VmHWM`` minus the RSS before. Where
   the reset is impossible, ``ru_maxrss`` stands in (an upper bound);
3. for fastrnn it then repeats the call under ``tracemalloc``, which sees every
   NumPy array (but not memory a compiled kernel mallocs itself).

The config is the largest selected one (by FLOPs), in forward and train mode.
"""

import gc
import json
import os
import resource
import subprocess
import sys

import numpy as np

from fastrnn.benchmark import common

__all__ = ["memory_report", "format_memory", "measure_in_child"]

_MB = 1024.0 * 1024.0


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _maxrss_bytes():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def measure_in_child(spec):
    """Runs inside the subprocess: build the engine of ``spec`` and measure one call."""
    from fastrnn.benchmark.engines import ENGINES, Case
    from fastrnn.benchmark.timing import set_threads
    case = Case(**spec["case"])
    engine_name = spec["engine"]
    kwargs = {"threads": spec["threads"]} if engine_name == "onnxruntime" else {}
    with set_threads(spec["threads"], [engine_name] if engine_name == "torch" else []):
        # one call on a tiny case first: one-time runtime set-up (thread pools,
        # autograd engine, lazy imports) is not part of a call's memory
        tiny = Case(case.cell, case.mode, 4, 4, 2, 2, case.layers, case.bidirectional,
                    case.dtype, case.seed)
        warm = ENGINES[engine_name](tiny, *tiny.make_data(), **kwargs)
        warm.run()
        del warm
        weights, x, dy, h0, c0 = case.make_data()
        engine = ENGINES[engine_name](case, weights, x, dy, h0, c0, **kwargs)
        gc.collect()
        before = _rss_bytes()
        if before is not None and _reset_hwm():
            method = "VmHWM"
            engine.run()
            peak = _hwm_bytes()
        else:
            method = "ru_maxrss"
            before = before if before is not None else _maxrss_bytes()
            engine.run()
            peak = _maxrss_bytes()
        out = {"rss_before_mb": before / _MB, "peak_rss_mb": peak / _MB,
               "extra_rss_mb": max(0, peak - before) / _MB, "method": method}
        if engine_name == "fastrnn":
            import tracemalloc
            tracemalloc.start()
            engine.run()
            _, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out["tracemalloc_peak_mb"] = traced_peak / _MB
            out["impl"] = engine.impl
    return out


def memory_report(cells, configs, modes, peers, threads, dtype="float32", layers=1,
                  bidirectional=False, seed=0, progress=None):
    """Peak memory of one call of each engine on the largest config of ``configs``."""
    from fastrnn.benchmark.engines import Case
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    I, H, T, B = max(configs, key=lambda c: common.flop_count("lstm", *c))
    rows = []
    size = np.dtype(dtype).itemsize
    D = 2 if bidirectional else 1
    for cell in cells:
        for mode in modes:
            case = Case(cell, mode, I, H, T, B, layers, bidirectional, dtype, seed)
            engines = ["fastrnn"] + [p for p in peers if not (p == "onnxruntime"
                                                              and (mode == "train"
                                                                   or dtype != "float32"))]
            for engine in engines:
                spec = {"engine": engine, "threads": threads,
                        "case": {"cell": cell, "mode": mode, "I": I, "H": H, "T": T, "B": B,
                                 "layers": layers, "bidirectional": bidirectional,
                                 "dtype": dtype, "seed": seed}}
                row = {"engine": engine, "cell": cell, "mode": mode, "I": I, "H": H, "T": T,
                       "B": B, "layers": layers, "bidirectional": bidirectional,
                       "dtype": dtype, "input_mb": T * B * I * size / _MB,
                       "output_mb": T * B * D * H * size / _MB}
                row.update(_run_child(spec))
                rows.append(row)
                if "error" in row:
                    progress(f"memory {engine} {cell} {mode}: {row['error']}")
                else:
                    progress(f"memory {engine} {cell} {mode}: +{row['extra_rss_mb']:.1f} MB RSS")
    return rows


def _run_child(spec):
    code = ("import json, sys; from fastrnn.benchmark.memory import measure_in_child; "
            "print(json.dumps(measure_in_child(json.loads(sys.argv[1]))))")
    env = dict(os.environ)
    # make the child import the same fastrnn as this process
    import fastrnn
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastrnn.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"child failed: {tail}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "child printed no result"}


def format_memory(rows):
    if not rows:
        return "memory: nothing measured"
    r0 = rows[0]
    lines = [f"Peak memory of one call, I={r0['I']} H={r0['H']} T={r0['T']} B={r0['B']} "
             f"{r0['dtype']} (input {r0['input_mb']:.1f} MB, output {r0['output_mb']:.1f} MB)",
             f"{'cell':<9}{'mode':<9}{'engine':<13}{'extra RSS MB':>13}{'tracemalloc MB':>16}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['cell']:<9}{r['mode']:<9}{r['engine']:<13}  {r['error']}")
            continue
        traced = r.get("tracemalloc_peak_mb")
        lines.append(f"{r['cell']:<9}{r['mode']:<9}{r['engine']:<13}"
                     f"{r['extra_rss_mb']:>13.1f}"
                     f"{(f'{traced:.1f}' if traced is not None else '-'):>16}")
    lines.append("extra RSS = peak resident memory during the call minus before it "
                 "(fresh process per row); tracemalloc = peak of NumPy/Python allocations")
    return "\n".join(lines)
