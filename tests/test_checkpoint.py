"""Checkpoints: one .npz (no pickle) with model, optimiser, vocabulary and config;
exact resume; clear errors for corrupt files."""

import json
import zipfile

import numpy as np
import pytest

from fastrnn._atomic import TMP_SUFFIX
from fastrnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastrnn.cli import DEFAULT_TEXT
from fastrnn.data.tokenizers import CharTokenizer
from fastrnn.lm import RNNLanguageModel
from fastrnn.optim import Adam
from fastrnn.train import TrainConfig, Trainer

with open(DEFAULT_TEXT, encoding="utf-8") as _f:
    TEXT = _f.read()[:2000]


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


def small_cfg(**kw):
    base = dict(hidden=24, embed=8, batch_size=8, seq_len=12, lr=3e-3, eval_every=None,
                val_fraction=0.1, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_roundtrip_and_no_pickle(tmp_path):
    tok = CharTokenizer.fit("hello world\n")
    model = RNNLanguageModel(tok.vocab_size, 6, 10, num_layers=2, cell="gru", seed=3)
    opt = Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad[...] = 0.1
    opt.step()
    path = tmp_path / "ck.npz"
    save_checkpoint(path, model, opt, tok, config={"note": "x"}, train_state={"step": 1},
                    extra={"state0": np.ones((2, 3, 10), np.float32)})
    with np.load(path, allow_pickle=False) as z:                    # plain arrays only
        names = set(z.files)
        meta = json.loads(str(z["meta"]))
    assert "model/rnn.weight_hh_l1" in names and "optim/state.0.exp_avg" in names
    assert meta["format"] == "fastrnn-lm-checkpoint" and meta["tokenizer"]["type"] == "char"

    ck = load_checkpoint(path)
    m2 = ck.build_model()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.data, p2.data)
    assert m2.config() == model.config()
    assert ck.build_tokenizer().itos == tok.itos
    assert ck.config == {"note": "x"} and ck.train_state == {"step": 1}
    np.testing.assert_array_equal(ck.extra["state0"], 1)
    opt2 = Adam(m2.parameters())
    ck.load_optimizer(opt2)
    assert opt2.step_count == 1 and opt2.lr == 1e-2
    np.testing.assert_array_equal(opt2.state[0]["exp_avg"], opt.state[0]["exp_avg"])
    assert not any(p.name.endswith(TMP_SUFFIX) for p in tmp_path.iterdir())


@pytest.mark.parametrize("kw", [
    dict(cell="lstm", layers=2, dropout=0.2),                      # all RNG streams in use
    dict(cell="gru", batching="random"),
    dict(cell="rnn_tanh", optimizer="sgd", lr=0.5, momentum=0.9, clip=1.0),
])
def test_resume_is_bitwise_identical(tmp_path, kw):
    total, first = 30, 11
    full = Trainer(small_cfg(max_steps=total, **kw), TEXT)
    n_epoch = len(full.loader)
    assert n_epoch < total                                          # crosses an epoch border
    full_result = full.run(progress=False)

    part = Trainer(small_cfg(max_steps=first, **kw), TEXT)
    part.run(progress=False, save_path=tmp_path / "ck.npz")
    resumed = Trainer.resume(tmp_path / "ck.npz", TEXT, max_steps=total)
    resumed_result = resumed.run(progress=False)

    assert part.losses + resumed.losses == full.losses              # exact, not approximate
    # train_loss is the mean of the last 50 steps' losses across the resume too (it
    # averaged only the resumed run's 19 steps)
    assert resumed_result["train_loss"] == full_result["train_loss"]
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)
    assert resumed.step == total
    assert resumed.last_val["loss"] == full.last_val["loss"]


def test_save_between_any_two_steps_resumes_exactly(tmp_path):
    """Saving by hand between two train steps (what save_every does) resumes exactly."""
    full = Trainer(small_cfg(max_steps=12), TEXT)
    full.run(progress=False, save_path=tmp_path / "a.npz", save_every=5)
    assert load_checkpoint(tmp_path / "a.npz").train_state["step"] == 12
    part = Trainer(small_cfg(max_steps=12), TEXT)
    for _ in range(5):
        part.train_step(next(part.loader.epoch(part.epoch, start=part.index)))
        part.index += 1
    part.save(tmp_path / "b.npz")
    rest = Trainer.resume(tmp_path / "b.npz", TEXT)
    rest.run(progress=False)
    assert full.losses[5:] == rest.losses


