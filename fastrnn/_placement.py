"""Helper threads that run beside their caller, on another CPU.

A bidirectional layer in training runs its reverse direction on a second thread
(modules/rnn.py `_directions`). Two things about that thread cost time on the
2-core Xeon KVM guest (session 31), both after the process has idled:

- A thread started per call (`threading.Thread.start`, which blocks its caller
  until the thread runs) often began on the caller's own CPU, and Linux left both
  there until its load balancer moved one, several milliseconds later: two threads
  each running a 5 ms RNN forward after a 0.15 s sleep shared one CPU in 5 of 8
  rounds (sched_getcpu) and took 9.5-12.4 ms instead of 5.3-6.1.
- A thread kept waiting and woken per call landed beside its caller as often (8 of
  10 rounds); moving itself off the caller's CPU when it finds itself there (its
  affinity less that CPU, given back after the job; the pool's workers do the same,
  and since session 37 keep it while they sleep, so that the next wake lands
  elsewhere: team_pool.h fastrnn_pool_step_aside) left one round in 10 shared.

So the helpers here are kept (one per caller running at once, started on first
use) and step aside. bench/helper_placement.py times both ways; its two runs later
that session: per call 5.58-5.59 ms (shared in 11 and 13 of 40 rounds), kept 4.44-4.50
(0 of 40), the caller alone 4.39-4.42.
"""

import os
import queue
import threading
from contextlib import contextmanager

from fastrnn import _recurrent


def current_cpu():
    """The CPU the calling thread runs on now, or -1 where unknown."""
    return _recurrent.current_cpu()


@contextmanager
def away_from(cpu):
    """Within the block the calling thread avoids CPU `cpu` (its affinity less that
    CPU) if it runs there now and another CPU is allowed; its affinity as found is
    given back after. Yields whether it moved. Nothing changes where the CPU or the
    affinity is unknown."""
    before = None
    if cpu >= 0 and current_cpu() == cpu and hasattr(os, "sched_setaffinity"):
        try:
            allowed = os.sched_getaffinity(0)          # 0: this thread (Linux)
            if cpu in allowed and len(allowed) > 1:
                os.sched_setaffinity(0, allowed - {cpu})
                before = allowed
        except OSError:                                # a container may forbid it
            before = None
    try:
        yield before is not None
    finally:
        if before is not None:
            try:
                os.sched_setaffinity(0, before)
            except OSError:
                pass


class _Helper:
    """One kept thread running the jobs given to it, one at a time."""

    def __init__(self):
        self.jobs = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="fastrnn-helper", daemon=True).start()

    def _loop(self):
        while True:
            fn, caller_cpu, box, done = self.jobs.get()
            try:
                with away_from(caller_cpu):
                    box["result"] = fn()
            except BaseException as exc:               # re-raised in the caller's thread
                box["error"] = exc
            finally:
                with _lock:
                    _idle.append(self)                 # before done: a next call finds it
                done.set()
            # what the job held (its result, a training cache) is the caller's now: a
            # waiting helper must not keep it alive
            fn = box = done = exc = None


_lock = threading.Lock()
_idle = []                                             # helpers waiting for a job


def _forget_helpers():
    """In a forked child the helpers' threads do not exist."""
    global _lock
    _lock = threading.Lock()
    _idle.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


class Beside:
    """fn() running on a helper thread, off the caller's CPU when `step_aside`;
    .result() waits for it and returns its value or raises its exception. (A helper
    that starts OpenMP teams should not step aside: threads it creates meanwhile
    would keep the narrowed affinity for good.)"""

    def __init__(self, fn, step_aside=True):
        self._box = {}
        self._done = threading.Event()
        job = (fn, current_cpu() if step_aside else -1, self._box, self._done)
        # nothing between taking an idle helper and queueing its job can raise (a
        # KeyboardInterrupt there would lose the helper for good)
        with _lock:
            helper = _idle.pop() if _idle else None
            if helper is not None:
                helper.jobs.put(job)
        if helper is None:
            _Helper().jobs.put(job)

    def wait(self):
        """Until the job has ended, even through a KeyboardInterrupt (re-raised after):
        the job writes into the caller's arrays, so the caller must not go on while it
        runs. (Event.wait returns early when a signal handler raises.)"""
        interrupted = None
        while True:
            try:
                self._done.wait()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def result(self):
        self.wait()
        error = self._box.pop("error", None)
        if error is not None:
            try:
                raise error
            finally:    # no cycle: this frame -> the box -> the error -> its traceback
                error = None
        return self._box["result"]
