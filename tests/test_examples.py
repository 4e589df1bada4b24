"""Every example in examples/ runs at reduced size and learns its task."""

import inspect
import math

import pytest

from fastrnn.cli import DEFAULT_TEXT
from scripts import load_script

pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


def load(name):
    return load_script(f"examples/{name}.py")


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
    quality = load_script("bench/quality.py")
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


def test_bench_quality_recipe_replays_masks_and_schedule(tmp_path, capsys):
    """bench/quality.py --config: a recipe with dropout, locked dropout, weight drop and a
    cosine schedule; torch replays fastrnn's masks and learning rates, so at equal steps the
    losses agree to float rounding; --plot writes the curve."""
    pytest.importorskip("torch")
    quality = load_script("bench/quality.py")
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:12000]
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[model]
layers = 2
hidden = 12
embed = 6
[regularisation]
dropout = 0.3
locked-dropout = true
weight-drop = 0.3
[data]
batch-size = 8
seq-len = 16
[schedule]
lr-schedule = "cosine"
warmup-steps = 2
min-lr = 1e-4
[run]
time-budget = 30
eval-every = 1e-9
""", encoding="utf-8")
    argv = ["--text", str(path), "--config", str(recipe), "--max-steps", "5", "--threads", "1",
            "--quiet", "--json"]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(tmp_path / "q.png")]
    except ImportError:
        pass
    assert quality.main(argv) == 0
    import json
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["train_config"]["weight_drop"] == 0.3 and out["train_config"]["max_steps"] == 5
    a, b = out["results"]
    assert (a["engine"], b["engine"]) == ("fastrnn", "torch") and a["steps"] == b["steps"] == 5
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert a["final_lr"] == pytest.approx(b["final_lr"], rel=1e-12)
    assert len(a["val_curve"]) == len(b["val_curve"]) == 5
    for ca, cb in zip(a["val_curve"], b["val_curve"]):
        assert ca["step"] == cb["step"] and ca["val_loss"] == pytest.approx(cb["val_loss"],
                                                                            abs=1e-5)
    if "--plot" in argv:
        assert (tmp_path / "q.png").stat().st_size > 1000