def test_resume_refuses_other_text_and_settings(tmp_path):
    t = Trainer(small_cfg(max_steps=2), TEXT)
    t.run(progress=False, save_path=tmp_path / "ck.npz")
    with pytest.raises(ValueError, match="different text"):
        Trainer.resume(tmp_path / "ck.npz", TEXT[:-100])
    with pytest.raises(ValueError, match="override"):
        Trainer.resume(tmp_path / "ck.npz", TEXT, hidden=64)


@pytest.fixture
def good_checkpoint(tmp_path):
    t = Trainer(small_cfg(max_steps=1), TEXT)
    t.run(progress=False)
    return t.save(tmp_path / "good.npz")


def corrupt(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        # flip bytes inside the stored model weights (not the zip directory)
        i = data.find(b"model/encoder.weight.npy")
        for k in range(i + 200, i + 260):
            data[k] ^= 0xFF
    elif how == "garbage":
        data = bytearray(b"this is not a checkpoint" * 10)
    elif how == "empty":
        data = bytearray()
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error(good_checkpoint, how):
    corrupt(good_checkpoint, how)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(good_checkpoint)
    assert "good.npz" in str(e.value)
    assert any(w in str(e.value) for w in ("corrupt", "not a", "truncated"))


def test_wrong_kind_of_npz_and_missing_file(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="no 'meta'"):
        load_checkpoint(tmp_path / "plain.npz")
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "something"})))
    with pytest.raises(CheckpointError, match="not a fastrnn checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.npz")


def test_tampered_entry_and_missing_entry(good_checkpoint, tmp_path):
    with np.load(good_checkpoint, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["model/decoder.bias"] = arrays["model/decoder.bias"] + 1        # valid zip, wrong data
    np.savez(tmp_path / "t.npz", **arrays)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "t.npz")
    del arrays["model/decoder.bias"]
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "m.npz")
    assert zipfile.is_zipfile(good_checkpoint)


def test_metadata_edited_by_hand_is_a_checkpoint_error(good_checkpoint, tmp_path):
    """meta has no digest: a vocabulary shorter than the model's (decoding raised
    IndexError) or a setting of the wrong type (TypeError on resume) are named instead
    (session 35, a user trial)."""
    with np.load(good_checkpoint, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for edit, match in [(lambda m: m["tokenizer"].update(tokens=m["tokenizer"]["tokens"][:-2]),
                         r"the vocabulary has \d+ tokens but the model's config says"),
                        (lambda m: m["config"].update(batch_size="x"),
                         "bad training config")]:
        meta = json.loads(str(arrays["meta"]))
        edit(meta)
        path = tmp_path / "edited.npz"
        np.savez(path, **dict(arrays, meta=np.array(json.dumps(meta))))
        with pytest.raises(CheckpointError, match=match):
            ckpt = load_checkpoint(path)
            ckpt.build_tokenizer()
            Trainer.resume(path, TEXT, max_steps=2)


def test_clip_value_clamps_every_gradient_value_before_the_step(monkeypatch):
    """TrainConfig.clip_value (fastrnn train --clip-value) clamps each gradient value to
    [-v, v] before the norm clip and the optimiser step; 0 leaves them alone."""
    seen = []
    for v in (0.0, 1e-3):
        tr = Trainer(small_cfg(max_steps=1, clip=0.0, clip_value=v), TEXT)
        monkeypatch.setattr(tr.optimizer, "step",
                            lambda tr=tr: seen.append(max(float(np.abs(p.grad).max())
                                                          for p in tr.optimizer.params)))
        tr.run(progress=False)
    assert seen[0] > 1e-3 and seen[1] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="clip_value"):
        small_cfg(clip_value=-1.0).validate()


def test_clip_value_does_not_hide_an_infinite_gradient(monkeypatch):
    """Clipping by value turns an inf gradient finite; the step must still be refused
    (NonFiniteError), as it is without clip_value."""
    from fastrnn.train import NonFiniteError
    for v in (0.0, 1.0):
        tr = Trainer(small_cfg(max_steps=1, clip_value=v), TEXT)
        backward = tr.model.backward

        def overflowing(d, backward=backward, tr=tr):
            out = backward(d)
            tr.optimizer.params[0].grad[0, 0] = np.inf
            return out

        monkeypatch.setattr(tr.model, "backward", overflowing)
        before = tr.optimizer.params[0].data.copy()
        with pytest.raises(NonFiniteError):
            tr.run(progress=False)
        np.testing.assert_array_equal(tr.optimizer.params[0].data, before)
