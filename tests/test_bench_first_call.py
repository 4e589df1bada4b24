"""bench/first_call.py at a tiny size: one fresh process per engine and trial, a row per
(config, engine) with its timings; the ratios are the peer's over fastrnn's; bad
arguments are argparse errors naming the option."""
import pytest

from scripts import load_script


def rows_of(out):
    lines = out.strip().splitlines()
    assert lines[0].startswith("# CPU: ") and "ISA" in lines[0]
    return [line.split() for line in lines[3:]]


def test_first_call_rows_without_peers(capsys):
    load_script("bench/first_call.py").main(
        ["--configs", "LSTM:3:5:2:4:eval,GRU:2:7:1:3:train", "--trials", "2",
         "--threads", "1", "--peers", "none"])
    rows = rows_of(capsys.readouterr().out)
    assert [(r[0], r[1]) for r in rows] == [("LSTM:3:5:2:4:eval", "fastrnn"),
                                            ("GRU:2:7:1:3:train", "fastrnn")]
    for r in rows:
        assert len(r) == 7 and all(float(v) > 0 for v in r[2:])


def test_first_call_ratios_against_torch(capsys):
    pytest.importorskip("torch")
    load_script("bench/first_call.py").main(
        ["--configs", "RNN:3:5:2:4:eval", "--trials", "1", "--threads", "1", "--peers", "torch"])
    ours, theirs = rows_of(capsys.readouterr().out)
    assert (ours[1], theirs[1]) == ("fastrnn", "torch") and len(theirs) == 9
    build, first = (float(v) for v in ours[3:5])
    t_build, t_first = (float(v) for v in theirs[3:5])
    # the medians are printed to 2 decimals: allow for the rounding
    assert float(theirs[7].rstrip("x")) == pytest.approx(t_first / first, rel=0.05, abs=0.02)
    assert float(theirs[8].rstrip("x")) == pytest.approx((t_build + t_first) / (build + first),
                                                         rel=0.05, abs=0.02)


@pytest.mark.parametrize("args", [["--configs", "LSTM:3:5:2:4"], ["--configs", "CNN:3:5:2:4:eval"],
                                  ["--configs", "LSTM:3:5:2:4:infer"], ["--trials", "0"],
                                  ["--threads", "0"], ["--peers", "tensorflow"]])
def test_first_call_bad_arguments(args, capsys):
    with pytest.raises(SystemExit):
        load_script("bench/first_call.py").main(args)
    err = capsys.readouterr().err
    assert args[0] in err
