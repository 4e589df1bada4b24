"""bench/eval_in_training.py at a tiny size: each case prints its one result line;
bad arguments are argparse errors naming the option."""
import pytest

from scripts import load_script


def load():
    return load_script("bench/eval_in_training.py")


@pytest.mark.parametrize("args, expect", [
    (["--case", "update", "-H", "24", "-T", "20", "-B", "3", "--rounds", "3"],
     "weights changed before each of 3 calls"),
    (["--case", "steps", "-H", "16", "--steps", "4", "--rounds", "2"],
     "4 LSTMCell H=16 eval steps right after"),
])
def test_eval_in_training_rows(args, expect, capsys):
    load().main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0]
    assert len(lines) == 2 and expect in lines[1], lines


@pytest.mark.parametrize("args, option", [(["--case", "idle"], "--case"),
                                          (["--rounds", "0"], "--rounds"),
                                          (["-H", "0"], "-H")])
def test_eval_in_training_bad_arguments(args, option, capsys):
    with pytest.raises(SystemExit):
        load().main(args)
    assert option in capsys.readouterr().err
