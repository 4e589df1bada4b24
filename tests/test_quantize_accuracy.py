"""Accuracy of quantised inference on a trained model: a small char-LM trained
briefly in float32 on tinyshakespeare, quantised to int8 and bfloat16, keeps its
validation loss within +0.5 % (int8) and +0.1 % (bf16) of float32 (the issue-10
targets; bench/inference.py measures the same at the quality benchmark's size)."""

import numpy as np
import pytest

import fastrnn
from fastrnn.cli import DEFAULT_TEXT
from fastrnn.metrics import evaluate_lm
from fastrnn.train import TrainConfig, Trainer

LIMITS = {"int8": 0.5, "bfloat16": 0.1}   # per cent above the float32 validation loss


@pytest.fixture(scope="module")
def trained():
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:50_000]
    cfg = TrainConfig(cell="lstm", hidden=128, embed=32, batch_size=16, seq_len=32, lr=3e-3,
                      max_steps=150, val_fraction=0.1, eval_every=None, seed=0, threads=1)
    trainer = Trainer(cfg, text)
    trainer.run(progress=False)
    return trainer


@pytest.mark.parametrize("qdtype,mode", [("int8", "auto"), ("bfloat16", "weight_only"),
                                         ("bfloat16", "dynamic")])
def test_validation_loss_within_target(trained, qdtype, mode):
    ids = trained.val_ids
    base = evaluate_lm(trained.model, ids, num_streams=16, seq_len=128)["loss"]
    assert base < 2.6                                   # it has learned something
    q = fastrnn.quantize(trained.model, qdtype, mode)
    loss = evaluate_lm(q, ids, num_streams=16, seq_len=128)["loss"]
    print(f"{qdtype} {mode}: {loss:.5f} vs float32 {base:.5f} ({100.0 * (loss - base) / base:+.4f} %)")
    excess = 100.0 * (loss - base) / base
    assert excess <= LIMITS[qdtype], f"{qdtype}: {loss:.5f} vs float32 {base:.5f} (+{excess:.3f} %)"
    assert loss != base                                 # the copy really is quantised
    # the same logits up to quantisation error, on a validation chunk
    x = ids[:64].reshape(4, 16).T.copy()
    ref, _ = trained.model.eval()(x)
    got, _ = q(x)
    assert np.abs(got - ref).max() < (0.3 if qdtype == "int8" else 0.05)
