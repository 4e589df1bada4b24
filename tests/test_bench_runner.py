"""Smoke tests of the benchmark runner (fastrnn.benchmark.runner), so it cannot rot.

Tiny configs, one repetition: these check that every mode runs, that the JSON
line has the documented keys, and that the peers (when installed) agree with
fastrnn — which also checks the ONNX models' gate reordering.
"""

import importlib.util
import json
import os
import subprocess
import sys

import time

import numpy as np
import pytest

from fastrnn.benchmark import common
from fastrnn.benchmark.runner import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-I", "6", "-H", "8", "-T", "4", "-B", "3", "--threads", "1", "--repeats", "1",
        "--sgemm-size", "128", "--json"]
RESULT_KEYS = {"engine", "cell", "mode", "I", "H", "T", "B", "ms", "gflops"}


def _installed(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


def run_json(capsys, argv):
    status = main(argv)
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines, "the runner printed nothing"
    summary = json.loads(lines[-1])
    return status, summary, out


def test_flop_count_formula():
    # 2*T*B*G*H*(I+H) for forward, 3x for forward+backward
    assert common.flop_count("lstm", 256, 256, 100, 64) == 2 * 100 * 64 * 4 * 256 * 512
    assert common.flop_count("gru", 256, 256, 100, 64, "train") == 3 * 2 * 100 * 64 * 3 * 256 * 512
    assert common.flop_count("rnn_tanh", 8, 16, 5, 3, "step") == 2 * 1 * 3 * 16 * 24
    # a second layer reads D*H inputs; each direction counts
    assert common.flop_count("lstm", 8, 16, 5, 3, layers=2, bidirectional=True) == \
        2 * (2 * 5 * 3 * 4 * 16 * (8 + 16)) + 2 * (2 * 5 * 3 * 4 * 16 * (32 + 16))


def test_runner_json_all_modes(capsys):
    status, summary, out = run_json(capsys, ["--mode", "forward,train,step"]
                                    + TINY)
    assert status == 0, out
    assert {"sgemm_gflops", "threads", "results"} <= set(summary)
    assert summary["threads"] == 1 and summary["sgemm_gflops"] > 0
    results = summary["results"]
    for r in results:
        assert RESULT_KEYS <= set(r), r
        assert r["ms"] > 0 and r["gflops"] > 0
    ours = {(r["cell"], r["mode"]) for r in results if r["engine"] == "fastrnn"}
    assert ours == {(c, m) for c in common.CELLS for m in ("forward", "train", "step")}
    step = [r for r in results if r["mode"] == "step"]
    assert all(r["T"] == 1 and r["B"] == 1 for r in step)
    # fastrnn's inference rows ran on frozen weights (as deployed), training on plain ones
    assert {(r["mode"], r["frozen"]) for r in results if r["engine"] == "fastrnn"} == \
        {("forward", True), ("step", True), ("train", False)}
    engines = {r["engine"] for r in results}
    if _installed("torch"):
        assert "torch" in engines
    if _installed("onnxruntime", "onnx"):
        assert {(r["cell"], r["mode"]) for r in results if r["engine"] == "onnxruntime"} == \
            {(c, m) for c in common.CELLS for m in ("forward", "step")}
    # every peer agreed with fastrnn (and was checked: an empty list passed vacuously)
    checks = summary.get("checks", [])
    assert bool(checks) == bool(engines - {"fastrnn"}), checks
    assert all(c["ok"] for c in checks), checks
    assert "ms" in out and "GFLOP/s" in out  # the table


@pytest.mark.skipif(not _installed("torch"), reason="needs torch as a peer")
def test_runner_layers_bidirectional_agree_with_peers(capsys):
    status, summary, out = run_json(capsys, ["--cell", "lstm,gru", "--mode", "forward,train",
                                             "--layers", "2", "--bidirectional"] + TINY)
    assert status == 0, out
    assert summary["checks"] and all(c["ok"] for c in summary["checks"]), summary["checks"]
    train = [c for c in summary["checks"] if c["mode"] == "train"]
    assert train and all(c["keys_compared"] >= 8 for c in train)  # outputs and gradients


def test_compare_fails_a_peer_that_lacks_an_array():
    want = {"y": np.ones(3), "dx": np.ones(3), "grad:w": np.ones(2), "extra": None}
    assert common.compare(dict(want), want, 1e-6)[0]
    ok, key, err, n = common.compare({"y": np.ones(3)}, want, 1e-6)   # no gradients
    assert not ok and key == "dx" and err == float("inf")             # passed on 'y' alone
    assert not common.compare({"y": np.ones(3), "dx": np.ones(3), "grad:w": None}, want, 1e-6)[0]


def test_runner_no_peers_float64(capsys):
    status, summary, out = run_json(capsys, ["--cell", "gru", "--mode", "train", "--peers",
                                             "none", "--dtype", "float64"] + TINY)
    assert status == 0, out
    assert [r["engine"] for r in summary["results"]] == ["fastrnn"]
    assert summary["results"][0]["dtype"] == "float64"


def test_runner_lengths_and_memory(capsys):
    status, summary, out = run_json(capsys, ["--cell", "lstm", "--lengths", "--memory",
                                             "--peers", "none", "-B", "5"] + TINY)
    assert status == 0, out
    assert summary["results"] == []  # --lengths/--memory alone skip the main table
    lengths = summary["lengths"]
    assert {r["mode"] for r in lengths} == {"forward", "train"}
    for r in lengths:
        assert r["check_ok"]
        assert 0 < r["length_ratio"] <= 1 and r["time_ratio"] > 0
    memory = summary["memory"]
    assert {(r["engine"], r["mode"]) for r in memory} == {("fastrnn", "forward"),
                                                          ("fastrnn", "train")}
    for r in memory:
        assert "error" not in r, r
        assert r["extra_rss_mb"] >= 0 and r["tracemalloc_peak_mb"] > 0


def test_runner_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    status, summary, out = run_json(capsys, ["--cell", "rnn", "--mode", "forward",
                                             "--peers", "none", "--plot", str(path)] + TINY)
    assert status == 0, out
    assert path.exists() and path.stat().st_size > 1000


def test_python_m_bench_help():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--peers" in proc.stdout and "--mode" in proc.stdout


def test_onnx_model_matches_torch_gate_order():
    """The ONNX model built from torch-layout weights computes torch's function."""
    if not _installed("torch", "onnxruntime", "onnx"):
        pytest.skip("needs torch, onnx and onnxruntime")
    import onnxruntime as ort
    import torch
    from fastrnn.benchmark.onnx_model import build_model
    I, H, T, B = 3, 5, 4, 2
    for cell, cls in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU), ("rnn_tanh", torch.nn.RNN)):
        w = common.make_weights(cell, I, H, layers=2, bidirectional=True, seed=3)
        x, _ = common.make_inputs(I, H, T, B, seed=4)
        m = cls(I, H, num_layers=2, bidirectional=True)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
        with torch.no_grad():
            y, state = m(torch.from_numpy(x))
        h_n = state[0] if cell == "lstm" else state
        sess = ort.InferenceSession(build_model(cell, w, I, H, T, B, 2, True).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {"X": x})
        np.testing.assert_allclose(got[0], y.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[1], h_n.numpy(), rtol=1e-4, atol=1e-5)


