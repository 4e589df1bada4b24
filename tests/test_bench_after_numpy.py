"""bench/after_numpy.py at a tiny size: one row per (case, engine) with a quiet call's
and a call-after-matmul's time; bad arguments are argparse errors naming the option."""
import pytest

from scripts import load_script


def load():
    return load_script("bench/after_numpy.py")


def test_after_numpy_rows(capsys):
    import fastrnn
    threads = fastrnn.get_num_threads()
    load().main(["--cells", "lstm,gru", "-H", "8", "-T", "3", "-B", "1,2", "--quiet", "0",
                 "--trials", "2", "--peers", "none"])
    assert fastrnn.get_num_threads() == threads                    # restored
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0] and "numpy" in lines[0]
    rows = lines[2:]
    assert len(rows) == 2 * 2 * 2           # cells x batches x (1 thread, 2 threads)
    for cell in ("lstm", "gru"):
        for B in (1, 2):
            for engine in ("fastrnn 1t", "fastrnn 2t"):
                row = [r for r in rows if r.startswith(f"{cell} forward I=8 H=8 T=3 B={B} ")
                       and engine in r]
                assert len(row) == 1, (cell, B, engine, rows)
                quiet, after = float(row[0].split()[-4]), float(row[0].split()[-2])
                assert quiet > 0 and after > 0


def test_after_numpy_train_rows(capsys):
    load().main(["--mode", "train", "--cells", "gru", "-H", "8", "-T", "3", "-B", "2",
                 "--quiet", "0", "--trials", "2", "--peers", "none"])
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [r.split()[:2] for r in rows] == [["gru", "train"]] * 2, rows
    for row in rows:
        assert float(row.split()[-4]) > 0 and float(row.split()[-2]) > 0


@pytest.mark.parametrize("args, option", [(["--cells", "lstm,tanh"], "--cells"),
                                          (["--mode", "step"], "--mode"),
                                          (["-B", "2,x"], "-B"),
                                          (["-B", "0"], "-B"),
                                          (["--quiet", "-1"], "--quiet"),
                                          (["--trials", "0"], "--trials"),
                                          (["--peers", "tf"], "--peers")])
def test_after_numpy_bad_arguments(args, option, capsys):
    with pytest.raises(SystemExit):
        load().main(args)
    assert option in capsys.readouterr().err
