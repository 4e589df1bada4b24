"""bench/gru_reset_before.py at a tiny size: one row per batch with fastrnn's, ONNX
Runtime's and the torch-form GRU's times and the ratio of the first two, after the
script checked ONNX Runtime's output against fastrnn's."""
import re

import pytest

from scripts import load_script


def check_rows(out, header):
    """Two rows (B = 1, 3) of fastrnn ms, the peer's ms, peer / fastrnn, the torch-form
    GRU's ms, after a header line naming the machine's ISA and `header`."""
    lines = out.strip().splitlines()
    assert lines[0].startswith("# ") and "ISA" in lines[0] and header in lines[0]
    rows = [re.findall(r"[\d.]+(?= ms)|[\d.]+(?=x\))", line) for line in lines[1:]]
    assert len(rows) == 2 and all(len(r) == 4 for r in rows)
    for fast, peer, ratio, after in ([float(v) for v in r] for r in rows):
        assert fast > 0 and peer > 0 and after > 0
        # times printed to 0.001 ms, the ratio to 0.01, from the unrounded times
        low, high = (peer - 5e-4) / (fast + 5e-4), (peer + 5e-4) / max(fast - 5e-4, 1e-9)
        assert low - 0.005 <= ratio <= high + 0.005


def test_gru_reset_before_bench_rows(capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    script = load_script("bench/gru_reset_before.py")
    assert script.main(["-I", "3", "-H", "5", "-T", "4", "-B", "1", "3", "--rounds", "2"]) == 0
    check_rows(capsys.readouterr().out, "inference")


def test_gru_reset_before_bench_training_rows(capsys):
    """--train: fastrnn's training step, the cell in torch ops (its output and gradients
    checked against fastrnn's first) and the torch-form GRU, with the ratio of the first
    two."""
    pytest.importorskip("torch")
    script = load_script("bench/gru_reset_before.py")
    assert script.main(["--train", "-I", "3", "-H", "5", "-T", "4", "-B", "1", "3",
                        "--rounds", "2"]) == 0
    check_rows(capsys.readouterr().out, "training step")


def test_gru_reset_before_bench_refuses_a_torch_that_disagrees(monkeypatch):
    """The check before timing fails loudly when the torch cell's gradients differ."""
    pytest.importorskip("torch")
    script = load_script("bench/gru_reset_before.py")
    real = script.torch_seed_gru

    def off_by_a_bit(*args):
        run, grads = real(*args)
        return run, lambda: dict(grads(), x=grads()["x"] * 1.01)   # dL/dx off by 1 %
    monkeypatch.setattr(script, "torch_seed_gru", off_by_a_bit)
    with pytest.raises(SystemExit, match="fastrnn and torch disagree on x"):
        script.main(["--train", "-I", "3", "-H", "5", "-T", "4", "-B", "2", "--rounds", "1"])
