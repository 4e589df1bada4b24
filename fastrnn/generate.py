"""Text generation from a language model: temperature, top-k or greedy
sampling, optional priming text, seeded for reproducibility."""

import numpy as np

from fastrnn.nn.init import as_generator
from fastrnn.nn.loss import softmax

__all__ = ["sample_logits", "generate_ids", "generate", "start_ids"]


def sample_logits(logits, temperature=1.0, top_k=None, greedy=False, rng=None):
    """Pick one id per row of ``logits`` (..., V) -> int64 array (...).

    ``greedy`` (or ``temperature == 0``) takes the arg-max. Otherwise the
    logits are divided by ``temperature``, restricted to the ``top_k`` largest
    (if given) and sampled from the softmax with ``rng``: one generator for
    every row, or a sequence of generators, one per row of a 2-D ``logits``
    (row i then draws from ``rng[i]`` only).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if not temperature >= 0:        # (NaN too: it sampled greedily without a word)
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if greedy or temperature == 0:
        return logits.argmax(axis=-1)
    per_row = isinstance(rng, (list, tuple))
    if per_row:
        if logits.ndim != 2 or len(rng) != logits.shape[0]:
            raise ValueError(f"rng: one generator per row of 2-D logits expected, got "
                             f"{len(rng)} for logits of shape {logits.shape}")
    else:
        rng = as_generator(rng)
    with np.errstate(over="ignore"):
        z = logits / temperature
    if not np.isfinite(z[np.isfinite(logits)]).all():
        # so small a temperature that logits/temperature overflows: its limit, arg-max
        # (softmax of inf - inf was NaN, and every draw took id 0)
        return logits.argmax(axis=-1)
    V = z.shape[-1]
    if top_k is not None:
        k = int(top_k)
        if k < 1:
            raise ValueError("top_k must be >= 1")
        if k < V:
            kth = np.partition(z, V - k, axis=-1)[..., V - k:V - k + 1]
            z = np.where(z >= kth, z, -np.inf)
    p = softmax(z, axis=-1).reshape(-1, V)
    u = np.array([g.random() for g in rng]) if per_row else rng.random(p.shape[0])
    c = np.cumsum(p, axis=1)
    c[:, -1] = 1.0                      # guard against rounding below u
    idx = (c < u[:, None]).sum(axis=1)
    return idx.reshape(logits.shape[:-1]).astype(np.int64)


def start_ids(tokenizer):
    """Ids to condition on when no priming text is given: a line break
    (``<eos>`` for word vocabularies) if the vocabulary has one, else id 0."""
    for tok in ("\n", "<eos>"):
        if tok in tokenizer.stoi:
            return np.array([tokenizer.stoi[tok]], dtype=np.int64)
    return np.array([0], dtype=np.int64)


def generate_ids(model, prime_ids, length, temperature=1.0, top_k=None, greedy=False,
                 seed=None, state=None, num_samples=None):
    """Feed ``prime_ids`` (1-D, non-empty) then sample ``length`` new ids.

    Runs with batch 1 in eval mode (restored afterwards). Returns the new ids.
    With ``num_samples=n`` it samples n sequences at once (batch n, one kernel
    call per step for all of them) and returns an (n, length) array; sample i
    draws from its own random stream, child i of ``np.random.SeedSequence(seed)``
    (so a seed reproduces all n samples, and the samples do not share draws).
    """
    given = np.asarray(prime_ids).reshape(-1)
    if given.size and given.dtype.kind not in "iu":   # (a float id was truncated silently)
        raise TypeError(f"prime_ids: expected integer token ids, got dtype {given.dtype}")
    prime_ids = given.astype(np.int64)
    if prime_ids.size == 0:
        raise ValueError("generation needs at least one priming id")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length: expected an integer >= 0, got {length!r}")
    if not (temperature >= 0 or greedy):   # checked before the priming pass runs
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
                or num_samples < 1:
            raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples!r}")
        if isinstance(seed, np.random.Generator):
            raise TypeError("seed: num_samples needs an integer seed or None (each sample "
                            "gets its own stream spawned from it), got a Generator")
        children = np.random.SeedSequence(seed).spawn(int(num_samples))
        rngs = [np.random.default_rng(c) for c in children]
        return _generate_batch(model, prime_ids, int(length), temperature, top_k, greedy,
                               rngs, int(num_samples), state)
    rng = as_generator(seed)
    was_training = model.training
    model.eval()
    out = np.empty(int(length), dtype=np.int64)
    try:
        logits, state = model(prime_ids[:, None], state)          # (T, 1, V)
        last = logits[-1, 0]
        for t in range(int(length)):
            nxt = int(sample_logits(last, temperature, top_k, greedy, rng))
            out[t] = nxt
            if t + 1 < length:
                logits, state = model(np.array([[nxt]], dtype=np.int64), state)
                last = logits[0, 0]
    finally:
        model.train(was_training)
    return out


def _repeat_state(state, n):
    """A batch-1 state (arrays (layers, 1, H), in tuples or lists as the model returns
    them) for n rows: each array repeated along its batch axis; None stays None."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(_repeat_state(s, n) for s in state)
    a = np.asarray(state)
    if a.ndim != 3 or a.shape[1] not in (1, n):
        raise ValueError(f"state: expected arrays of shape (layers, 1, H) (one sequence's "
                         f"state) or (layers, {n}, H), got shape {a.shape}")
    return a if a.shape[1] == n else np.repeat(a, n, axis=1)


def _generate_batch(model, prime_ids, length, temperature, top_k, greedy, rngs, n, state=None):
    """num_samples=n: n independent samples after the same prime, from the same
    starting state (None: zeros) -> (n, length) ids; row i samples with rngs[i]."""
    was_training = model.training
    model.eval()
    out = np.empty((n, length), dtype=np.int64)
    state = _repeat_state(state, n)
    try:
        logits, state = model(np.repeat(prime_ids[:, None], n, axis=1), state)  # (T, n, V)
        last = logits[-1]
        for t in range(length):
            nxt = sample_logits(last, temperature, top_k, greedy, rngs)         # (n,)
            out[:, t] = nxt
            if t + 1 < length:
                logits, state = model(nxt[None, :], state)
                last = logits[0]
    finally:
        model.train(was_training)
    return out


def generate(model, tokenizer, prime="", length=200, temperature=1.0, top_k=None,
             greedy=False, seed=None, num_samples=None):
    """Generate ``length`` tokens of text after ``prime`` and return them
    (without the prime); with ``num_samples=n`` a list of n texts sampled at
    once (see :func:`generate_ids`). Characters in ``prime`` that the
    vocabulary lacks raise ``KeyError``."""
    if not prime:
        ids = start_ids(tokenizer)
    elif getattr(tokenizer, "kind", None) == "word":
        ids = tokenizer.encode(prime, final_eos=False)
    else:
        ids = tokenizer.encode(prime)
    if len(ids) == 0:
        ids = start_ids(tokenizer)
    new = generate_ids(model, ids, length, temperature, top_k, greedy, seed,
                       num_samples=num_samples)
    if num_samples is not None:
        return [tokenizer.decode(row) for row in new]
    return tokenizer.decode(new)
