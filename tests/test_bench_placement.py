"""bench/helper_placement.py at a tiny size: a row per way with a median and a count;
bad arguments are argparse errors naming the option."""
import pytest

from scripts import load_script


def load():
    return load_script("bench/helper_placement.py")


def test_helper_placement_rows(capsys):
    load().main(["--rounds", "2", "--gap", "0", "-H", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0]
    rows = {line[:20].strip(): line[20:].split() for line in lines[2:]}
    assert set(rows) == {"caller alone", "thread per call", "kept, steps aside"}
    for median, over, _, total in rows.values():
        assert float(median) > 0 and 0 <= int(over) <= int(total) == 2


@pytest.mark.parametrize("args, option", [(["--rounds", "0"], "--rounds"),
                                          (["--gap", "-1"], "--gap")])
def test_helper_placement_bad_arguments(args, option, capsys):
    with pytest.raises(SystemExit):
        load().main(args)
    assert option in capsys.readouterr().err
