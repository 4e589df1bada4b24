"""Example 6: train a sequence classifier with fastrnn, then score a large data
set on a Dask cluster with fastrnn.dask.

The task: each sequence (3 features, 5..60 steps) is noise in which a short
burst of a "signal" feature may appear; the class is whether it did. The
model is LSTM -> Linear on the output at each sequence's last step. After
training, the model (a `Sequential`, saved with `fastrnn.dask.save_model`) is
applied to N synthetic sequences that are generated on the workers, partition
by partition (as if read from storage), and the scores are written to a
.npy file as the partitions arrive.

    pip install "fastrnn[dask]"
    python examples/dask_scoring.py                       # LocalCluster, 200,000 sequences
    python examples/dask_scoring.py --scheduler tcp://scheduler:8786 --n 10000000

Requires `dask` and `distributed` (the `fastrnn[dask]` extra).
"""

import argparse
import os
import time

import numpy as np

import fastrnn
from fastrnn.nn import CrossEntropyLoss, Linear, Sequential
from fastrnn.optim import Adam, clip_grad_norm

FEATURES, MIN_LEN, MAX_LEN = 3, 5, 60


def make_sequences(n, rng):
    """n sequences (T_i, 3) and their labels (1: a burst of feature 0 is in it)."""
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, n)
    labels = rng.integers(0, 2, n)
    seqs = []
    for t, y in zip(lengths, labels):
        x = rng.standard_normal((int(t), FEATURES)).astype(np.float32) * 0.5
        if y:
            at = rng.integers(0, t - 2)
            x[at:at + 3, 0] += 2.0
        seqs.append(x)
    return seqs, labels


def partition(seed, n):
    """One partition of the large data set, made where it is used."""
    return make_sequences(n, np.random.default_rng(seed))[0]


def partition_labels(seed, n):
    return make_sequences(n, np.random.default_rng(seed))[1]


def pad(seqs):
    lengths = np.array([len(s) for s in seqs])
    x = np.zeros((len(seqs), lengths.max(), FEATURES), np.float32)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = s
    return x, lengths


def train(steps=200, hidden=32, batch_size=64, seed=0, verbose=True):
    rng = np.random.default_rng(seed)
    lstm = fastrnn.LSTM(FEATURES, hidden, batch_first=True, seed=seed)
    head = Linear(hidden, 2, rng=seed + 1)
    params = lstm.parameters() + head.parameters()
    opt, crit = Adam(params, lr=1e-2), CrossEntropyLoss()
    for step in range(steps):
        seqs, labels = make_sequences(batch_size, rng)
        x, lengths = pad(seqs)
        for p in params:
            p.grad[...] = 0
        out, _ = lstm(x, lengths=lengths)                      # (B, T, H)
        rows = np.arange(len(x))
        loss = crit(head(out[rows, lengths - 1]), labels)      # last valid step
        dlast = head.backward(crit.backward())                 # (B, H)
        dout = np.zeros_like(out)
        dout[rows, lengths - 1] = dlast
        lstm.backward(dout)
        clip_grad_norm(params, 5.0)
        opt.step()
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}")
    return Sequential(lstm, head).eval()


def main(n=200_000, partition_size=5000, steps=200, scheduler=None, out="scores.npy",
         workers=2, verbose=True):
    import dask
    import dask.bag as db
    from distributed import Client, LocalCluster

    import fastrnn.dask as fd

    model = train(steps=steps, verbose=verbose)
    model_path = os.path.join(os.path.dirname(os.path.abspath(out)), "classifier.npz")
    fd.save_model(model_path, model)               # what `fastrnn predict` reads too
    model = fd.load_model(model_path)

    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                               dashboard_address=":0", silence_logs=40)
        client = Client(cluster)
    try:
        seeds = [(1000 + k, min(partition_size, n - a))
                 for k, a in enumerate(range(0, n, partition_size))]
        bag = db.from_delayed([dask.delayed(partition)(s, m) for s, m in seeds])
        logits = fd.predict(model, bag, output="last")           # lazy: a Bag of (2,) arrays
        t = time.perf_counter()
        scores = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n,))
        futures = client.compute(list(logits.to_delayed()))
        a = 0
        for f in futures:                        # in order; each partition a few arrays
            part = np.asarray(f.result())        # (m, 2) logits
            f.release()
            z = part - part.max(axis=1, keepdims=True)
            p = np.exp(z)
            scores[a:a + len(part)] = p[:, 1] / p.sum(axis=1)   # P(burst)
            a += len(part)
        scores.flush()
        seconds = time.perf_counter() - t
        labels = np.concatenate([partition_labels(s, m) for s, m in seeds])
        acc = float(((scores >= 0.5) == labels).mean())
        if verbose:
            print(f"scored {n:,} sequences in {seconds:.1f} s ({n / seconds:,.0f} "
                  f"sequences/s) on {len(client.scheduler_info()['workers'])} workers; "
                  f"accuracy {acc:.1%}; scores written to {out}")
        return {"accuracy": acc, "seconds": seconds, "n": n, "out": os.path.abspath(out)}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="sequences to score")
    ap.add_argument("--partition-size", type=int, default=5000,
                    help="sequences per Dask partition")
    ap.add_argument("--steps", type=int, default=200, help="training steps")
    ap.add_argument("--scheduler", default=None, help="e.g. tcp://scheduler:8786")
    ap.add_argument("--out", default="scores.npy",
                    help="where the scores go (.npy); the trained model is saved beside it "
                         "as classifier.npz")
    a = ap.parse_args()
    main(n=a.n, partition_size=a.partition_size, steps=a.steps, scheduler=a.scheduler,
         out=a.out)
