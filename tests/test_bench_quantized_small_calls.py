"""bench/quantized_small_calls.py at a tiny size: both rows printed with a time; bad
arguments are argparse errors naming the option."""
import pytest

from scripts import load_script


def load():
    return load_script("bench/quantized_small_calls.py")


def test_quantized_small_calls_rows(capsys):
    load().main(["-I", "3", "-H", "5", "--capacity", "4", "--streams", "2", "--calls", "2",
                 "--samples", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0]
    rows = lines[2:]
    assert len(rows) == 2 and rows[0].startswith("LSTM(5, 5)") and "2 of 4 streams" in rows[1]
    assert all(float(r.split()[-1]) > 0 for r in rows)


@pytest.mark.parametrize("args, option", [(["--streams", "9", "--capacity", "4"], "--streams"),
                                          (["--calls", "0"], "--calls")])
def test_quantized_small_calls_bad_arguments(args, option, capsys):
    with pytest.raises(SystemExit):
        load().main(args)
    assert option in capsys.readouterr().err
