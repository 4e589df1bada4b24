"""Example 3: many-to-many tagging with a bidirectional LSTM.

Every position of a digit sequence gets a tag that depends on *both* sides:
tag[t] = 1 if the left neighbour x[t-1] is larger than the right neighbour
x[t+1] (outside the sequence counts as 0), else 0. A forward-only RNN cannot
see x[t+1] when it has to tag position t; the reverse direction of a
bidirectional LSTM can. Embedding -> BiLSTM (outputs of both directions
concatenated) -> Linear per position -> cross-entropy per position.

    python examples/tagger.py
"""

import argparse

import numpy as np

import fastrnn
from fastrnn.nn import CrossEntropyLoss, Embedding, Linear
from fastrnn.optim import Adam, clip_grad_norm

VOCAB = 6     # digits 0..5


def make_data(n, seq_len, rng):
    x = rng.integers(0, VOCAB, size=(n, seq_len))                        # (B, T)
    padded = np.pad(x, ((0, 0), (1, 1)))                                 # zeros outside
    tags = (padded[:, :-2] > padded[:, 2:]).astype(np.int64)             # (B, T)
    return x, tags


class Tagger(fastrnn.Module):
    def __init__(self, embed=16, hidden=32, seed=0):
        super().__init__()
        self.embed = Embedding(VOCAB, embed, rng=seed)
        self.rnn = fastrnn.LSTM(embed, hidden, bidirectional=True, batch_first=True,
                                seed=seed + 1)
        self.head = Linear(2 * hidden, 2, rng=seed + 2)

    def forward(self, x):                    # x (B, T) ids
        out, _ = self.rnn(self.embed(x))     # (B, T, 2H): [forward | reverse]
        return self.head(out)                # (B, T, 2)

    def backward(self, dlogits):
        dx, _ = self.rnn.backward(self.head.backward(dlogits))
        self.embed.backward(dx)


def accuracy(model, x, tags):
    model.eval()
    pred = model(x).argmax(axis=-1)
    model.train()
    return float((pred == tags).mean())


def main(steps=300, seq_len=12, batch_size=32, hidden=32, lr=1e-2, seed=0, verbose=True):
    rng = np.random.default_rng(seed)
    model = Tagger(hidden=hidden, seed=seed)
    opt = Adam(model.parameters(), lr=lr)
    crit = CrossEntropyLoss()
    x_test, t_test = make_data(1000, seq_len, np.random.default_rng(seed + 1000))
    for step in range(steps):
        x, tags = make_data(batch_size, seq_len, rng)
        model.zero_grad()
        loss = crit(model(x), tags)
        model.backward(crit.backward())
        clip_grad_norm(model, 5.0)
        opt.step()
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  per-tag test accuracy "
                  f"{accuracy(model, x_test, t_test):.3f}")
    acc = accuracy(model, x_test, t_test)
    if verbose:
        base = max(t_test.mean(), 1 - t_test.mean())
        print(f"per-tag test accuracy {acc:.1%} (majority class {base:.0%})")
    return {"accuracy": acc, "loss": loss}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--seq-len", type=int, default=12, help="sequence length")
    ap.add_argument("--hidden", type=int, default=32, help="hidden units")
    ap.add_argument("--seed", type=int, default=0, help="random seed (data and weights)")
    a = ap.parse_args()
    main(steps=a.steps, seq_len=a.seq_len, hidden=a.hidden, seed=a.seed)
