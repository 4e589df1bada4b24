"""safetensors: fastrnn.save/load round trip, torch's files, corrupt and foreign files."""

import json

import numpy as np
import pytest

import fastrnn
from fastrnn.safetensors_io import DIGEST_KEY, read, write


def test_round_trip_and_metadata(tmp_path):
    m = fastrnn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                    dtype=np.float64, seed=0)
    p = tmp_path / "g.safetensors"
    fastrnn.save(p, m)
    back = fastrnn.load(p)
    assert type(back) is fastrnn.GRU and back.config() == m.config()
    for k, v in m.state_dict().items():
        assert np.array_equal(back.state_dict()[k], v) and back.state_dict()[k].dtype == v.dtype
    n = int.from_bytes(p.read_bytes()[:8], "little")
    meta = json.loads(p.read_bytes()[8:8 + n])["__metadata__"]
    assert meta["class"] == "GRU" and json.loads(meta["config"])["num_layers"] == 2


def test_safetensors_package_reads_ours_and_we_read_torchs(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    m = fastrnn.LSTM(3, 5, seed=1)
    fastrnn.save(tmp_path / "l.safetensors", m)
    theirs = st.load_file(str(tmp_path / "l.safetensors"))
    assert all(np.array_equal(theirs[k], v) for k, v in m.state_dict().items())
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    t = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    save_file(t.state_dict(), str(tmp_path / "t.safetensors"))
    ours = fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True)
    ours.load_state_dict(fastrnn.load_weights(tmp_path / "t.safetensors"))
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    with torch.no_grad():
        want = t(torch.from_numpy(x))[0].numpy()
    assert np.abs(ours.eval()(x)[0] - want).max() < 1e-5
    save_file({k: v.to(torch.bfloat16) for k, v in t.state_dict().items()},
              str(tmp_path / "b.safetensors"))
    w = fastrnn.load_weights(tmp_path / "b.safetensors")["weight_ih_l0"]
    assert w.dtype == np.float32
    assert np.array_equal(w, t.weight_ih_l0.detach().to(torch.bfloat16).float().numpy())
    with pytest.raises(ValueError, match="without fastrnn metadata.*load_weights"):
        fastrnn.load(tmp_path / "t.safetensors")


def _corrupt(tmp_path, fn):
    p = tmp_path / "m.safetensors"
    fastrnn.save(p, fastrnn.RNN(2, 3, seed=0))
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(fn(data)))
    return p


def _edit_header(data, edit):
    n = int.from_bytes(data[:8], "little")
    h = json.loads(data[8:8 + n])
    edit(h)
    text = json.dumps(h).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


@pytest.mark.parametrize("fn,msg", [
    (lambda d: d[:5], "shorter than"),
    (lambda d: d[:-4], "past the end|after the last"),
    (lambda d: (10**12).to_bytes(8, "little") + d[8:], "header length"),
    (lambda d: d[:8] + b"{" * (int.from_bytes(d[:8], "little")) + d[8 + int.from_bytes(
        d[:8], "little"):], "not valid JSON"),
    (lambda d: _edit_header(d, lambda h: h["weight_ih_l0"].update(dtype="X9")), "dtype"),
    (lambda d: _edit_header(d, lambda h: h["weight_ih_l0"].update(shape=[9, 9])), "needs"),
    (lambda d: _edit_header(d, lambda h: h["weight_ih_l0"].update(dtype=["F32"])), "dtype"),
    (lambda d: _edit_header(d, lambda h: h["weight_ih_l0"].update(shape=[10**30])), "bad shape"),
    (lambda d: _edit_header(d, lambda h: h["weight_ih_l0"].update(shape=[0, 2**62])), "bad shape"),
    (lambda d: _edit_header(d, lambda h: h["weight_ih_l0"].update(shape=[True])), "bad shape"),
    (lambda d: _edit_header(d, lambda h: h["weight_ih_l0"].update(
        data_offsets=[False, h["weight_ih_l0"]["data_offsets"][1]])), "bad data_offsets"),
    (lambda d: d[:8] + b"[" * 2000 + d[8 + 2000:], "not valid JSON"),
    # hand-edited metadata without fastrnn's checksum reaches the checks of its values
    (lambda d: _edit_header(d, lambda h: h["__metadata__"].update(config="{")
                            or h["__metadata__"].pop(DIGEST_KEY)), "config"),
    (lambda d: _edit_header(d, lambda h: h["__metadata__"].update(**{"class": "Evil"})
                            or h["__metadata__"].pop(DIGEST_KEY)), "unknown class"),
    (lambda d: _edit_header(d, lambda h: h["__metadata__"].update(config=h["__metadata__"][
        "config"].replace('"dropout": 0.0', '"dropout": 1.0'))), "checksum mismatch"),
    (lambda d: _edit_header(d, lambda h: h.pop("bias_hh_l0")), "data starts|after the last"),
])
def test_corrupt_files_rejected(tmp_path, fn, msg):
    with pytest.raises(ValueError, match=msg):
        fastrnn.load(_corrupt(tmp_path, fn))


