"""Where one language-model training step spends its time, part by part.

The quality target's model by default (char LSTM, 1 layer, hidden 512,
embedding 64, batch 32, 64-step chunks, Adam, clip 5, 2 threads): embedding,
recurrent layer, decoder, loss, their backwards, clipping and the optimiser,
each timed separately over consecutive training chunks; medians printed.

    python bench/lm_step.py                 # LSTM
    python bench/lm_step.py --cell gru --steps 60
"""

import argparse
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure the checkout, not some installed copy
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from fastrnn.cli import DEFAULT_TEXT  # noqa: E402
from fastrnn.nn import softmax_cross_entropy  # noqa: E402
from fastrnn.optim import clip_grad_norm  # noqa: E402
from fastrnn.train import TrainConfig, Trainer, thread_limits  # noqa: E402

PARTS = ["embedding", "rnn forward", "decoder forward", "loss", "decoder backward",
         "rnn backward", "embedding backward", "clip", "optimiser", "step"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn_tanh", "rnn_relu"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="timed steps (after 5 untimed)")
    p.add_argument("--gathered", action="store_true",
                   help="feed the recurrent layer the gathered embeddings (T, B, E) instead of "
                        "the table by id, as the model does with embedding dropout")
    args = p.parse_args(argv)
    cfg = TrainConfig(cell=args.cell, hidden=args.hidden, embed=args.embed,
                      batch_size=args.batch_size, seq_len=args.seq_len, batching="sequential",
                      optimizer="adam", lr=2e-3, clip=5.0, val_fraction=0.1, eval_every=None,
                      tokenizer="char", seed=0, threads=args.threads)
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        trainer = Trainer(cfg, f.read())
    m, opt = trainer.model, trainer.optimizer
    chunks = iter(trainer.loader)
    times = {k: [] for k in PARTS}
    state = None
    with thread_limits(args.threads):
        for i in range(args.steps + 5):
            chunk = next(chunks)
            t = [time.perf_counter()]
            m.train()
            m.zero_grad()
            by_id = m._embeddings_by_id(*chunk.x.shape) and not args.gathered    # as RNNLanguageModel does
            if by_id:
                ids = m.encoder._check(chunk.x).astype(np.intp); t.append(time.perf_counter())
                out, state = m.rnn(m.encoder.weight.data, state, x_ids=ids)
            else:
                emb = m.drop_in(m.encoder(chunk.x)); t.append(time.perf_counter())
                out, state = m.rnn(emb, state)
            t.append(time.perf_counter())
            logits = m.decoder(m.drop_out(out)); t.append(time.perf_counter())
            _, dlogits = softmax_cross_entropy(logits, chunk.y); t.append(time.perf_counter())
            dout = m.drop_out.backward(m.decoder.backward(dlogits)); t.append(time.perf_counter())
            demb, _ = m.rnn.backward(dout, None); t.append(time.perf_counter())
            if by_id:
                m.encoder.backward_table(demb)
            else:
                m.encoder.backward(m.drop_in.backward(demb))
            t.append(time.perf_counter())
            clip_grad_norm(opt.params, cfg.clip); t.append(time.perf_counter())
            opt.step(); t.append(time.perf_counter())
            if i >= 5:
                for name, a, b in zip(PARTS, t, t[1:]):
                    times[name].append(b - a)
                times["step"].append(t[-1] - t[0])
    print(f"{args.cell}: hidden {args.hidden}, embed {args.embed}, batch {args.batch_size}, "
          f"seq-len {args.seq_len}, {args.threads} threads, embeddings "
          f"{'gathered' if args.gathered else 'by id'}; medians of {args.steps} steps")
    for name in PARTS:
        print(f"  {name:20s} {np.median(times[name]) * 1e3:8.2f} ms")
    tokens = args.batch_size * args.seq_len
    print(f"  {'tokens/s':20s} {tokens / np.median(times['step']):8.0f}")


if __name__ == "__main__":
    main()
