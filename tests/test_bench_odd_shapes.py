"""bench/odd_shapes.py at a tiny size: a row per (config, mode) with both times and their
ratio; bad configs are argparse errors naming the option."""
import pytest

from scripts import load_script

pytest.importorskip("torch")


def test_odd_shapes_rows(capsys):
    load_script("bench/odd_shapes.py").main(
        ["--configs", "LSTM:3:5:2:4,GRU:2:7:1:3", "--rounds", "2", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[-4]) for r in rows] == [("LSTM", "eval"), ("LSTM", "train"),
                                             ("GRU", "eval"), ("GRU", "train")]
    for r in rows:
        f, t, ratio = float(r[-3]), float(r[-2]), float(r[-1].rstrip("x"))
        assert f > 0 and t > 0
        assert ratio == pytest.approx(t / f, rel=2e-3, abs=0.01)   # 4 significant digits


@pytest.mark.parametrize("args", [["--configs", "LSTM:3:5:2"], ["--configs", "CNN:3:5:2:4"],
                                  ["--modes", "infer"]])
def test_odd_shapes_bad_arguments(args, capsys):
    with pytest.raises(SystemExit):
        load_script("bench/odd_shapes.py").main(args)
    err = capsys.readouterr().err
    assert ("--configs" in err) or ("--modes" in err)