class FakeClock:
    """fastrnn.benchmark.timing's `time`: perf_counter reads a counter that only the
    engines' calls (by their stated cost) and sleep move, so the harness's figures are
    exact on any machine (these tests once timed real busy-waits against bounds)."""

    def __init__(self):
        self.now = 0.0
        self.engines = []

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):   # the quiet gap: each engine's next call is cold again
        self.now += seconds
        for e in self.engines:
            e.cold = True


@pytest.fixture
def clock(monkeypatch):
    from fastrnn.benchmark import timing
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", fake)
    return fake


class _CountingEngine:
    """An engine whose first call after each sleep takes 10 ms, like a woken team, and
    the others 1 us, on the fake clock."""
    COLD, WARM = 0.01, 1e-6

    def __init__(self, name, clock):
        self.name, self.calls, self.cold, self.clock = name, 0, True, clock
        clock.engines.append(self)

    def run(self):
        self.calls += 1
        self.clock.now += self.COLD if self.cold else self.WARM
        self.cold = False


def test_time_interleaved_times_the_cold_call_apart(clock):
    from fastrnn.benchmark import timing
    engines = [_CountingEngine("a", clock), _CountingEngine("b", clock)]
    out = timing.time_interleaved(engines, budget=None, repeats=3, warmup=0,
                                  min_sample=0.0, first={"a": 1e-3, "b": 1e-3})
    for e in engines:
        warm, rounds, number, cold = out[e.name]
        assert rounds == 3 and number == 1
        assert cold == pytest.approx(e.COLD)    # the slow first call is reported as cold ...
        assert warm == pytest.approx(e.WARM)    # ... and kept out of the warm median
        assert e.calls == 6                     # one cold and one warm call per round
    no_gap = timing.time_interleaved(engines, budget=None, repeats=1, warmup=0,
                                     first={"a": 1e-3, "b": 1e-3}, quiet_gap=0)
    assert no_gap["a"][3] is None


