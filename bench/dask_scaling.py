"""Scaling of fastrnn.dask.predict on one machine: sequences/s and per-task overhead.

    python bench/dask_scaling.py                 # 100,000 sequences, ~10 minutes on 2 cores
    python bench/dask_scaling.py --n 5000 --reps 1 --sizes 250,1000   # a quick look

Model: an eval-mode LSTM (I=8, H=64, one layer, batch_first, float32),
output="last". Data: N variable-length sequences, lengths uniform in
[--min-len, --max-len], sequence i drawn from its own seeded generator, so
the data set is the same whatever the partitioning; the bag is generated and
persisted on the workers before timing (as if read from storage), and the
timed run is ``predict(model, bag, output="last").compute()``: graph,
model transfer, scheduling, compute and gathering the (N, 64) result.

Configurations, interleaved rep by rep, medians reported:
  local          predict_local over the same partitions in this process,
                 kernels on all cores (the "local call")
  1w x 2t        LocalCluster(n_workers=1, threads_per_worker=2)
  2w x 1t        LocalCluster(n_workers=2, threads_per_worker=1)

Overhead: the local call at the same partition size is the baseline (both
cores busy, so c = 2 * t_local / N is the compute per sequence per core
under the same contention). The excess W * (t_dask - t_local), W = 2
workers, is fitted over the sweep as W * F + o * tasks: F is paid once per
computation (graph, model bytes, the last gathers), o per task on a
worker's timeline (scheduling, moving the partition's result, the task's
Python work). The table shows all the excess divided by the tasks. Per
task, compute is >= 90 % of the time when c*P >= 9*o: P90 = 9 * o / c. The
measured efficiency (Dask sequences/s over the local call's) is printed
next to it. (The single-thread compute per sequence is shown for scale.)
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

import fastrnn

I, H = 8, 64


def make_lengths(n, lo, hi, seed=0):
    return np.random.default_rng(seed).integers(lo, hi + 1, n)


def make_sequences(start, lengths, seed=0):
    """Sequences start .. start+len(lengths)-1, each from its own generator."""
    return [np.random.default_rng([seed, start + k]).standard_normal((int(t), I))
            .astype(np.float32) for k, t in enumerate(lengths)]


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_local(model, parts, threads, batch_size):
    import fastrnn.dask as fd
    t = time.perf_counter()
    for p in parts:
        fd.predict_local(model, p, output="last", batch_size=batch_size, threads=threads)
    return time.perf_counter() - t


def persisted_bag(client, lengths, size):
    import dask
    import dask.bag as db
    parts = [dask.delayed(make_sequences, pure=True)(a, lengths[a:a + size])
             for a in range(0, len(lengths), size)]
    from distributed import wait
    with client.as_current():
        bag = client.persist(db.from_delayed(parts))
        wait(bag)
    return bag


def run_dask(client, model, bag, batch_size):
    import fastrnn.dask as fd
    with client.as_current():
        t = time.perf_counter()
        res = fd.predict(model, bag, output="last", batch_size=batch_size)
        # gathered partition by partition (each a few arrays); Bag.compute() would
        # first concatenate the 100,000 small arrays into one list on a worker
        out = client.gather(client.compute(list(res.to_delayed())))
        dt = time.perf_counter() - t
    assert len(out) > 0
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="sequences (default 100,000)")
    ap.add_argument("--min-len", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=80)
    ap.add_argument("--partition", type=int, default=5000,
                    help="partition size of the three-way comparison (default 5000)")
    ap.add_argument("--sizes", default="100,500,2000,10000",
                    help="partition sizes of the overhead sweep (2w x 1t)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", metavar="PATH", default=None)
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster
    import fastrnn.dask as fd  # noqa: F401

    cores = len(os.sched_getaffinity(0))
    print(f"CPU: {cpu_name()}, {cores} usable cores; fastrnn {fastrnn.__version__}; "
          f"LSTM I={I} H={H}; N={args.n:,} sequences, lengths {args.min_len}..{args.max_len}",
          flush=True)
    model = fastrnn.LSTM(I, H, batch_first=True, seed=0).eval()
    lengths = make_lengths(args.n, args.min_len, args.max_len)
    steps = int(lengths.sum())
    sizes = [int(s) for s in args.sizes.split(",") if s]

    kw = dict(processes=True, dashboard_address=":0", silence_logs=40)
    c1 = Client(LocalCluster(n_workers=1, threads_per_worker=2, **kw), set_as_default=False)
    c2 = Client(LocalCluster(n_workers=2, threads_per_worker=1, **kw), set_as_default=False)

    # in-process data, partitioned like the bags
    def local_parts(size):
        return [make_sequences(a, lengths[a:a + size]) for a in range(0, args.n, size)]

    results = {"cpu": cpu_name(), "cores": cores, "n": args.n, "steps": steps,
               "model": f"LSTM I={I} H={H} float32", "partition": args.partition,
               "batch_size": args.batch_size, "shared_machine": True}

    # 1) three-way comparison at one partition size
    parts = local_parts(args.partition)
    bag1 = persisted_bag(c1, lengths, args.partition)
    bag2 = persisted_bag(c2, lengths, args.partition)
    run_dask(c1, model, bag1, args.batch_size)      # warm: imports, model load
    run_dask(c2, model, bag2, args.batch_size)
    times = {"local": [], "1w x 2t": [], "2w x 1t": [], "local 1 thread": []}
    for r in range(args.reps):
        times["local"].append(run_local(model, parts, cores, args.batch_size))
        times["1w x 2t"].append(run_dask(c1, model, bag1, args.batch_size))
        times["2w x 1t"].append(run_dask(c2, model, bag2, args.batch_size))
        times["local 1 thread"].append(run_local(model, parts, 1, args.batch_size))
        print(f"  rep {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nthroughput at partition size {args.partition:,} (medians of {args.reps}):")
    base = args.n / med["local"]
    for k, t in med.items():
        sps = args.n / t
        print(f"  {k:15s} {t:7.2f} s  {sps:10,.0f} sequences/s  {sps / base:6.1%} of local")
    results["three_way"] = {k: {"seconds": t, "seq_per_s": args.n / t,
                                "vs_local": (args.n / t) / base} for k, t in med.items()}
    del bag1, bag2, parts
    c1.close()

    # 2) per-task overhead against compute per partition (2w x 1t)
    c_seq = med["local 1 thread"] / args.n            # single-thread compute per sequence
    print(f"\ncompute per sequence, 1 thread: {c_seq * 1e6:.1f} us "
          f"({steps / args.n:.1f} steps on average)")
    print(f"{'partition':>10} {'tasks':>6} {'dask s':>8} {'local s':>8} {'compute/task':>13} "
          f"{'overhead/task':>14} {'efficiency':>10}")
    sweep = []
    for size in sizes:
        bag = persisted_bag(c2, lengths, size)
        lparts = local_parts(size)
        run_dask(c2, model, bag, args.batch_size)
        td, tl = [], []
        for _ in range(args.reps):
            tl.append(run_local(model, lparts, cores, args.batch_size))
            td.append(run_dask(c2, model, bag, args.batch_size))
        td, tl = statistics.median(td), statistics.median(tl)
        tasks = -(-args.n // size)
        overhead = max(0.0, 2 * (td - tl) / tasks)       # all excess over local, per task
        compute = 2 * tl / args.n * size                 # per core, both cores busy
        eff = tl / td             # = compute / (compute + overhead) by construction
        print(f"{size:>10,} {tasks:>6} {td:>8.2f} {tl:>8.2f} {compute * 1e3:>10.1f} ms "
              f"{overhead * 1e3:>11.1f} ms {eff:>10.1%}", flush=True)
        sweep.append(dict(partition=size, tasks=tasks, dask_s=td, local_s=tl,
                          compute_per_task_s=compute, overhead_per_task_s=overhead,
                          measured_efficiency=eff))
        del bag, lparts
    c2.close()
    # fit W*(t_dask - t_local) = W*F + o*tasks: F fixed per computation, o per task
    # on a worker's timeline; the local call (both cores busy) is the baseline,
    # so c below is the compute per sequence per core with both cores busy
    W = 2
    tasks = np.array([s["tasks"] for s in sweep], float)
    excess = np.array([W * (s["dask_s"] - s["local_s"]) for s in sweep])
    if len(sweep) >= 2:
        A = np.stack([np.full_like(tasks, W), tasks], axis=1)
        (F, o), *_ = np.linalg.lstsq(A, excess, rcond=None)
    else:
        F, o = 0.0, excess[0] / tasks[0]
    F, o = max(float(F), 0.0), max(float(o), 0.0)
    c_busy = W * statistics.median(s["local_s"] for s in sweep) / args.n
    p90 = 9 * o / c_busy
    print(f"\nfit over the sweep, W*(t_dask - t_local) = W*F + o*tasks: fixed cost per "
          f"computation F = {F * 1e3:.0f} ms, per-task overhead o = {o * 1e3:.1f} ms "
          f"(= the compute of {o / c_busy:,.0f} sequences at {c_busy * 1e6:.1f} us each, "
          f"per core, both cores busy)")
    print(f"per-task efficiency c*P / (c*P + o) >= 90 % above P90 = 9*o/c = {p90:,.0f} "
          f"sequences per partition ({p90 * c_busy * 1e3:.0f} ms of compute per task)")
    ok = [s["partition"] for s in sweep if s["measured_efficiency"] >= 0.9]
    print("measured >= 90 % of the local call's throughput at partition sizes: "
          + (", ".join(f"{p:,}" for p in ok) if ok else "none"))
    results.update(sweep=sweep, fixed_cost_s=F, overhead_per_task_s=o,
                   compute_per_sequence_s=c_seq, compute_per_sequence_busy_s=c_busy,
                   p90=p90, measured_ok=ok)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
