"""Example 2: many-to-one sequence classification.

Each sequence (length 5..max_len, varying within a batch) is noise tokens with
exactly one "marker" token hidden at a random position; the class is which
marker it was. The network must carry that one piece of information to the
end of the sequence: Embedding -> LSTM (``lengths=`` so each sequence's final
state is taken at its own last step) -> Linear on the final hidden state ->
softmax cross-entropy.

    python examples/classify.py
"""

import argparse

import numpy as np

import fastrnn
from fastrnn.nn import CrossEntropyLoss, Embedding, Linear
from fastrnn.optim import Adam, clip_grad_norm

N_CLASSES = 4          # marker tokens 0..3
VOCAB = 12             # noise tokens 4..11


def make_data(n, max_len, rng, min_len=5):
    lengths = rng.integers(min_len, max_len + 1, size=n)
    x = rng.integers(N_CLASSES, VOCAB, size=(max_len, n))              # (T, B) noise
    labels = rng.integers(0, N_CLASSES, size=n)
    pos = (rng.random(n) * lengths).astype(np.int64)                   # marker position < length
    x[pos, np.arange(n)] = labels
    return x, lengths, labels


class Classifier(fastrnn.Module):
    def __init__(self, embed=16, hidden=48, seed=0):
        super().__init__()
        self.embed = Embedding(VOCAB, embed, rng=seed)
        self.lstm = fastrnn.LSTM(embed, hidden, seed=seed + 1)
        self.head = Linear(hidden, N_CLASSES, rng=seed + 2)

    def forward(self, x, lengths):
        e = self.embed(x)                                  # (T, B, E)
        _, (h_n, _) = self.lstm(e, lengths=lengths)        # h_n (1, B, H): state at each last step
        self._hshape = h_n.shape
        return self.head(h_n[0])                           # (B, classes)

    def backward(self, dlogits):
        dh = self.head.backward(dlogits)[None]             # (1, B, H)
        de, _ = self.lstm.backward(None, (dh, None))
        self.embed.backward(de)


def accuracy(model, x, lengths, labels):
    model.eval()
    pred = model(x, lengths).argmax(axis=1)
    model.train()
    return float((pred == labels).mean())


def main(steps=300, max_len=20, batch_size=64, hidden=48, lr=1e-2, seed=0, verbose=True):
    rng = np.random.default_rng(seed)
    model = Classifier(hidden=hidden, seed=seed)
    opt = Adam(model.parameters(), lr=lr)
    crit = CrossEntropyLoss()
    x_test, len_test, y_test = make_data(2000, max_len, np.random.default_rng(seed + 1000))
    for step in range(steps):
        x, lengths, labels = make_data(batch_size, max_len, rng)
        model.zero_grad()
        loss = crit(model(x, lengths), labels)
        model.backward(crit.backward())
        clip_grad_norm(model, 5.0)
        opt.step()
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  test accuracy "
                  f"{accuracy(model, x_test, len_test, y_test):.3f}")
    acc = accuracy(model, x_test, len_test, y_test)
    if verbose:
        print(f"test accuracy {acc:.1%} on 2000 sequences (chance {1 / N_CLASSES:.0%})")
    return {"accuracy": acc, "loss": loss}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--max-len", type=int, default=20, help="longest sequence")
    ap.add_argument("--hidden", type=int, default=48, help="hidden units")
    ap.add_argument("--seed", type=int, default=0, help="random seed (data and weights)")
    a = ap.parse_args()
    if a.max_len < 5:   # sequences are 5..max_len tokens long
        ap.error(f"--max-len: expected an integer >= 5, got {a.max_len}")
    main(steps=a.steps, max_len=a.max_len, hidden=a.hidden, seed=a.seed)
