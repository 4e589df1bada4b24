"""Language-model metrics: mean per-token negative log-likelihood and perplexity.

NLL is in nats per token (natural log); perplexity = exp(NLL). For a
character model, bits per character = NLL / ln 2.
"""

import math

import numpy as np

from fastrnn.data.batching import eval_streams
from fastrnn.nn.loss import softmax_cross_entropy

__all__ = ["perplexity", "bits_per_token", "NLLMeter", "evaluate_lm"]

IGNORE = -100


def perplexity(nll):
    """exp(mean NLL); ``inf`` when that overflows."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def bits_per_token(nll):
    return nll / math.log(2.0)


class NLLMeter:
    """Running sum of per-token NLL: ``update(sum_nll, n_tokens)`` or
    ``update_mean(mean_nll, n_tokens)``; ``mean``, ``ppl``."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, sum_nll, n_tokens):
        self.total += float(sum_nll)
        self.count += int(n_tokens)

    def update_mean(self, mean_nll, n_tokens):
        self.update(float(mean_nll) * n_tokens, n_tokens)

    @property
    def mean(self):
        return self.total / self.count if self.count else math.nan

    @property
    def ppl(self):
        return perplexity(self.mean)


def evaluate_lm(model, ids, num_streams=32, seq_len=128):
    """Mean per-token NLL of ``model`` on the whole id sequence ``ids``.

    Every token after the first is predicted exactly once
    (:func:`fastrnn.data.batching.eval_streams`): the text is split into
    ``num_streams`` contiguous streams read in parallel, ``seq_len`` steps at
    a time with the state carried. Runs in eval mode (no dropout, no caches)
    and restores the previous mode. Returns ``{"loss", "ppl", "tokens"}``.
    """
    x, y = eval_streams(ids, num_streams, pad_id=0, ignore_index=IGNORE)
    was_training = model.training
    model.eval()
    meter = NLLMeter()
    state = None
    try:
        for i in range(0, x.shape[0], seq_len):
            logits, state = model(x[i:i + seq_len], state)
            tgt = y[i:i + seq_len]
            s, _ = softmax_cross_entropy(logits, tgt, ignore_index=IGNORE, reduction="sum",
                                         need_grad=False)
            meter.update(s, int((tgt != IGNORE).sum()))
    finally:
        model.train(was_training)
    return {"loss": meter.mean, "ppl": meter.ppl, "tokens": meter.count}
