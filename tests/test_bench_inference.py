"""Smoke tests of the runner's inference reports (--quantize, --mode stream) at tiny
sizes: every part runs, the JSON has the documented keys, the peers' results are
checked, targets are judged from the numbers (never asserted on speed)."""

import importlib.util
import json

import pytest

from fastrnn.benchmark import inference
from fastrnn.benchmark.runner import main

TINY = ["--threads", "1", "--repeats", "1", "--sgemm-size", "64", "--json"]


def _installed(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


def run_json(capsys, argv):
    status = main(argv)
    out = capsys.readouterr().out
    return status, json.loads(out.strip().splitlines()[-1]), out


def test_quantize_report_rows_ratios_and_errors(capsys):
    status, summary, out = run_json(capsys, ["--quantize", "int8,bf16", "--cell", "lstm,gru,rnn",
                                             "-I", "6", "-H", "16", "-T", "3", "-B", "2"] + TINY)
    assert status == 0, out
    assert summary["results"] == []                     # --quantize alone: no main table
    rows = summary["quantize"]
    assert [(r["cell"], r["B"]) for r in rows] == [("lstm", 2), ("gru", 2), ("rnn_tanh", 2)]
    for r in rows:
        assert {"fastrnn f32", "fastrnn int8", "fastrnn bfloat16"} <= set(r["ms"])
        assert all(v > 0 for v in r["ms"].values())
        err = r["max_abs_err_vs_f32"]
        assert 0 < err["fastrnn int8"] < 0.1 and 0 < err["fastrnn bfloat16"] < 0.05
        for name, t in r["targets"].items():
            assert t["met"] == (t["value"] >= t["target"] if name != "int8_error_below_torch"
                                else t["value"] < t["target"])
        assert r["ratios"]["int8_vs_f32"] == pytest.approx(
            r["ms"]["fastrnn f32"] / r["ms"]["fastrnn int8"])
        if _installed("onnxruntime", "onnx"):
            assert r["onnxruntime_agrees"] is True
    if _installed("torch"):
        assert "torch int8" in rows[0]["ms"] and "torch int8" in rows[1]["ms"]
        assert rows[0]["max_abs_err_vs_f32"]["torch int8"] > 0
        assert "int8_error_below_torch" in rows[0]["targets"]
        assert "torch int8" not in rows[2]["ms"] and rows[2]["notes"]
    assert "int8/torch8" in out and "err int8" in out


def test_quantize_grid_is_the_issues():
    assert [c[3] for c in inference.QUANT_GRID] == [1, 2, 4, 8, 16, 64, 1]
    assert inference.QUANT_GRID[0][:3] == (512, 512, 50)
    assert inference.QUANT_GRID[-1] == (1024, 1024, 25, 1)


def test_stream_report_all_parts(capsys):
    status, summary, out = run_json(capsys, ["--mode", "stream", "--cell", "lstm,gru", "-I", "4",
                                             "-H", "8", "--stream-chunks", "2", "--gen-hidden",
                                             "8", "--gen-length", "4"] + TINY)
    assert status == 0, out
    rows = summary["stream"]
    assert not [r for r in rows if "error" in r], rows
    parts = [r["part"] for r in rows]
    assert parts.count("pool") == 2 and parts.count("audio") == 1
    assert parts.count("overhead") == 4 and parts.count("generate") == 1
    for r in rows:
        if r["part"] == "pool":
            assert r["check_ok"] and r["streams_open"] == 1024 and r["streams_stepped"] == 64
            assert r["ratio_vs_module"] == pytest.approx(r["us"]["pool step"]
                                                         / r["us"]["module call"])
        elif r["part"] == "audio":
            assert all(r["checks_ok"].values()) and r["chunk"] == 64 and r["H"] == 32
            assert r["samples_per_s"]["fastrnn module"] > 0
            if _installed("onnxruntime", "onnx"):
                assert r["ratio_vs_onnxruntime"] > 0 and "onnxruntime" in r["checks_ok"]
        elif r["part"] == "overhead":
            assert r["H"] == 32 and r["B"] == 1 and r["kernel_us"] > 0
            assert r["overhead_us"] == pytest.approx(r["call_us"] - r["kernel_us"])
            assert r["target"]["met"] == (r["overhead_us"] <= 3.0)
        elif _installed("torch"):
            assert r["tokens_per_s"]["fastrnn"] > 0 and r["tokens_per_s"]["torch"] > 0
            assert r["greedy_tokens_equal"] == "20/20"
    assert "Python overhead" in out and "samples/s" in out


def test_stream_and_forward_modes_together(capsys):
    status, summary, out = run_json(capsys, ["--mode", "forward,stream", "--cell", "rnn",
                                             "--peers", "none", "-I", "4", "-H", "8", "-T", "2",
                                             "-B", "2", "--stream-chunks", "1", "--gen-length",
                                             "2", "--gen-hidden", "8"] + TINY)
    assert status == 0, out
    assert [r["mode"] for r in summary["results"]] == ["forward"]
    assert any(r["part"] == "generate" and "skipped" in r for r in summary["stream"])
