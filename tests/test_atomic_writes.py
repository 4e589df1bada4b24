"""Every file fastrnn writes goes through fastrnn._atomic.replacing: a failed write
leaves the previous file and no temporary file, and no file of the user's is ever
overwritten or removed, whatever its name."""

import os
import stat

import numpy as np
import pytest

import fastrnn
import fastrnn._atomic as atomic
from fastrnn._atomic import TMP_SUFFIX, replacing, stale_temporaries
from fastrnn.checkpoint import CheckpointWriteError, save_checkpoint


def _save_npz(path, m):
    fastrnn.save(path, m)


def _save_safetensors(path, m):
    fastrnn.save(path, m)


def _save_model(path, m):
    from fastrnn import dask as fdask
    from fastrnn.nn import Sequential
    fdask.save_model(path, Sequential(m))   # a module tree: to_bytes writes no file itself


def _export_onnx(path, m):
    pytest.importorskip("onnx")
    from fastrnn import onnx as fonnx
    fonnx.export(m, path)


def _save_checkpoint(path, m):
    lm = fastrnn.RNNLanguageModel(5, 3, 4, 1, "lstm", 0.0, np.float32, m.seed)  # m's seed
    save_checkpoint(path, lm)


WRITERS = {"npz": (_save_npz, "m.npz"), "safetensors": (_save_safetensors, "m.safetensors"),
           "model": (_save_model, "m.npz"), "onnx": (_export_onnx, "m.onnx"),
           "checkpoint": (_save_checkpoint, "c.npz")}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, monkeypatch, writer):
    write, name = WRITERS[writer]
    path = str(tmp_path / name)
    m = fastrnn.LSTM(3, 4, seed=0)
    write(path, m)
    before = open(path, "rb").read()
    users = [f"{name}.tmp", f"{name}.tmp{os.getpid()}", f".{name}.tmp"]
    for user in users:
        (tmp_path / user).write_bytes(b"a file of the user's")

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError):
        write(path, fastrnn.LSTM(3, 4, seed=1))
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == sorted([name, *users])
    for user in users:
        assert (tmp_path / user).read_bytes() == b"a file of the user's"

    write(path, fastrnn.LSTM(3, 4, seed=1))      # and a good write still replaces it
    assert open(path, "rb").read() != before
    assert sorted(os.listdir(tmp_path)) == sorted([name, *users])


def test_temporary_names_are_unique_hidden_and_found_as_stale(tmp_path):
    path = tmp_path / "x.bin"
    with replacing(path) as a, replacing(path) as b:
        assert a != b and os.path.exists(a) and os.path.exists(b)
        for t in (a, b):
            base = os.path.basename(t)
            assert base.startswith(".x.bin.") and base.endswith(TMP_SUFFIX)
        assert sorted(n for n, _ in stale_temporaries(path)) == sorted([a, b])
        assert {pid for _, pid in stale_temporaries(path)} == {os.getpid()}
        with open(b, "wb") as f:
            f.write(b"b")
        with open(a, "wb") as f:
            f.write(b"a")
    assert path.read_bytes() == b"a"              # the outer block renamed last
    assert stale_temporaries(path) == []


def test_exception_in_the_block_removes_the_temporary(tmp_path):
    path = tmp_path / "y.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyError):
        with replacing(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new, half")
            raise KeyError("serialising failed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["y.bin"]


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with replacing(tmp_path / "z.bin") as tmp:
            pass
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "z.bin").st_mode & 0o777 == 0o644


def test_checkpoint_write_error_still_says_nothing_was_left(tmp_path, monkeypatch):
    lm = fastrnn.RNNLanguageModel(5, 3, 4, 1, "gru", 0.0, np.float32, 0)

    def fail(src, dst):
        raise OSError(27, "File too large")
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(CheckpointWriteError, match="File too large"):
        save_checkpoint(str(tmp_path / "c.npz"), lm)
    assert os.listdir(tmp_path) == []


def test_a_name_of_255_bytes_can_be_written(tmp_path):
    name = "é" * 123 + ".npz"                 # 250 bytes in UTF-8, the longest kind of name
    assert len(os.fsencode(name)) <= 255
    fastrnn.save(str(tmp_path / name), fastrnn.GRU(2, 3, seed=0))
    assert os.listdir(tmp_path) == [name]
    with replacing(tmp_path / name) as tmp:
        assert len(os.fsencode(os.path.basename(tmp))) <= 255
        assert [n for n, _ in stale_temporaries(tmp_path / name)] == [tmp]


def test_saving_over_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    """(An audit found the link replaced by a file, the target left with the old model.)"""
    target, link = tmp_path / "real.npz", tmp_path / "link.npz"
    fastrnn.save(target, fastrnn.GRU(2, 3, seed=0))
    link.symlink_to(target)
    fastrnn.save(link, fastrnn.GRU(2, 3, seed=1))
    assert link.is_symlink()
    np.testing.assert_array_equal(fastrnn.load(target).weight_hh_l0.data,
                                  fastrnn.GRU(2, 3, seed=1).weight_hh_l0.data)
    with pytest.raises(RuntimeError):           # a writer killed part-way, as it were
        with replacing(link) as tmp:
            left = tmp
            raise RuntimeError
    os.close(os.open(left, os.O_CREAT | os.O_WRONLY))   # (replacing removed it: put back)
    assert [n for n, _ in stale_temporaries(link)] == [left]     # found beside the target


def test_an_existing_file_keeps_its_permissions(tmp_path):
    """A private (0600) model stays private when saved over (it became 0644)."""
    path = tmp_path / "m.npz"
    fastrnn.save(path, fastrnn.GRU(2, 3, seed=0))
    os.chmod(path, 0o600)
    fastrnn.save(path, fastrnn.GRU(2, 3, seed=1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_os_error_on_the_temporary_names_the_users_file(tmp_path):
    path = tmp_path / "m.npz"
    with pytest.raises(OSError, match=r"No space left on device \(writing .*m\.npz; it "
                                      r"was left as it was\)") as info:
        with replacing(path) as tmp:
            raise OSError(28, "No space left on device", tmp)
    assert info.value.filename == str(path) and info.value.errno == 28
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_read_only_file_can_be_saved_over_and_stays_read_only(tmp_path):
    """The old mode is given to the new file once it is written (given before, a
    non-root writer could not open its own temporary file)."""
    path = tmp_path / "m.npz"
    fastrnn.save(path, fastrnn.GRU(2, 3, seed=0))
    os.chmod(path, 0o400)
    fastrnn.save(path, fastrnn.GRU(2, 3, seed=1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    np.testing.assert_array_equal(fastrnn.load(path).weight_hh_l0.data,
                                  fastrnn.GRU(2, 3, seed=1).weight_hh_l0.data)
