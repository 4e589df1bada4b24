"""Example 5: word-level language model (the seed's configuration, plus clipping).

Embedding 128 -> 1 LSTM layer of 1024 units -> Linear decoder over the word
vocabulary; batch 20, 30 time steps of truncated BPTT with the state carried
between chunks, Adam with learning rate 0.002 (the seed's figures), and the
gradient norm clipped to 5 (ours: the seed gives no norm clip).
Every line ends with <eos>; the last 10% of the text is held out and the
script reports validation perplexity, then samples a few lines.

    python examples/word_lm.py path/to/text.txt --epochs 2
    python examples/word_lm.py --time-budget 120      # bundled tinyshakespeare

Runs on any UTF-8 text file (PTB-style files with one sentence per line are
the classic use).
"""

import argparse
import os

from fastrnn.generate import generate
from fastrnn.train import TrainConfig, Trainer

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fastrnn",
                            "data", "tinyshakespeare.txt")


def main(textfile=None, embed=128, hidden=1024, layers=1, batch_size=20, seq_len=30,
         lr=0.002, clip=5.0, dropout=0.0, epochs=None, time_budget=None, max_steps=None,
         val_fraction=0.1, min_freq=1, seed=0, threads=None, sample_words=50,
         progress=True, verbose=True, save=None):
    path = textfile or DEFAULT_TEXT
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cfg = TrainConfig(cell="lstm", layers=layers, hidden=hidden, embed=embed, dropout=dropout,
                      batch_size=batch_size, seq_len=seq_len, optimizer="adam", lr=lr,
                      clip=clip, epochs=epochs, time_budget=time_budget, max_steps=max_steps,
                      val_fraction=val_fraction, tokenizer="word", word_min_freq=min_freq,
                      seed=seed, threads=threads, eval_every=None)
    trainer = Trainer(cfg, text, text_name=os.path.basename(path))
    if verbose:
        print(f"{len(trainer.train_ids):,} training words, {len(trainer.val_ids):,} validation "
              f"words, vocabulary {trainer.tokenizer.vocab_size:,}")
    first_val = trainer.evaluate()
    res = trainer.run(progress=progress, save_path=save)
    res["initial_val_loss"] = first_val["loss"] if first_val else None
    if verbose:
        print(f"validation perplexity {res['val_ppl']:.1f} (untrained: "
              f"{first_val['ppl']:.1f}); {res['tokens_per_s']:,.0f} words/s")
        if sample_words:
            print(generate(trainer.model, trainer.tokenizer, length=sample_words,
                           temperature=0.8, seed=seed))
    res["trainer"] = trainer
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("textfile", nargs="?", help="UTF-8 text (default: bundled tinyshakespeare)")
    ap.add_argument("--embed", type=int, default=128, help="embedding size")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden units")
    ap.add_argument("--layers", type=int, default=1, help="LSTM layers")
    ap.add_argument("--batch-size", type=int, default=20, help="sequences per batch")
    ap.add_argument("--seq-len", type=int, default=30, help="sequence length")
    ap.add_argument("--lr", type=float, default=0.002, help="Adam learning rate")
    ap.add_argument("--clip", type=float, default=5.0, help="gradient norm clip (0: off)")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout on the embeddings, between layers and before the decoder")
    ap.add_argument("--epochs", type=float, default=None, help="passes over the training text")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    ap.add_argument("--max-steps", type=int, default=None, help="training steps at most")
    ap.add_argument("--threads", type=int, default=None,
                    help="kernel threads (None: all cores)")
    ap.add_argument("--save", default=None, help="write a checkpoint here (.npz)")
    a = ap.parse_args()
    try:
        main(a.textfile, a.embed, a.hidden, a.layers, a.batch_size, a.seq_len, a.lr, a.clip,
             a.dropout, a.epochs, a.time_budget, a.max_steps, threads=a.threads, save=a.save)
    except (OSError, ValueError) as e:   # a missing or too short text, a bad size
        ap.exit(2, f"{ap.prog}: error: {e}\n")
