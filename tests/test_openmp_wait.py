"""The window after a training call (OpenMP) during which eval calls run alone follows
libgomp's spin settings (fastrnn/_openmp_wait.py)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fastrnn
from fastrnn import _openmp_wait, _recurrent
from fastrnn._openmp_wait import ACTIVE_SPINS, DEFAULT_SPINS, MARGIN, spin_count


@pytest.mark.parametrize("env, spins", [
    ({}, DEFAULT_SPINS),
    ({"OMP_WAIT_POLICY": "passive"}, 0),
    ({"OMP_WAIT_POLICY": " PASSIVE "}, 0),
    ({"OMP_WAIT_POLICY": "active"}, ACTIVE_SPINS),
    ({"OMP_WAIT_POLICY": "sometimes"}, DEFAULT_SPINS),
    ({"GOMP_SPINCOUNT": "20000"}, 20000),
    ({"GOMP_SPINCOUNT": "20k"}, 20000),
    ({"GOMP_SPINCOUNT": "3M"}, 3_000_000),
    ({"GOMP_SPINCOUNT": "1G", "OMP_WAIT_POLICY": "passive"}, 10**9),   # the count wins
    ({"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "active"}, 0),
    ({"GOMP_SPINCOUNT": "infinite"}, math.inf),
    ({"GOMP_SPINCOUNT": "INFINITY"}, math.inf),
    ({"GOMP_SPINCOUNT": "lots", "OMP_WAIT_POLICY": "passive"}, 0),      # ignored, as libgomp
    ({"GOMP_SPINCOUNT": "20K"}, 20000),
    ({"GOMP_SPINCOUNT": "2m"}, 2_000_000),
    ({"GOMP_SPINCOUNT": "+7"}, 7),
    ({"GOMP_SPINCOUNT": "-5"}, math.inf),                  # strtoull wraps it: ~2**64
    ({"GOMP_SPINCOUNT": str(2**64)}, DEFAULT_SPINS),       # out of range: ignored
])
def test_spin_count_follows_libgomps_rules(env, spins):
    assert spin_count(env) == spins


def test_window_is_the_rounds_time_with_a_margin():
    assert _openmp_wait.spin_window_seconds(0, 25.0) == 0
    assert _openmp_wait.spin_window_seconds(300_000, 20.0) == pytest.approx(6e-3 * MARGIN)
    assert _openmp_wait.spin_window_seconds(math.inf, 20.0) == math.inf
    ns = _recurrent.pause_ns()
    assert 0 < ns < 10_000     # one pause: tens of ns on current CPUs


def _window_in_child(**env):
    code = "import json, fastrnn; print(json.dumps(fastrnn.config()['openmp_spin_window_ms']))"
    full = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])     # json reads "Infinity" as inf


def test_the_window_is_set_from_the_environment_at_import():
    assert _window_in_child(OMP_WAIT_POLICY="passive") == 0
    assert _window_in_child(GOMP_SPINCOUNT="INFINITE") == math.inf
    default = _window_in_child()
    assert 0 < default < 1000                       # ms; ~8 on the Zen 4 EPYC guest


def test_configure_sets_the_window_from_the_spin_count_and_the_pause(monkeypatch):
    """The window is spins x pause x margin (each child measures its own pause, so two
    processes' windows were compared against a bound before)."""
    kept = _recurrent.openmp_spin_window()
    monkeypatch.setattr(_recurrent, "pause_ns", lambda: 20.0)
    try:
        for env, spins in [({"GOMP_SPINCOUNT": "3M"}, 3_000_000), ({}, DEFAULT_SPINS)]:
            want = _openmp_wait.spin_window_seconds(spins, 20.0)
            assert _openmp_wait.configure(env) == pytest.approx(want)
            assert _recurrent.openmp_spin_window() == pytest.approx(want)
        assert _openmp_wait.configure({"GOMP_SPINCOUNT": "3M"}) == \
            pytest.approx(10 * _openmp_wait.configure({"GOMP_SPINCOUNT": "300K"}))
    finally:
        _recurrent.set_openmp_spin_window(kept)


def test_set_openmp_spin_window_is_what_the_test_hook_restores():
    kept = _recurrent.openmp_spin_window()
    try:
        _recurrent.set_openmp_spin_window(0.25)
        assert _recurrent.openmp_spin_window() == pytest.approx(0.25)
        _recurrent.pool_test_knobs(openmp_window=0.0)
        assert _recurrent.openmp_spin_window() == 0
        _recurrent.pool_test_knobs()
        assert _recurrent.openmp_spin_window() == pytest.approx(0.25)
        _recurrent.set_openmp_spin_window(math.inf)
        assert _recurrent.openmp_spin_window() > 1e9     # seconds: "always"
    finally:
        _recurrent.set_openmp_spin_window(kept)
        _recurrent.pool_test_knobs()
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="seconds"):
            _recurrent.set_openmp_spin_window(bad)


def test_passive_waiting_openmp_leaves_the_pool_free_after_training():
    """With OMP_WAIT_POLICY=passive there is no window: an eval call right after a
    training call may run on a team (and gives the same numbers as alone)."""
    code = """
import numpy as np, fastrnn
from fastrnn import _recurrent
fastrnn.set_num_threads(2)
_recurrent.pool_test_knobs(any_stamp=True)        # claim a waiting worker, fresh or not
m = fastrnn.LSTM(16, 64, seed=0).eval()
x = np.random.default_rng(0).standard_normal((9, 1, 16)).astype(np.float32)
t = fastrnn.GRU(16, 64, seed=1)
xt = np.random.default_rng(1).standard_normal((5, 4, 16)).astype(np.float32)
ref = m(x)[0]
teamed = 0
for _ in range(200):
    y, _ = t(xt); t.backward(np.ones_like(y))
    before = _recurrent.pool_stats()["teams"]
    assert np.array_equal(m(x)[0], ref)
    teamed += _recurrent.pool_stats()["teams"] > before
print(teamed)
"""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["OMP_WAIT_POLICY"] = "passive"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert int(out.strip().splitlines()[-1]) > 0