def test_time_interleaved_counts_the_gaps_and_keeps_three_rounds(clock):
    """The budget counts each round's quiet gaps (it left them out, so a case took
    several times its share), and a case past its budget still gets 3 rounds, not
    one (session 25's audit: the last rows of a grid had 1-2 repetitions)."""
    from fastrnn.benchmark import timing
    engines = [_CountingEngine("a", clock), _CountingEngine("b", clock)]
    out = timing.time_interleaved(engines, budget=0.25, warmup=1, min_sample=0.001,
                                  quiet_gap=0.05)
    assert out["a"][1] == out["b"][1] == 3      # 2 rounds fit; the floor is 3 (was 15)
    late = timing.time_interleaved(engines, budget=0.0, warmup=1, min_sample=0.001,
                                   quiet_gap=0.0)
    assert late["a"][1] == 3                    # out of budget: still a median of 3


def test_runner_json_records_cold_ms(capsys):
    status, summary, _ = run_json(capsys, TINY + ["--peers", "none", "--cell", "rnn"])
    assert status == 0
    assert all(r["cold_ms"] > 0 for r in summary["results"])


def test_time_interleaved_sizes_samples_from_warm_calls(clock):
    """A slow warm-up call (a worker waking) does not shrink the samples to a
    few calls: they are sized from as many calls as fill min_sample."""
    from fastrnn.benchmark import timing
    engine = _CountingEngine("a", clock)     # its first call takes 10 ms, the rest 1 us
    out = timing.time_interleaved([engine], budget=None, repeats=1, warmup=1,
                                  min_sample=0.02, quiet_gap=0)
    warm, rounds, number, cold = out["a"]
    assert number == 10000                   # 0.02 s of 1 us calls, at the cap (from one call: 2)
    assert warm == pytest.approx(engine.WARM)


def test_runner_memory_exits_1_when_fastrnn_fails(capsys, monkeypatch):
    """docs/benchmarks.md: status 1 if fastrnn failed; a failed --memory child had
    left it 0."""
    from fastrnn.benchmark import memory
    monkeypatch.setattr(memory, "_run_child", lambda spec: {"error": "child failed: boom"})
    status, summary, out = run_json(capsys, ["--cell", "gru", "--memory", "--peers", "none",
                                             "-B", "2"] + TINY)
    assert status == 1 and all("error" in r for r in summary["memory"])
