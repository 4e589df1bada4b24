"""bench/float64.py at a tiny size: every (cell, mode) row printed with its two
times and their ratio; bad arguments are argparse errors naming the option."""
import pytest

from scripts import load_script


def load():
    return load_script("bench/float64.py")


def test_float64_bench_rows(capsys):
    load().main(["-I", "3", "-H", "5", "-T", "4", "-B", "2", "--rounds", "2", "--seconds", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [(c, m) for c in ("lstm", "gru", "rnn_tanh")
                                           for m in ("forward", "train")]
    for r in rows:
        f32, f64, ratio = float(r[2]), float(r[3]), float(r[4])
        assert f32 > 0 and f64 > 0
        # the ratio printed to 2 decimals, each time to 4 significant digits
        assert ratio == pytest.approx(f64 / f32, rel=2e-3, abs=0.01)


@pytest.mark.parametrize("args, option", [(["--cells", "lstm,tanh"], "--cells"),
                                          (["--modes", "eval"], "--modes")])
def test_float64_bench_bad_arguments(args, option, capsys):
    with pytest.raises(SystemExit):
        load().main(args)
    assert option in capsys.readouterr().err
