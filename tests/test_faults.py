"""Faults during training: SIGKILL (also during a save), a full disk, SIGINT/SIGTERM,
non-finite losses and gradients, progress output into a file.

Most tests run `python -m fastrnn.cli train` in a subprocess on a small model
(one kernel thread) and compare checkpoints array by array, bit for bit.
"""

import os
import random
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastrnn
from fastrnn._atomic import TMP_SUFFIX
from fastrnn.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from fastrnn.cli import DEFAULT_TEXT

pytestmark = pytest.mark.slow

MODEL = ["--hidden", "48", "--embed", "16", "--batch-size", "8", "--seq-len", "32",
         "--threads", "1", "--sample-length", "0", "--eval-every", "0", "--seed", "3"]
STEPS = 300   # about a second of training here: room to kill at many moments


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:20000]
    path = tmp_path_factory.mktemp("faults") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def cli(*args):
    return [sys.executable, "-m", "fastrnn.cli", "train", *args]


def run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(kw.pop("env", {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kw)


@pytest.fixture(scope="module")
def reference_run(textfile, tmp_path_factory):
    """The uninterrupted run, saved at the end: what every resumed run must equal."""
    path = str(tmp_path_factory.mktemp("ref") / "ref.npz")
    r = run(cli(textfile, *MODEL, "--no-progress", "--max-steps", str(STEPS), "--save", path))
    assert r.returncode == 0, r.stderr
    return path


def assert_same_checkpoint(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for group in ("model_state", "optim_state", "extra"):
        da, db = getattr(ca, group), getattr(cb, group)
        assert sorted(da) == sorted(db), group
        for k in da:
            assert da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]), \
                f"{group}/{k} differs"
    for k in ("epoch", "index", "step", "train_tokens", "rng"):
        assert ca.train_state[k] == cb.train_state[k], k


def tmp_files(directory):
    return [n for n in os.listdir(directory) if n.endswith(TMP_SUFFIX)]


# ----------------------------------------------------------------------------- SIGKILL
def kill_when(proc, directory, mode, arg):
    """SIGKILL `proc` after `arg` seconds ("time"), or as soon as the arg-th temporary
    checkpoint file appears ("save": the process is inside a save)."""
    if mode == "time":
        time.sleep(arg)
    else:
        seen, inside = 0, False
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            now_inside = bool(tmp_files(directory))
            if now_inside and not inside:
                seen += 1
                if seen >= arg:
                    break
            inside = now_inside
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_at_random_moments_then_resume_is_bitwise_the_uninterrupted_run(
        textfile, reference_run, tmp_path):
    rng = random.Random(12)
    moments = [("save", 1), ("save", 7), ("save", 60), ("time", 0.6 + rng.random()),
               ("time", 0.9 + rng.random())]
    during_save = 0
    for k, (mode, arg) in enumerate(moments):
        d = tmp_path / f"kill{k}"
        d.mkdir()
        path = str(d / "run.npz")
        args = cli(textfile, *MODEL, "--no-progress", "--max-steps", str(STEPS), "--save", path,
                   "--save-every", "1")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, str(d), mode, arg)
        during_save += bool(tmp_files(str(d)))      # killed inside a save: its tmp file stays
        if not os.path.exists(path):
            continue                                # killed before the first save completed
        ck = load_checkpoint(path)                  # the newest checkpoint is whole
        assert 0 < ck.train_state["step"] <= STEPS
        r = run(cli(textfile, "--no-progress", "--resume", path, "--max-steps", str(STEPS),
                    "--save", path, "--save-every", "50", "--threads", "1",
                    "--sample-length", "0", "--eval-every", "0"))
        assert r.returncode == 0, r.stderr
        assert_same_checkpoint(path, reference_run)
        assert tmp_files(str(d)) == [], "the resumed run's saves remove stale temporary files"
    assert during_save >= 1, "no kill landed inside a save"


