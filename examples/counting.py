"""Example 1: a linear RNN learns to count.

The smallest recurrent network there is: one input, one hidden unit, no bias,
identity activation, so ``h_t = w_x * x_t + w_rec * h_{t-1}``. Given a
sequence of 0s and 1s, the final state should be the number of 1s, which
happens exactly when ``w_x = 1`` and ``w_rec = 1``. Training by gradient
descent (mean squared error on the final state, Adam) finds those weights.

    python examples/counting.py
"""

import argparse

import numpy as np

import fastrnn
from fastrnn.nn import MSELoss
from fastrnn.optim import Adam


def make_data(n, seq_len, rng):
    x = rng.integers(0, 2, size=(seq_len, n, 1)).astype(np.float64)   # (T, B, 1)
    y = x.sum(axis=0)                                                  # (B, 1)
    return x, y


def main(steps=300, seq_len=10, batch_size=32, lr=0.05, seed=0, verbose=True):
    rng = np.random.default_rng(seed)
    rnn = fastrnn.RNN(1, 1, nonlinearity="identity", bias=False, dtype=np.float64, seed=seed)
    # start away from the answer so there is something to learn
    rnn.weight_ih_l0.data[...] = 0.3
    rnn.weight_hh_l0.data[...] = 0.5
    opt = Adam(rnn.parameters(), lr=lr)
    crit = MSELoss()
    for step in range(steps):
        # decay the step size over the second half, so Adam settles
        opt.lr = lr * min(1.0, 2.0 * (1 - step / steps) + 0.02)
        x, y = make_data(batch_size, seq_len, rng)
        rnn.zero_grad()
        _, h_n = rnn(x)                                   # h_n (1, B, 1)
        loss = crit(h_n[0], y)
        rnn.backward(None, crit.backward()[None])         # gradient only at the final state
        opt.step()
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.6f}  w_x {rnn.weight_ih_l0.data.item():.4f}"
                  f"  w_rec {rnn.weight_hh_l0.data.item():.4f}")

    rnn.eval()
    x, y = make_data(1000, seq_len, rng)
    _, h_n = rnn(x)
    pred = h_n[0]
    result = {
        "w_x": float(rnn.weight_ih_l0.data.item()),
        "w_rec": float(rnn.weight_hh_l0.data.item()),
        "mse": float(((pred - y) ** 2).mean()),
        "accuracy": float((np.rint(pred) == y).mean()),
    }
    if verbose:
        print(f"learned w_x = {result['w_x']:.4f}, w_rec = {result['w_rec']:.4f}; "
              f"rounded count correct on {result['accuracy']:.1%} of 1000 test sequences")
        example = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=np.float64)
        _, h = rnn(example[:, None, None])
        print(f"count of ones in {example.astype(int).tolist()}: {h.item():.3f}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--seq-len", type=int, default=10, help="sequence length")
    ap.add_argument("--seed", type=int, default=0, help="random seed (data and weights)")
    a = ap.parse_args()
    main(steps=a.steps, seq_len=a.seq_len, seed=a.seed)
