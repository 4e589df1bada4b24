"""A process forked after fastrnn ran kernels on OpenMP threads keeps working.

GNU OpenMP (libgomp) keeps the threads of a calling thread's parallel regions in a pool
and is not fork-safe: a fork child inherits the pool's bookkeeping but not its threads,
so its first region of two or more threads waited for them forever (a training step, a
quantised call; found by an audit). fastrnn pauses the forking thread's pool just
before a fork (omp_pause_resource_all, fastrnn/_config.py), so the child starts new
threads. The eval fast path's own worker pool (src/team_pool.h) restarts in a child by
itself. Each case runs in a fresh interpreter, with a deadline."""

import os
import subprocess
import sys

import pytest

import fastrnn

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

SCRIPT = r"""
import os, signal, sys
import numpy as np
import fastrnn
fastrnn.set_num_threads(2)
rng = np.random.default_rng(0)
m = fastrnn.LSTM(64, 128, seed=0)
x = rng.standard_normal((40, 16, 64)).astype(np.float32)

def work():
    '''a training step and a quantised call, each on two OpenMP threads'''
    m.train()
    y, _ = m(x)
    m.backward(np.ones_like(y))
    q = fastrnn.quantize(fastrnn.LSTM(64, 128, seed=1).eval(), "int8")
    return float(np.abs(y).sum()), float(np.abs(q(x)[0]).sum())

want = work()                 # the parent's OpenMP pool exists from here on
pid = os.fork()
if pid == 0:
    signal.alarm(20)          # a hang ends the child with SIGALRM
    got = work()
    os._exit(0 if got == want else 3)
_, status = os.waitpid(pid, 0)
print("child", os.WIFEXITED(status) and os.WEXITSTATUS(status),
      os.WIFSIGNALED(status) and os.WTERMSIG(status))
assert work() == want         # the parent's next calls start threads again
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 100 + os.WTERMSIG(status))
"""


@pytest.mark.skipif(not fastrnn.config()["openmp"], reason="the kernels were built without OpenMP")
def test_a_fork_child_runs_openmp_kernels_after_the_parent_did():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr[-2000:])
