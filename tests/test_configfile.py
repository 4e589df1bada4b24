"""`fastrnn train --config FILE.toml`: parsing, tables, precedence (command line >
file > defaults), clear errors for unknown keys and bad values, --print-config,
the effective config in the output, the JSON and the checkpoint."""

import json
import pathlib

import pytest

from fastrnn._configfile import ConfigFileError, read_config
from fastrnn.checkpoint import load_checkpoint
from fastrnn.cli import DEFAULT_TEXT, build_parser, main

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs"
TINY = ["--threads", "1", "--no-progress", "--sample-length", "0"]


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:6000]
    path = tmp_path_factory.mktemp("cfg") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


def write(tmp_path, body, name="c.toml"):
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    return p


def last_json(out):
    return json.loads([l for l in out.strip().splitlines() if l.strip()][-1])


def train_parser():
    return build_parser()._train_parser


def test_keys_tables_and_both_spellings(tmp_path):
    p = write(tmp_path, '''
textfile = "a.txt"
hidden = 24
seq_len = 12
[regularisation]
weight-drop = 0.25
locked-dropout = true
[schedule]
lr-schedule = "cosine"
min_lr = 1e-4
warmup-steps = 3
[run]
time-budget = 2      # an integer where a float is expected is fine
''')
    v = read_config(train_parser(), p)
    assert v == dict(textfile="a.txt", hidden=24, seq_len=12, weight_drop=0.25,
                     locked_dropout=True, lr_schedule="cosine", min_lr=1e-4, warmup_steps=3,
                     time_budget=2.0)
    assert isinstance(v["time_budget"], float)


@pytest.mark.parametrize("body, match", [
    ("hiden = 3", r"c.toml: unknown key 'hiden' \(did you mean 'hidden'\?\)"),
    ("[modle]\nhidden = 3", r"c.toml: unknown table \[modle\]"),
    ("hidden = 0", r"c.toml: hidden: expected an integer >= 1, got 0"),
    ("hidden = 2.5", r"c.toml: hidden: expected an integer, got a float 2.5"),
    ("hidden = true", r"c.toml: hidden: expected an integer, got a boolean True"),
    ('cell = "transformer"', r"c.toml: cell: expected one of 'rnn_tanh', 'rnn_relu', 'lstm', "
                             r"'gru', got 'transformer'"),
    ("cell = 3", r"c.toml: cell: expected one of .*, got an integer 3"),
    ("dropout = 1.5", r"c.toml: dropout: expected a fraction in \[0, 1\), got 1.5"),
    ("[regularisation]\nweight-drop = -0.1",
     r"c.toml: \[regularisation\] weight-drop: expected a fraction in \[0, 1\), got -0.1"),
    ('lr = "fast"', r"c.toml: lr: expected a number, got a string 'fast'"),
    ("lr = 0", r"c.toml: lr: expected a finite number > 0, got 0.0"),
    ('locked-dropout = "yes"', r"c.toml: locked-dropout: expected true or false, got a string"),
    ("hidden = 3\n[model]\nhidden = 4", r"c.toml: \[model\] hidden: hidden is already set"),
    ("seq-len = 3\nseq_len = 4", r"seq_len: seq_len is already set \(as seq-len\)"),
    ("config = 'x.toml'", r"unknown key 'config'"),
    ("hidden = ", r"c.toml: not valid TOML"),
])
def test_bad_files_are_clear_errors(tmp_path, capsys, body, match):
    p = write(tmp_path, body)
    with pytest.raises(ConfigFileError, match=match):
        read_config(train_parser(), p)
    assert main(["train", "--config", str(p)]) == 2            # the CLI: one line, status 2
    err = capsys.readouterr().err
    assert err.startswith("fastrnn train: error: ") and "c.toml" in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_command_line_overrides_file_and_file_overrides_defaults(tmp_path, textfile, capsys):
    p = write(tmp_path, f'''
textfile = "{textfile}"
[model]
hidden = 12
embed = 6
[data]
batch-size = 4
seq-len = 8
[run]
max-steps = 3
seed = 7
''')
    ck = tmp_path / "ck.npz"
    assert main(["train", "--config", str(p), "--hidden", "10", "--seed", "0", "--save",
                 str(ck), "--json", *TINY]) == 0
    out = capsys.readouterr().out
    res = last_json(out)
    cfg = res["config"]
    assert cfg["hidden"] == 10 and cfg["seed"] == 0                  # command line wins
    assert cfg["embed"] == 6 and cfg["batch_size"] == 4 and cfg["max_steps"] == 3   # file
    assert cfg["layers"] == 1 and cfg["lr"] == 2e-3                  # defaults
    assert res["steps"] == 3 and res["config_file"] == str(p)
    # the effective config is printed before training ...
    line = [l for l in out.splitlines() if l.startswith("config (")][0]
    assert "hidden=10" in line and "embed=6" in line and str(p) in line
    # ... and stored in the checkpoint
    assert load_checkpoint(ck).config == cfg


def test_print_config_roundtrips(tmp_path, capsys):
    assert main(["train", "--print-config", "--hidden", "77", "--lr-schedule", "linear",
                 "--locked-dropout", "--time-budget", "30"]) == 0
    text = capsys.readouterr().out
    assert "hidden = 77" in text and "# max-steps =  (not set)" in text
    p = write(tmp_path, text)
    assert main(["train", "--config", str(p), "--print-config"]) == 0
    assert capsys.readouterr().out == text
    v = read_config(train_parser(), p)
    assert v["locked_dropout"] is True and v["time_budget"] == 30.0


@pytest.mark.parametrize("name", ["shakespeare_char.toml", "shakespeare_char_float32.toml",
                                  "shakespeare_char_5min.toml"])
def test_shipped_recipes_parse_and_start(name, capsys):
    v = read_config(train_parser(), CONFIGS / name)
    assert v["lr_schedule"] == "cosine" and v["time_budget"] in (300.0, 900.0)
    # the recipe runs (two steps, at a tiny size, on the bundled text)
    assert main(["train", "--config", str(CONFIGS / name), "--hidden", "16", "--embed", "8",
                 "--layers", "1", "--max-steps", "2", "--time-budget", "60",
                 "--val-fraction", "0.002", "--json", *TINY]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["steps"] == 2 and res["schedule"]["lr_schedule"] == "cosine"
    assert res["regularisation"]["dropout"] == v["dropout"]