# ----------------------------------------------------------------------------- disk full
def test_disk_full_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
        textfile, tmp_path):
    path = str(tmp_path / "ck.npz")
    r = run(cli(textfile, *MODEL, "--no-progress", "--max-steps", "5", "--save", path))
    assert r.returncode == 0, r.stderr
    before = open(path, "rb").read()
    limit = len(before) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for extra in ([], ["--save-every", "2"]):
        r = run(cli(textfile, "--no-progress", "--resume", path, "--max-steps", "10", "--save",
                    path, "--threads", "1", "--sample-length", "0", *extra),
                preexec_fn=small_files)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr, r.stderr
        assert "could not write the checkpoint" in r.stderr and "File too large" in r.stderr
        assert "previous checkpoint" in r.stderr
        assert open(path, "rb").read() == before, "the previous checkpoint changed"
        assert tmp_files(str(tmp_path)) == [], "a partial file was left behind"
    load_checkpoint(path)


def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path,
                                                                      monkeypatch):
    import stat
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    lm = fastrnn.RNNLanguageModel(5, 3, 4, 1, "lstm", 0.0, np.float32, 0)
    save_checkpoint(str(tmp_path / "c.npz"), lm)
    assert events == ["fsync file", "rename", "fsync dir"]


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    lm = fastrnn.RNNLanguageModel(5, 3, 4, 1, "gru", 0.0, np.float32, 0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".c.npz.{dead}.0123456789ab{TMP_SUFFIX}").write_bytes(b"half a checkpoint")
    users = ["c.npz.tmp", f"c.npz.tmp{dead}", "other.npz.tmp1",
             f".other.npz.{dead}.0123456789ab{TMP_SUFFIX}"]
    for name in users:   # a user's files, whatever their names, are never touched
        (tmp_path / name).write_bytes(b"not ours")
    save_checkpoint(str(tmp_path / "c.npz"), lm)
    assert sorted(os.listdir(tmp_path)) == sorted(["c.npz", *users])


