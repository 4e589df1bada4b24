"""Example 4: encoder-decoder (seq2seq) that reverses digit sequences.

Input: 1..max_len digits (the length varies within a batch). Output: the
same digits in reverse order, then <eos>. The encoder LSTM reads the
right-padded source with ``lengths=`` so its final state (h, c) is taken at
each sequence's own last digit; that state initialises the decoder LSTM,
which is trained with teacher forcing (input: <bos> + target, predicting
target + <eos>; padded targets are ignored by the loss). Gradients flow from
the decoder's initial-state gradient back into the encoder. At test time the
decoder runs greedily, one step at a time, until <eos>.

    python examples/seq2seq.py
"""

import argparse

import numpy as np

import fastrnn
from fastrnn.nn import CrossEntropyLoss, Embedding, Linear
from fastrnn.optim import Adam, clip_grad_norm

N_DIGITS = 10
BOS, EOS, PAD = 10, 11, 12
VOCAB = 13
IGNORE = -100


def make_batch(n, max_len, rng, min_len=1):
    lengths = rng.integers(min_len, max_len + 1, size=n)
    src = np.full((max_len, n), PAD, dtype=np.int64)                   # (T, B), right-padded
    dec_in = np.full((max_len + 1, n), PAD, dtype=np.int64)            # <bos> + reversed
    dec_out = np.full((max_len + 1, n), IGNORE, dtype=np.int64)        # reversed + <eos>
    for b, L in enumerate(lengths):
        digits = rng.integers(0, N_DIGITS, size=L)
        src[:L, b] = digits
        rev = digits[::-1]
        dec_in[0, b] = BOS
        dec_in[1:L + 1, b] = rev
        dec_out[:L, b] = rev
        dec_out[L, b] = EOS
    return src, lengths, dec_in, dec_out


class Seq2Seq(fastrnn.Module):
    def __init__(self, embed=32, hidden=128, seed=0):
        super().__init__()
        self.src_embed = Embedding(VOCAB, embed, rng=seed)
        self.encoder = fastrnn.LSTM(embed, hidden, seed=seed + 1)
        self.tgt_embed = Embedding(VOCAB, embed, rng=seed + 2)
        self.decoder = fastrnn.LSTM(embed, hidden, seed=seed + 3)
        self.out = Linear(hidden, VOCAB, rng=seed + 4)

    def encode(self, src, lengths):
        _, state = self.encoder(self.src_embed(src), lengths=lengths)
        return state                                                   # (h, c), each (1, B, H)

    def forward(self, src, lengths, dec_in):
        state = self.encode(src, lengths)
        y, _ = self.decoder(self.tgt_embed(dec_in), state)            # (T', B, H)
        return self.out(y)                                             # (T', B, V)

    def backward(self, dlogits):
        dy = self.out.backward(dlogits)
        de, (dh0, dc0) = self.decoder.backward(dy)
        self.tgt_embed.backward(de)
        dsrc, _ = self.encoder.backward(None, (dh0, dc0))             # through the final state
        self.src_embed.backward(dsrc)

    def greedy(self, src, lengths, max_out):
        was = self.training
        self.eval()
        state = self.encode(src, lengths)
        B = src.shape[1]
        tok = np.full((1, B), BOS, dtype=np.int64)
        outs = []
        for _ in range(max_out):
            y, state = self.decoder(self.tgt_embed(tok), state)
            tok = self.out(y).argmax(axis=-1)                          # (1, B)
            outs.append(tok[0])
        self.train(was)
        return np.stack(outs)                                          # (max_out, B)


def exact_match(model, n, max_len, rng):
    src, lengths, _, dec_out = make_batch(n, max_len, rng)
    pred = model.greedy(src, lengths, max_len + 1)
    ok = 0
    for b, L in enumerate(lengths):
        ok += bool(np.array_equal(pred[:L + 1, b], dec_out[:L + 1, b]))
    return ok / n


def main(steps=1500, max_len=6, batch_size=64, hidden=128, embed=32, lr=5e-3, seed=0,
         verbose=True):
    rng = np.random.default_rng(seed)
    model = Seq2Seq(embed=embed, hidden=hidden, seed=seed)
    opt = Adam(model.parameters(), lr=lr)
    crit = CrossEntropyLoss(ignore_index=IGNORE)
    for step in range(steps):
        src, lengths, dec_in, dec_out = make_batch(batch_size, max_len, rng)
        model.zero_grad()
        loss = crit(model(src, lengths, dec_in), dec_out)
        model.backward(crit.backward())
        clip_grad_norm(model, 5.0)
        opt.step()
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}")
    acc = exact_match(model, 1000, max_len, np.random.default_rng(seed + 1000))
    if verbose:
        print(f"exact-match accuracy {acc:.1%} on 1000 test sequences of length 1..{max_len}")
        src, lengths, _, _ = make_batch(3, max_len, np.random.default_rng(seed + 7))
        pred = model.greedy(src, lengths, max_len + 1)
        for b, L in enumerate(lengths):
            out = []
            for t in pred[:, b]:
                if t == EOS:
                    break
                out.append(int(t))
            print(f"  {src[:L, b].tolist()} -> {out}")
    return {"exact_match": acc, "loss": loss}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="training steps")
    ap.add_argument("--max-len", type=int, default=6, help="longest sequence")
    ap.add_argument("--hidden", type=int, default=128, help="hidden units")
    ap.add_argument("--seed", type=int, default=0, help="random seed (data and weights)")
    a = ap.parse_args()
    main(steps=a.steps, max_len=a.max_len, hidden=a.hidden, seed=a.seed)
