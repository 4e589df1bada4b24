"""argparse types shared by the command lines (fastrnn train/generate, predict and
bench): a bad number is a usage error naming the value, not a traceback from deep
in a run. A string int()/float() cannot read raises ValueError, which argparse
reports as an invalid value of the option."""

import argparse
import math

__all__ = ["positive_int", "nonneg_int", "positive_float", "nonneg_float", "fraction",
           "thread_count"]


def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def thread_count(s):
    """--threads: an integer in [1, fastrnn's MAX_THREADS], refused before any data
    is read (set_num_threads would refuse it later, without the option's name)."""
    from fastrnn._config import MAX_THREADS
    v = positive_int(s)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_THREADS}], got {s}")
    return v


def nonneg_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s}")
    return v


def positive_float(s):
    v = float(s)
    if not v > 0 or math.isinf(v):      # (NaN fails the first test)
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s}")
    return v


def nonneg_float(s):
    v = float(s)
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


def fraction(s):
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {s}")
    return v