def test_a_flipped_byte_never_loads_another_model(tmp_path):
    """safetensors has no checksum; fastrnn.save's files carry one (DIGEST_KEY), so a
    changed byte anywhere, header or weights, either fails to load or (a byte of the
    checksum key's own name: no checksum then) loads the same model, never other
    weights or another config."""
    m = fastrnn.GRU(2, 3, seed=0)
    p = tmp_path / "m.safetensors"
    fastrnn.save(p, m)
    good = p.read_bytes()
    loaded = 0
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x10
        p.write_bytes(bytes(bad))
        try:
            back = fastrnn.load(p)
        except ValueError:
            continue
        loaded += 1
        assert back.config() == m.config(), i
        assert all(np.array_equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    assert loaded <= len(DIGEST_KEY)


def _raw_metadata(path):
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])["__metadata__"]


def test_files_without_the_checksum_still_load(tmp_path):
    m = fastrnn.LSTM(2, 3, seed=0)
    p = tmp_path / "m.safetensors"
    fastrnn.save(p, m)
    assert DIGEST_KEY in _raw_metadata(p)
    arrays, meta = read(p)
    assert DIGEST_KEY not in meta                 # checked by read, not handed on
    write(p, arrays, meta)                        # another writer: no checksum
    assert DIGEST_KEY not in _raw_metadata(p)
    back = fastrnn.load(p)
    assert all(np.array_equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    write(p, arrays, dict(meta, **{DIGEST_KEY: "stale"}), checksum=True)   # replaced
    fastrnn.load(p)


def test_checksum_survives_another_writer_with_the_same_contents(tmp_path):
    """The checksum covers names, dtypes, shapes, bytes and metadata, not the header's
    order or offsets: the reference writer saving the same tensors and metadata (in
    its own order) gives a file that still loads; other weights do not."""
    st = pytest.importorskip("safetensors.numpy")
    p, q = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    m = fastrnn.GRU(2, 3, seed=0)
    fastrnn.save(p, m)
    meta = _raw_metadata(p)
    st.save_file(st.load_file(str(p)), str(q), metadata=meta)
    back = fastrnn.load(q)
    assert all(np.array_equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    other = {k: v + 1 for k, v in st.load_file(str(p)).items()}
    st.save_file(other, str(q), metadata=meta)
    with pytest.raises(ValueError, match="checksum mismatch"):
        fastrnn.load(q)


def test_npz_still_works_and_load_weights_reads_it(tmp_path):
    m = fastrnn.LSTM(2, 3, seed=0)
    fastrnn.save(tmp_path / "m.npz", m)
    assert set(fastrnn.load_weights(tmp_path / "m.npz")) == set(m.state_dict())
    assert type(fastrnn.load(tmp_path / "m.npz")) is fastrnn.LSTM
