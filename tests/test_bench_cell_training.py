"""bench/cell_training.py at a tiny size: a header naming the ISA, one timing line per
run, torch's gradient compared when it is installed; bad sizes are argparse errors."""
import importlib.util

import pytest

from scripts import load_script


def load():
    return load_script("bench/cell_training.py")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_cell_training_line(capsys, cell):
    ms = load().main(["--cell", cell, "-I", "3", "-H", "5", "-B", "2", "-T", "4",
                      "--rounds", "2", "--peers", "none"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("# ") and "ISA" in out[0] and "B=2, T=4" in out[0]
    assert out[-1].startswith(f"{cell} cell I=3 H=5 B=2 T=4: fastrnn ")
    assert set(ms) == {"fastrnn"} and ms["fastrnn"] > 0


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_cell_training_against_torch(capsys):
    ms = load().main(["--cell", "lstm", "-I", "3", "-H", "5", "-B", "2", "-T", "4",
                      "--rounds", "1"])
    out = capsys.readouterr().out
    diff = float(out.split("largest value: ")[1].split()[0])
    assert diff < 1e-5                      # the same gradient as torch's
    assert set(ms) == {"fastrnn", "torch"} and "ratio" in out


def test_cell_training_refuses_a_zero_size(capsys):
    with pytest.raises(SystemExit):
        load().main(["-H", "0"])
    assert "-H: expected an integer >= 1, got 0" in capsys.readouterr().err
