"""The `fastrnn` command line: train (options, --json, validation split, time budget,
errors, save/resume), generate, bench forwarding."""

import json
import os
import sys
import time
import types

import numpy as np
import pytest

import fastrnn

from fastrnn.cli import DEFAULT_TEXT, main

SMALL = ["--hidden", "16", "--embed", "8", "--batch-size", "4", "--seq-len", "16",
         "--threads", "1", "--no-progress", "--sample-length", "20"]


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:6000]
    path = tmp_path_factory.mktemp("cli") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


def last_json(out):
    lines = [l for l in out.strip().splitlines() if l.strip()]
    return json.loads(lines[-1])


def test_train_json_summary(textfile, capsys):
    rc = main(["train", str(textfile), *SMALL, "--max-steps", "8", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = last_json(out)
    for key in ("val_loss", "val_ppl", "train_tokens", "tokens_per_s", "steps", "seconds"):
        assert key in res
    assert res["steps"] == 8 and res["train_tokens"] == 8 * 4 * 16
    assert res["val_ppl"] == pytest.approx(np.exp(res["val_loss"]))
    assert res["tokens_per_s"] > 0 and res["seconds"] > 0
    # --val-fraction 0.1 (default): the last 600 characters, every one but the first predicted
    assert res["val_tokens"] == 599
    assert "--- sample ---" in out and len(res["sample"]) == 20


def test_train_json_reports_schedule_regularisation_and_curve(textfile, tmp_path, capsys):
    best = tmp_path / "best.npz"
    rc = main(["train", str(textfile), *SMALL, "--max-steps", "12", "--json", "--layers", "2",
               "--dropout", "0.1", "--locked-dropout", "--weight-drop", "0.2",
               "--lr-schedule", "cosine", "--warmup-steps", "2", "--min-lr", "1e-4",
               "--eval-every", "1e-9", "--save-best", str(best)])
    out = capsys.readouterr().out
    assert rc == 0
    res = last_json(out)
    assert res["schedule"] == {"lr_schedule": "cosine", "lr": 2e-3, "min_lr": 1e-4,
                               "warmup_steps": 2, "driven_by": "steps",
                               "final_lr": res["schedule"]["final_lr"]}
    assert 1e-4 < res["schedule"]["final_lr"] < 2e-4
    assert res["regularisation"] == {"dropout": 0.1, "locked_dropout": True,
                                     "weight_drop": 0.2}
    curve = res["val_curve"]
    assert [c["step"] for c in curve] == list(range(1, 13))
    assert curve[-1]["val_loss"] == res["val_loss"]
    assert res["best_val_loss"] == min(c["val_loss"] for c in curve)
    assert res["best_checkpoint"] == str(best) and best.exists()
    assert "best validation loss" in out


def test_new_options_reject_bad_values(capsys):
    for argv in (["--weight-drop", "1"], ["--min-lr", "-1"], ["--warmup-steps", "-2"],
                 ["--lr-schedule", "step"], ["--lr", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["train", *argv])
        assert e.value.code == 2
        assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru"])
def test_train_cells_and_options(textfile, capsys, cell):
    rc = main(["train", str(textfile), *SMALL, "--cell", cell, "--layers", "2",
               "--dropout", "0.1", "--optimizer", "sgd", "--lr", "0.5", "--clip", "1",
               "--max-steps", "3", "--val-fraction", "0.2", "--json"])
    assert rc == 0
    res = last_json(capsys.readouterr().out)
    assert res["cell"] == cell and res["val_tokens"] == 1199


@pytest.mark.parametrize("tok", ["word", "bpe"])
def test_train_other_tokenizers(textfile, capsys, tok):
    rc = main(["train", str(textfile), *SMALL, "--tokenizer", tok, "--bpe-merges", "50",
               "--max-steps", "3", "--json"])
    assert rc == 0
    res = last_json(capsys.readouterr().out)
    assert res["tokenizer"] == tok
    assert res["vocab_size"] > (100 if tok == "word" else 60)


class SteppingClock:
    """fastrnn.train's `time` with a perf_counter that moves 0.125 s a call, so that a
    training step (timed by two calls) takes exactly 0.125 s: time-budget runs stop
    after a known number of steps on any machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.125
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def stepping_clock(monkeypatch):
    from fastrnn import train as train_mod
    monkeypatch.setattr(train_mod, "time", SteppingClock())


def test_time_budget_stops_training(textfile, capsys, stepping_clock):
    """Training stops at the first step that reaches the budget: 1.0 s of 0.125 s steps."""
    rc = main(["train", str(textfile), *SMALL, "--time-budget", "1.0", "--json",
               "--sample-length", "0"])
    res = last_json(capsys.readouterr().out)
    assert rc == 0
    assert res["steps"] == 8 and res["seconds"] == 1.0


def test_periodic_validation(textfile, capsys, stepping_clock):
    """--eval-every 0.2 over 1.0 s of 0.125 s steps: a validation at the first step that
    ends 0.2 s or more of training after the last one (every second step)."""
    rc = main(["train", str(textfile), *SMALL, "--time-budget", "1.0", "--eval-every", "0.2",
               "--json", "--sample-length", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    periodic = [l for l in out.splitlines() if l.startswith("step ") and "val loss" in l]
    assert [l.split()[1] for l in periodic] == ["2:", "4:", "6:", "8:"], periodic
    assert last_json(out)["val_loss"] is not None


def test_epochs_limit(textfile, capsys):
    rc = main(["train", str(textfile), *SMALL, "--epochs", "1", "--json", "--sample-length", "0"])
    res = last_json(capsys.readouterr().out)
    assert rc == 0 and res["epochs"] == 1.0
    # 5400 training characters in 4 streams of 1350: ceil(1349 / 16) chunks
    assert res["steps"] == 85


def test_learning_on_the_bundled_corpus(capsys):
    """No TEXTFILE: the bundled tinyshakespeare; a few hundred steps beat the unigram model."""
    rc = main(["train", "--hidden", "64", "--embed", "16", "--batch-size", "16",
               "--seq-len", "32", "--lr", "0.01", "--max-steps", "150", "--val-fraction", "0.02",
               "--threads", "1", "--no-progress", "--json", "--sample-length", "50"])
    out = capsys.readouterr().out
    assert rc == 0 and "tinyshakespeare.txt" in out
    res = last_json(out)
    assert res["vocab_size"] == 65
    # uniform is ln 65 = 4.17 nats, character unigram about 3.3; this gets well below
    assert res["val_loss"] < 2.9, res


def test_empty_and_short_text_are_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert main(["train", str(empty), *SMALL]) == 2
    assert "empty" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be", encoding="utf-8")
    assert main(["train", str(short), *SMALL]) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.txt"), *SMALL]) == 2
    assert "no such file" in capsys.readouterr().err
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    assert main(["train", str(binary), *SMALL]) == 2
    assert "UTF-8" in capsys.readouterr().err


def test_bad_option_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--cell", "transformer"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["train", "--val-fraction", "1.5"])


def test_save_generate_and_resume(textfile, tmp_path, capsys):
    ck = tmp_path / "model.npz"
    assert main(["train", str(textfile), *SMALL, "--max-steps", "4", "--save", str(ck)]) == 0
    capsys.readouterr()
    assert main(["generate", str(ck), "--prime", "ROMEO:", "--length", "30", "--seed", "3",
                 "--json"]) == 0
    out = capsys.readouterr().out
    res = last_json(out)
    assert out.startswith("ROMEO:") and len(res["text"]) == 30
    assert main(["generate", str(ck), "--prime", "ROMEO:", "--length", "30", "--seed", "3",
                 "--json"]) == 0
    assert last_json(capsys.readouterr().out)["text"] == res["text"]            # seeded
    assert main(["generate", str(ck), "--greedy", "--length", "10", "--top-k", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert main(["generate", str(ck), "--prime", "RO", "--length", "12", "--seed", "4",
                 "--num-samples", "3", "--quantize", "int8", "--json"]) == 0
    out = capsys.readouterr().out
    res = last_json(out)
    assert len(res["texts"]) == 3 and all(len(t) == 12 for t in res["texts"])
    assert res["tokens_per_s"] > 0 and out.count("--- sample ") == 3
    assert main(["generate", str(ck), "--prime", "\u263a", "--length", "5"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err

    # resume continues exactly where the first run stopped
    assert main(["train", str(textfile), "--resume", str(ck), "--max-steps", "7", "--threads",
                 "1", "--no-progress", "--json", "--sample-length", "0",
                 "--save", str(ck)]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["steps"] == 3 and res["total_steps"] == 7


def test_corrupt_checkpoint_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    assert main(["generate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "checkpoint" in err


def test_bench_is_forwarded_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("fastrnn.benchmark.runner")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fastrnn.benchmark.runner", fake)
    import fastrnn.benchmark
    monkeypatch.setattr(fastrnn.benchmark, "runner", fake, raising=False)
    assert main(["bench", "--quick", "--cell", "lstm"]) == 0
    assert seen["argv"] == ["--quick", "--cell", "lstm"]


def test_console_script_is_declared():
    import pathlib
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert 'fastrnn = "fastrnn.cli:main"' in pyproject.read_text()


def test_resume_hint_passes_the_remaining_time_budget():
    from fastrnn.cli import _resume_hint, build_parser
    args = build_parser().parse_args(["train", "--save", "ck.npz", "--time-budget", "900",
                                      "--save-best", "best.npz"])
    args._time_left = 612.34
    hint = _resume_hint(args)
    assert "--resume ck.npz --save ck.npz" in hint
    assert "--time-budget 612.3" in hint and "--save-best best.npz" in hint
    args = build_parser().parse_args(["train", "--save", "ck.npz", "--threads", "1"])
    assert "--threads 1" in _resume_hint(args)        # the run's thread count goes on


def test_progress_bar_is_plain_lines_unless_on_a_terminal():
    import io

    from tqdm import tqdm

    from fastrnn.train import _LineProgress, progress_bar_class

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_bar_class(Terminal()) is tqdm
    log = io.StringIO()
    cls = progress_bar_class(log)
    assert cls is _LineProgress
    bar = cls(total=4.0, unit="s", file=log, desc="torch lstm", leave=False,
              bar_format="ignored")
    bar.update(4.0)
    bar.set_postfix_str("loss=1.000")
    bar.close()
    line = log.getvalue()
    assert "\r" not in line and line.count("\n") == 1
    assert line.startswith("torch lstm: 4/4 s of training (100 %), loss=1.000")


def test_resume_keeps_the_checkpoints_eval_every_unless_given(textfile, tmp_path, capsys):
    """--eval-every not given on --resume: the checkpoint's value stays (it was
    replaced by the flag's default, 60)."""
    ck = tmp_path / "m.npz"
    assert main(["train", str(textfile), *SMALL, "--max-steps", "2", "--eval-every", "0",
                 "--save", str(ck)]) == 0
    capsys.readouterr()
    common = ["train", str(textfile), "--resume", str(ck), "--threads", "1", "--no-progress",
              "--sample-length", "0"]
    assert main(common + ["--max-steps", "3"]) == 0
    assert " eval_every=0.0 " in capsys.readouterr().out
    assert main(common + ["--max-steps", "3", "--eval-every", "5"]) == 0
    assert " eval_every=5.0 " in capsys.readouterr().out
    assert main(["train", str(textfile), *SMALL, "--max-steps", "1"]) == 0
    assert " eval_every=60.0 " in capsys.readouterr().out    # the default, without --resume


def test_bad_arguments_are_usage_errors_not_tracebacks(tmp_path, capsys):
    """From the CLI audit: an empty text path trained on the bundled text; negative
    sizes, lengths and counts reached NumPy or ONNX Runtime as tracebacks."""
    assert main(["train", "", *SMALL, "--max-steps", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    from fastrnn.benchmark.onnx_file import main as onnx_main
    from fastrnn.benchmark.runner import build_parser
    bad = [["-H", "-1"], ["-T", "0"], ["-B", "x"], ["--repeats", "0"], ["--threads", "0"],
           ["--budget", "-1"], ["--budget", "nan"], ["--sgemm-size", "0"], ["--cell", ""],
           ["--mode", ""], ["--gen-length", "0"]]
    for args in bad:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(args)
        assert e.value.code == 2, args
    for args in (["--onnx", str(tmp_path / "missing.onnx")], ["--onnx", "x.onnx", "-B", "-1"]):
        with pytest.raises(SystemExit) as e:
            onnx_main(args)
        assert e.value.code == 2, args
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["generate", "m.npz", "--length", "-1"])
    assert e.value.code == 2


def test_thread_counts_beyond_a_c_int_are_refused():
    import subprocess
    with pytest.raises(ValueError, match=r"n must be in \[1, 4096\]"):
        fastrnn.set_num_threads(2 ** 31)
    if not hasattr(os, "sched_getaffinity"):
        return
    cores = len(os.sched_getaffinity(0))     # what an unreadable OMP_NUM_THREADS falls back to
    for value, want in (("1_0", cores), ("\u0663", cores), ("99999999999", cores), ("3,1", 3)):
        env = dict(os.environ, OMP_NUM_THREADS=value)
        out = subprocess.run([sys.executable, "-c",
                              "import fastrnn; print(fastrnn.get_num_threads())"],
                             env=env, capture_output=True, text=True)
        assert int(out.stdout.strip()) == want, (value, out.stdout, out.stderr)


def test_save_paths_are_checked_before_training(textfile, tmp_path, capsys):
    """From an audit (session 25): `--save TEXT` overwrote the training text with the
    checkpoint; --save and --save-best on one file kept the last model as 'best'; a
    bad path was found only after the whole run. All refused before training."""
    text = tmp_path / "victim.txt"
    text.write_bytes(textfile.read_bytes())
    before = text.read_bytes()
    config = tmp_path / "mine.toml"                 # --save over the --config file (s35)
    config.write_text("hidden = 16\n")
    cases = [
        (["--save", str(text)], "is the training text"),
        (["--save-best", str(text)], "is the training text"),
        (["--save", str(tmp_path / "a.npz"), "--save-best", str(tmp_path / "." / "a.npz")],
         "name the same file"),
        (["--save", str(text / "x.npz")], "is not a directory"),
        (["--save", str(tmp_path / "no" / "x.npz")], "does not exist"),
        (["--save", str(tmp_path)], "is a directory"),
        (["--save-every", "5"], "--save-every needs --save"),
        (["--save-best", str(tmp_path / "b.npz"), "--val-fraction", "0"],
         "--save-best needs validation data"),
        (["--sample-length", str(10**11)], "--sample-length: expected at most"),
        (["--config", str(config), "--save", str(config)], "is the --config file"),
    ]
    for extra, message in cases:
        rc = main(["train", str(text), *SMALL, "--time-budget", "30", *extra])
        cap = capsys.readouterr()
        assert rc == 2 and message in cap.err, (extra, cap.err)
        assert "config:" not in cap.out, extra    # refused before training was set up
    assert text.read_bytes() == before and config.read_text() == "hidden = 16\n"
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()


def test_train_refuses_sizes_beyond_memory_and_negative_seeds(textfile, capsys, monkeypatch):
    import fastrnn.train
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (2 << 30) // 4096}   # a 2 GiB machine
    monkeypatch.setattr(fastrnn.train.os, "sysconf", lambda name: pages[name])
    for extra in (["--hidden", str(10**9)], ["--layers", str(10**6), "--hidden", "2"]):
        rc = main(["train", str(textfile), *SMALL, "--max-steps", "1", *extra])
        cap = capsys.readouterr()
        assert rc == 2 and "more than this machine's 2.0 GiB" in cap.err, cap.err
        assert "config:" not in cap.out                      # --layers 10**8 ran for minutes
    pages["SC_PHYS_PAGES"] = -1                              # sysconf cannot tell: no refusal
    assert main(["train", str(textfile), *SMALL, "--max-steps", "1", "--sample-length",
                 "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "x.npz", "--length", str(10**9)]) == 2
    assert "--length x --num-samples: expected at most" in capsys.readouterr().err
    for cmd in (["train", str(textfile)], ["generate", "x.npz"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--seed", "-1"])
        assert "argument --seed: expected an integer >= 0" in capsys.readouterr().err


def test_resume_names_ignored_options_and_generate_joins_words(textfile, tmp_path, capsys):
    ck = tmp_path / "w.npz"
    assert main(["train", str(textfile), *SMALL, "--max-steps", "3", "--tokenizer", "word",
                 "--save", str(ck)]) == 0
    capsys.readouterr()
    assert main(["train", str(textfile), *SMALL, "--resume", str(ck), "--save", str(ck),
                 "--max-steps", "4", "--lr", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "ignoring --lr 0.5 (the checkpoint has 0.002)" in err   # was silent
    conf = tmp_path / "c.toml"
    conf.write_text("lr = 0.25\n")                                 # from a --config file too
    assert main(["train", str(textfile), *SMALL, "--config", str(conf), "--resume", str(ck),
                 "--save", str(ck), "--max-steps", "5"]) == 0
    assert "ignoring --lr 0.25" in capsys.readouterr().err
    # a setting typed with its built-in default's value counts too (it was silent)
    assert main(["train", str(textfile), *SMALL, "--resume", str(ck), "--save", str(ck),
                 "--max-steps", "6", "--hidd=256"]) == 0
    assert "ignoring --hidden 256 (the checkpoint has 16)" in capsys.readouterr().err
    assert main(["train", str(textfile), "--resume", str(ck), "--print-config"]) == 2
    assert "--print-config: not with --resume" in capsys.readouterr().err
    assert main(["generate", str(ck), "--prime", "the king", "--length", "3", "--seed",
                 "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the king") and out[8] in " \n" and out[9] != " "  # was glued
    assert main(["generate", str(textfile)]) == 2
    err = capsys.readouterr().err
    assert "not a fastrnn checkpoint" in err and "pickle" not in err


def test_version_and_the_dask_extra_named_when_missing(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fastrnn {fastrnn.__version__}"
    import subprocess
    code = ("import sys; sys.modules['dask'] = None\n"      # as if Dask were not installed
            "try:\n    import fastrnn.dask\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert 'needs Dask: pip install "fastrnn[dask]"' in out   # was: No module named 'dask'


@pytest.mark.parametrize("command", [["train", "--time-budget", "1"],
                                     ["generate", "m.npz", "--length", "5"],
                                     ["bench", "--mode", "forward"]])
def test_a_thread_count_past_the_limit_is_a_usage_error_naming_the_option(command, capsys):
    """(An audit found set_num_threads' "n must be in [1, 4096]" raised after the data
    had loaded; `fastrnn bench` ended in that traceback until session 33.)"""
    with pytest.raises(SystemExit) as e:
        main(command + ["--threads", "100000"])
    assert e.value.code == 2
    assert "--threads: expected an integer in [1, 4096], got 100000" in capsys.readouterr().err


def test_json_is_strict_and_has_every_documented_key(textfile, capsys):
    """A diverged run's validation curve holds NaN: printed as null, not a bare NaN that
    strict parsers refuse; "checkpoint" and "sample" are present (null) without --save
    or a sample (session 35, a user trial)."""
    rc = main(["train", str(textfile), *SMALL, "--max-steps", "3", "--lr", "1e300",
               "--skip-nonfinite", "--json", "--sample-length", "0", "--eval-every", "0"])
    assert rc == 0
    line = [l for l in capsys.readouterr().out.strip().splitlines() if l.strip()][-1]

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    res = json.loads(line, parse_constant=refuse)
    assert res["checkpoint"] is None and res["sample"] is None
    assert res["val_curve"] and res["val_curve"][-1]["val_loss"] is None


def test_resume_keeps_the_checkpoints_thread_count_unless_given(textfile, tmp_path, capsys):
    ck = tmp_path / "t.npz"
    assert main(["train", str(textfile), *SMALL, "--max-steps", "2", "--save", str(ck)]) == 0
    capsys.readouterr()
    common = ["train", str(textfile), "--resume", str(ck), "--no-progress",
              "--sample-length", "0", "--max-steps", "3"]
    assert main(common) == 0
    assert " threads=1 " in capsys.readouterr().out      # SMALL's --threads 1, kept
    assert main(common + ["--threads", "2"]) == 0
    assert " threads=2 " in capsys.readouterr().out


def test_train_config_built_in_python_is_held_to_the_command_lines_limits():
    from fastrnn.train import TrainConfig
    for kw, match in [(dict(time_budget=float("nan")), "time_budget must be a finite"),
                      (dict(eval_seq_len=0), "eval_seq_len must be an integer >= 1"),
                      (dict(max_steps=-1), "max_steps must be an integer >= 1 or None"),
                      (dict(epochs=-1), "epochs must be a finite number >= 0"),
                      (dict(eval_every=-1), "eval_every must be"),
                      (dict(seed=-1), "seed must be an integer >= 0"),
                      (dict(threads=0), "threads must be an integer >= 1"),
                      (dict(clip=float("inf")), "clip must be a finite number")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw).validate()
    TrainConfig(max_steps=5, epochs=0.5, time_budget=3.0, eval_every=None).validate()
