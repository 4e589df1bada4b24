"""Every example in examples/ runs at reduced size and learns its task."""

import importlib.util
import inspect
import math
import pathlib

import pytest

from fastrnn.cli import DEFAULT_TEXT

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


def load(name):
    spec = importlib.util.spec_from_file_location(f"fastrnn_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counting_learns_unit_weights():
    res = load("counting").main(steps=300, seq_len=10, verbose=False)
    assert abs(res["w_x"] - 1) < 0.02 and abs(res["w_rec"] - 1) < 0.02, res
    assert res["accuracy"] == 1.0 and res["mse"] < 1e-3


def test_many_to_one_classification():
    res = load("classify").main(steps=120, max_len=16, hidden=32, verbose=False)
    assert res["accuracy"] > 0.95, res


def test_bidirectional_tagger():
    res = load("tagger").main(steps=120, seq_len=10, verbose=False)
    assert res["accuracy"] > 0.95, res


def test_bidirectional_is_needed_for_the_tagger():
    """Sanity check of the task: the tag depends on the right neighbour, so
    forward-only features cannot predict it (the label is not a function of the past)."""
    import numpy as np
    tg = load("tagger")
    x, tags = tg.make_data(5000, 10, np.random.default_rng(0))
    # for a fixed left context, the tag still varies with the right neighbour
    mask = x[:, 3] == 3
    assert 0.2 < tags[mask, 4].mean() < 0.8


def test_seq2seq_reverses_sequences():
    res = load("seq2seq").main(steps=400, max_len=5, hidden=64, embed=16, lr=1e-2,
                               verbose=False)
    assert res["exact_match"] > 0.90, res


def test_word_lm_example_at_tiny_size(tmp_path):
    mod = load("word_lm")
    defaults = {k: v.default for k, v in inspect.signature(mod.main).parameters.items()}
    # the seed configuration is the default
    assert (defaults["embed"], defaults["hidden"], defaults["layers"], defaults["batch_size"],
            defaults["seq_len"], defaults["lr"]) == (128, 1024, 1, 20, 30, 0.002)
    assert defaults["clip"] > 0
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:40000]
    path = tmp_path / "words.txt"
    path.write_text(text, encoding="utf-8")
    res = mod.main(str(path), embed=16, hidden=48, batch_size=10, seq_len=10, lr=0.01,
                   max_steps=120, min_freq=2, progress=False, verbose=False,
                   save=str(tmp_path / "w.npz"))
    V = res["vocab_size"]
    assert res["tokenizer"] == "word"
    assert res["initial_val_loss"] > math.log(V) - 0.5               # starts near uniform
    assert res["val_loss"] < res["initial_val_loss"] - 1.5           # and learns
    assert (tmp_path / "w.npz").exists()


def test_bench_quality_smoke(tmp_path, capsys):
    """bench/quality.py at a few steps: fastrnn and torch (same weights, data and
    settings) reach the same losses."""
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location(
        "fastrnn_bench_quality", EXAMPLES.parent / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:30000]
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    rc = quality.main(["--text", str(path), "--budget", "30", "--max-steps", "6", "--hidden", "24",
                       "--embed", "8", "--batch-size", "8", "--seq-len", "16", "--threads", "1",
                       "--cells", "lstm,gru", "--quiet", "--json"])
    assert rc == 0
    import json
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    by = {(r["cell"], r["engine"]): r for r in rows}
    for cell in ("lstm", "gru"):
        a, b = by[cell, "fastrnn"], by[cell, "torch"]
        assert a["steps"] == b["steps"] == 6
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
