"""Memory does not grow: after a warm-up, many inference calls and training steps
leave the resident set size (RSS) within 1 MB of where it was.

Counts (the issue's, about 15 s in all here): 100,000 inference calls (60,000 of
a small bidirectional 2-layer LSTM with lengths, 40,000 of a GRU cell) and
10,000 language-model training steps (forward, backward, clipping, Adam). A leak of one small array per call would
show as several MB. Skipped under the sanitizers (ASan's allocator keeps freed
memory in quarantine on purpose).
"""

import gc
import os

import numpy as np
import pytest

import fastrnn

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("FASTRNN_SANITIZED") == "1",
                                 reason="ASan's quarantine holds freed memory"),
              pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux only")]

LIMIT = 1 << 20   # bytes


def rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth(fn, warmup, calls):
    for _ in range(warmup):
        fn()
    before = rss()
    for _ in range(calls):
        fn()
    return rss() - before


def test_inference_calls_do_not_grow_memory():
    m = fastrnn.LSTM(16, 32, num_layers=2, bidirectional=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((6, 3, 16)).astype(np.float32)
    lengths = np.array([6, 2, 5])
    grew = growth(lambda: m(x, lengths=lengths), 3000, 60000)
    assert grew < LIMIT, f"RSS grew by {grew / 1e6:.2f} MB over 60,000 layer calls"

    cell = fastrnn.GRUCell(16, 32, seed=0).eval()
    grew = growth(lambda: cell(x[0]), 1000, 40000)
    assert grew < LIMIT, f"RSS grew by {grew / 1e6:.2f} MB over 40,000 cell calls"


def test_training_steps_do_not_grow_memory():
    from fastrnn.train import TrainConfig, Trainer
    from fastrnn.cli import DEFAULT_TEXT
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:20000]
    t = Trainer(TrainConfig(hidden=32, embed=8, batch_size=4, seq_len=16, threads=1,
                            eval_every=0), text)
    chunks = list(t.loader.epoch(0))
    k = [0]

    def step():
        t.train_step(chunks[k[0] % len(chunks)])
        k[0] += 1
        t.losses.clear()      # the trainer's own loss history is meant to grow
    grew = growth(step, 500, 10000)
    assert grew < LIMIT, f"RSS grew by {grew / 1e6:.2f} MB over 10,000 training steps"