def test_nonfinite_parameters_are_never_saved(tmp_path):
    lm = fastrnn.RNNLanguageModel(5, 3, 4, 1, "lstm", 0.0, np.float32, 0)
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, lm)
    before = open(path, "rb").read()
    next(iter(lm.parameters())).data[0, 0] = np.nan
    with pytest.raises(CheckpointWriteError, match="non-finite"):
        save_checkpoint(path, lm)
    assert open(path, "rb").read() == before and tmp_files(str(tmp_path)) == []


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_the_end_of_a_step_saves_and_resumes_exactly(textfile, tmp_path, sig):
    path = str(tmp_path / "s.npz")
    proc = subprocess.Popen(cli(textfile, *MODEL, "--no-progress", "--max-steps", "100000",
                                "--save", path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    proc.stdout.readline()          # the banner: training starts right after it
    time.sleep(0.7)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert f"interrupted by {signal.Signals(sig).name}" in err
    assert f"--resume {path}" in err and "Traceback" not in err
    step = load_checkpoint(path).train_state["step"]
    assert step >= 1
    if sig != signal.SIGTERM:
        return
    # the interrupted run + resume == a run that stopped there by itself
    r = run(cli(textfile, "--no-progress", "--resume", path, "--max-steps", str(step + 7),
                "--save", path, "--threads", "1", "--sample-length", "0"))
    assert r.returncode == 0, r.stderr
    ref = str(tmp_path / "ref.npz")
    r = run(cli(textfile, *MODEL, "--no-progress", "--max-steps", str(step + 7), "--save", ref))
    assert r.returncode == 0, r.stderr
    assert_same_checkpoint(path, ref)


def test_signal_without_save_says_nothing_was_written(textfile):
    proc = subprocess.Popen(cli(textfile, *MODEL, "--no-progress", "--max-steps", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    proc.stdout.readline()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "no checkpoint was written" in err


# ----------------------------------------------------------------------------- non-finite
def small_trainer(**kw):
    from fastrnn.train import TrainConfig, Trainer
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text = f.read()[:6000]
    cfg = TrainConfig(hidden=16, embed=8, batch_size=4, seq_len=16, eval_every=0, threads=1,
                      **kw)
    return Trainer(cfg, text)


@pytest.mark.parametrize("where", ["loss", "gradient norm"])
def test_nonfinite_step_stops_naming_the_step_and_keeps_the_good_checkpoint(
        where, tmp_path, monkeypatch):
    import fastrnn.train as train_mod
    from fastrnn.train import NonFiniteError
    bad_step = 6
    t = small_trainer(max_steps=20)
    poisoned_run = [t]      # the trainer whose step `bad_step` goes wrong (None: no poison)

    def is_bad():
        return poisoned_run[0] is not None and poisoned_run[0].step + 1 == bad_step
    if where == "loss":
        real = train_mod.softmax_cross_entropy

        def poisoned(logits, y):
            loss, d = real(logits, y)
            return (np.nan if is_bad() else loss), d
        monkeypatch.setattr(train_mod, "softmax_cross_entropy", poisoned)
    else:
        real = train_mod.clip_grad_norm

        def poisoned(params, clip):
            n = real(params, clip)
            return np.inf if is_bad() else n
        monkeypatch.setattr(train_mod, "clip_grad_norm", poisoned)
    path = str(tmp_path / "c.npz")
    with pytest.raises(NonFiniteError, match=f"step {bad_step}: the {where} is") as info:
        t.run(progress=False, save_path=path, save_every=5)
    assert info.value.step == bad_step and t.step == bad_step - 1
    assert load_checkpoint(path).train_state["step"] == 5
    # the model is exactly as after step 5: bitwise the run that stopped there
    poisoned_run[0] = None
    ref = small_trainer(max_steps=bad_step - 1)
    ref.run(progress=False)
    for p, q in zip(t.model.parameters(), ref.model.parameters()):
        assert np.array_equal(p.data, q.data)

    # --skip-nonfinite: the step is skipped and counted, training goes on
    t2 = small_trainer(max_steps=20, skip_nonfinite=True)
    poisoned_run[0] = t2
    res = t2.run(progress=False, save_path=path)
    assert res["skipped_steps"] == 1 and res["total_steps"] == 20
    assert all(np.isfinite(p.data).all() for p in t2.model.parameters())
    assert load_checkpoint(path).train_state["skipped_steps"] == 1


def test_divergence_in_the_cli_is_a_clear_error_or_skipped(textfile, tmp_path):
    path = str(tmp_path / "d.npz")
    base = [textfile, "--hidden", "16", "--embed", "8", "--batch-size", "4", "--seq-len", "16",
            "--threads", "1", "--no-progress", "--sample-length", "0", "--eval-every", "0",
            "--optimizer", "sgd", "--lr", "1e38", "--clip", "0", "--max-steps", "20"]
    r = run(cli(*base, "--save", path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "training stopped at step" in r.stderr and "--skip-nonfinite" in r.stderr
    assert not os.path.exists(path)
    r = run(cli(*base, "--skip-nonfinite", "--json"))
    import json
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and res["skipped_steps"] >= 1


# ----------------------------------------------------------------------------- progress
def test_progress_into_a_file_is_plain_lines(textfile, tmp_path):
    log = tmp_path / "err.log"
    with open(log, "w") as err:
        r = subprocess.run(cli(textfile, *MODEL, "--max-steps", "400"), stdout=subprocess.PIPE,
                           stderr=err, timeout=120,
                           env=dict(os.environ, FASTRNN_PROGRESS_SECONDS="0.2"))
    assert r.returncode == 0
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = [l for l in text.splitlines() if l.startswith("train: step ")]
    assert len(lines) >= 2, text
    assert lines[-1].startswith("train: step 400/400 (100 %)"), lines[-1]
    assert all("loss=" in l and "tok/s" in l and "ETA" in l for l in lines)
