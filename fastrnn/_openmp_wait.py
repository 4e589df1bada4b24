"""How long libgomp's workers spin after one of fastrnn's OpenMP teams ends.

Training runs on OpenMP; eval calls run on fastrnn's own pool (src/team_pool.h).
A pool worker that shares a CPU with a spinning OpenMP worker runs only when the
scheduler preempts the spinner, so for a while after a training call the eval
fast path runs alone (measured on the 2-core Zen 4 KVM guest: eval steps slow
for ~7 ms after a training step at libgomp's default). That while is set here,
at import, from the same settings libgomp reads (GCC's libgomp manual,
"GOMP_SPINCOUNT" and "OMP_WAIT_POLICY"):

- GOMP_SPINCOUNT: rounds of the busy-wait loop before a waiting thread sleeps;
  an integer with an optional k/M/G/T factor, or INFINITE / INFINITY. (libgomp
  since GCC 13 also reads OMP_WAIT_POLICY_ALL, and may adjust its default count;
  neither is modelled.)
- Unset, the count follows OMP_WAIT_POLICY: 0 for PASSIVE, 300,000 when it is
  unset, 30 billion for ACTIVE.

One round costs what `_recurrent.pause_ns()` measures on this CPU (a relaxed
load and a pause; the pause alone differs several-fold between CPUs). The
window is the rounds' time with a margin. libgomp's lower counts when a process
runs more OpenMP threads than CPUs are not modelled (fastrnn's default is one
thread per usable core). Other OpenMP runtimes (LLVM's KMP_BLOCKTIME) are not
read: fastrnn's wheels are built with GCC.
"""

import math
import os
import re

from fastrnn import _recurrent

DEFAULT_SPINS = 300_000          # OMP_WAIT_POLICY unset
ACTIVE_SPINS = 30_000_000_000    # OMP_WAIT_POLICY=ACTIVE
MARGIN = 1.1                     # the window is this much longer than the rounds' time
_FACTORS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def spin_count(environ=None):
    """Rounds libgomp's waiting workers spin before they sleep (math.inf: never sleep).

    Parsed as libgomp parses it (strtoull, then a k/M/G/T factor in either case): a
    negative count wraps to some 2**64 rounds, i.e. never sleep. A value libgomp
    would not take (no digits, other text, above 2**64) is ignored, as libgomp
    ignores it: the count then follows OMP_WAIT_POLICY."""
    env = os.environ if environ is None else environ
    raw = env.get("GOMP_SPINCOUNT", "").strip()
    if raw.upper() in ("INFINITE", "INFINITY"):
        return math.inf
    m = re.fullmatch(r"([+-]?)(\d+)\s*([kKmMgGtT]?)", raw)
    if m:
        count = int(m.group(2))
        if count >= 2**64:
            pass                                     # out of range: libgomp ignores it
        elif m.group(1) == "-" and count:
            return math.inf
        else:
            return count * _FACTORS[m.group(3).lower()]
    policy = env.get("OMP_WAIT_POLICY", "").strip().upper()
    if policy == "PASSIVE":
        return 0
    if policy == "ACTIVE":
        return ACTIVE_SPINS
    return DEFAULT_SPINS


def spin_window_seconds(spins, pause_ns):
    """Seconds the fast path runs alone after an OpenMP team: `spins` rounds of
    `pause_ns` each, with MARGIN (math.inf for spins = inf)."""
    if spins == math.inf:
        return math.inf
    return spins * pause_ns * 1e-9 * MARGIN


def configure(environ=None):
    """Set the pool's window from the environment and this CPU; returns it in seconds."""
    window = spin_window_seconds(spin_count(environ), _recurrent.pause_ns())
    _recurrent.set_openmp_spin_window(window)
    return window
