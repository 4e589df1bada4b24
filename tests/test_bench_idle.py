"""bench/idle_latency.py at a tiny size: one row per (case, engine) with a first and
a next call time; bad arguments are argparse errors naming the option."""
import pytest

from scripts import load_script


def load():
    return load_script("bench/idle_latency.py")


@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_idle_latency_rows(capsys, precision):
    import fastrnn
    before = fastrnn.get_float32_matmul_precision()
    load().main(["--cells", "gru,rnn_tanh", "-H", "8", "-T", "3", "-B", "2", "--gap", "0",
                 "--trials", "3", "--peers", "none", "--precision", precision])
    assert fastrnn.get_float32_matmul_precision() == before       # restored
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0] and f"precision {precision}" in lines[0]
    rows = lines[2:]
    assert len(rows) == 2 * 2 * 2           # cells x (step, forward) x (1 thread, 2 threads)
    for cell in ("gru", "rnn_tanh"):
        for case in (f"{cell} step I=8 H=8 T=1 B=1", f"{cell} forward I=8 H=8 T=3 B=2"):
            for engine in ("fastrnn 1t", "fastrnn 2t"):
                row = [r for r in rows if r.startswith(case) and engine in r]
                assert len(row) == 1, (case, engine, rows)
                first, nxt = float(row[0].split()[-4]), float(row[0].split()[-2])
                assert first > 0 and nxt > 0


@pytest.mark.parametrize("extra, case", [(["--bidirectional"], "forward I=8 H=8 T=3 B=2 bi"),
                                         (["--lengths"], "forward I=8 H=8 T=3 B=2")])
def test_idle_latency_bidirectional_and_lengths(capsys, extra, case):
    load().main(["--cells", "lstm", "-H", "8", "-T", "3", "-B", "2", "--gap", "0",
                 "--trials", "2", "--peers", "none"] + extra)
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("lstm " + case)]
    assert len(rows) == 2                   # 1 thread, 2 threads
    assert ("# lengths [3, " in out) == (extra == ["--lengths"])


@pytest.mark.parametrize("args, option", [(["--cells", "lstm,tanh"], "--cells"),
                                          (["--lengths", "--peers", "torch"], "--lengths"),
                                          (["--gap", "-1"], "--gap"),
                                          (["--trials", "0"], "--trials"),
                                          (["--peers", "tf"], "--peers"),
                                          (["--precision", "low"], "--precision")])
def test_idle_latency_bad_arguments(args, option, capsys):
    with pytest.raises(SystemExit):
        load().main(args)
    assert option in capsys.readouterr().err
