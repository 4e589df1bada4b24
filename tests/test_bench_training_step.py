"""bench/training_step.py at tiny sizes: the steps line and the two dW rows with
their times and ratios; the L2 setting is restored after; bad sizes are argparse
errors naming the option."""
import pytest

from fastrnn import _cpu_cache, _dense
from scripts import load_script


def load():
    return load_script("bench/training_step.py")


def test_steps_prints_three_positive_medians(capsys):
    load().main(["steps", "--cell", "gru", "-I", "3", "-H", "5", "-T", "4", "-B", "2",
                 "--warmup", "1", "--seconds", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "gru training" in lines[0]
    words = lines[1].split()
    fwd, bwd, step = float(words[1]), float(words[4]), float(words[7])
    # each step's whole time is at least its forward's and its backward's, so the medians
    # keep that order (medians do not add: a median step can be under fwd + bwd, as a
    # clean-clone CI run found, 0.131 against 0.071 + 0.062)
    assert fwd > 0 and bwd > 0 and step >= max(fwd, bwd)


def test_dw_prints_both_task_sizes_and_restores_the_l2(capsys, monkeypatch):
    seen = []
    real = _dense._set_l2_bytes
    monkeypatch.setattr(_dense, "_set_l2_bytes", lambda b: (seen.append(b), real(b)))
    load().main(["dw", "-T", "3", "-B", "4", "-K", "20", "-N", "7", "--rounds", "2",
                 "--calls", "1"])
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["48-row", "L2-sized"]
    assert float(rows[0].split()[2]) > 0 and "1.000x" in rows[0]
    assert seen == [0, _cpu_cache.l2_bytes()] * 2 + [_cpu_cache.l2_bytes()]


@pytest.mark.parametrize("args, option", [(["steps", "-H", "0"], "-H"),
                                          (["dw", "--rounds", "0"], "--rounds")])
def test_bad_sizes_are_named(args, option, capsys):
    with pytest.raises(SystemExit):
        load().main(args)
    assert option in capsys.readouterr().err
