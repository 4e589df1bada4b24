"""Random number sources and weight initialisers shared by the nn blocks.

Every block that draws random numbers takes ``rng``: ``None`` (fresh entropy),
an ``int`` seed, or a ``numpy.random.Generator`` (used as is, so several blocks
can share one stream and a whole model is reproducible from one seed).
"""

import numpy as np

from fastrnn.modules.module import charge_values, fill_normal, fill_uniform

__all__ = ["as_generator", "uniform_", "normal_", "generator_state", "set_generator_state"]


def as_generator(rng=None):
    """Return a ``numpy.random.Generator`` for ``rng`` (None, int seed or Generator)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, (list, tuple)):
        return np.random.default_rng(list(rng))
    raise TypeError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def uniform_(shape, bound, rng, dtype=np.float32):
    """Array of ``shape`` drawn from U(-bound, bound) (float64 draws, then cast)."""
    charge_values(tuple(shape) if isinstance(shape, (tuple, list)) else (shape,))
    out = np.empty(shape, dtype)
    fill_uniform(out, bound, as_generator(rng))
    return out


def normal_(shape, std, rng, dtype=np.float32):
    """Array of ``shape`` drawn from N(0, std^2)."""
    charge_values(tuple(shape) if isinstance(shape, (tuple, list)) else (shape,))
    out = np.empty(shape, dtype)
    fill_normal(out, std, as_generator(rng))
    return out


def generator_state(gen):
    """JSON-serialisable state of a Generator (its bit generator's state dict)."""
    return gen.bit_generator.state


def set_generator_state(gen, state):
    """Restore a state produced by :func:`generator_state` (in place)."""
    gen.bit_generator.state = state
