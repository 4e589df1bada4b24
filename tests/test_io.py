"""fastrnn.save / fastrnn.load round trips, corrupted and foreign files, torch conversion."""

import json
import os
import zipfile

import numpy as np
import pytest

import fastrnn
from fastrnn.io import HEADER_KEY

MODULES = {
    "rnn": lambda: fastrnn.RNN(3, 5, 2, nonlinearity="relu", bidirectional=True, seed=1),
    "lstm": lambda: fastrnn.LSTM(3, 5, 2, batch_first=True, proj_size=2, dtype=np.float64,
                                 seed=1),
    "gru_sum": lambda: fastrnn.GRU(3, 5, 2, bias=False, bidirectional=True, merge_mode="sum",
                                   dropout=0.25, seed=1),
    "rnncell": lambda: fastrnn.RNNCell(3, 5, nonlinearity="identity", seed=1),
    "lstmcell": lambda: fastrnn.LSTMCell(3, 5, dtype=np.float64, seed=1),
    "grucell": lambda: fastrnn.GRUCell(3, 5, bias=False, seed=1),
}


def run(m, x):
    out = m(x)
    return out if isinstance(out, tuple) else (out,)


def flat(outs):
    for o in outs:
        if isinstance(o, tuple):
            yield from flat(o)
        else:
            yield o


@pytest.mark.parametrize("name", MODULES)
def test_round_trip(tmp_path, name):
    m = MODULES[name]().eval()
    path = tmp_path / "model.npz"
    fastrnn.save(path, m)
    m2 = fastrnn.load(path).eval()
    assert type(m2) is type(m)
    assert m2.config() == m.config()
    for (n, p), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n == n2 and p2.dtype == p.dtype
        np.testing.assert_array_equal(p.data, p2.data)
    is_cell = name.endswith("cell")
    shape = (4, 3) if is_cell else (2, 4, 3)
    x = np.random.default_rng(0).standard_normal(shape).astype(m.dtype)
    for a, b in zip(flat(run(m, x)), flat(run(m2, x))):
        np.testing.assert_array_equal(a, b)


def test_file_layout_is_documented_npz(tmp_path):
    """Plain npz: a JSON header string array plus one array per parameter."""
    m = fastrnn.LSTM(3, 4, seed=0)
    path = tmp_path / "m.npz"
    fastrnn.save(str(path), m)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]   # no temporary file left
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {HEADER_KEY, *m.state_dict()}
        header = json.loads(str(z[HEADER_KEY][0]))
    assert header == {"format": "fastrnn", "version": 1, "class": "LSTM",
                      "config": m.config(), "training": True}


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_load_keeps_the_mode_it_was_saved_in(tmp_path, ext):
    """A model saved in eval mode with dropout came back in training mode and
    computed something else (session 25's interop audit)."""
    pytest.importorskip("safetensors") if ext == "safetensors" else None
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    m = fastrnn.LSTM(3, 4, num_layers=2, dropout=0.5, seed=0).eval()
    path = str(tmp_path / f"m.{ext}")
    fastrnn.save(path, m)
    back = fastrnn.load(path)
    assert not back.training
    np.testing.assert_array_equal(back(x)[0], m(x)[0])
    fastrnn.save(path, m.train())
    assert fastrnn.load(path).training
    old = {k: v for k, v in np.load(str(tmp_path / "m.npz"), allow_pickle=False).items()} \
        if ext == "npz" else None
    if old is not None:   # a file from before: no 'training' key, a new module's mode
        header = json.loads(str(old[HEADER_KEY][0]))
        del header["training"]
        old[HEADER_KEY] = np.array([json.dumps(header)])
        write_npz(tmp_path / "old.npz", **old)
        assert fastrnn.load(str(tmp_path / "old.npz")).training


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def good_arrays():
    m = fastrnn.GRU(2, 3, seed=0)
    header = dict(format="fastrnn", version=1, config=m.config(), **{"class": "GRU"})
    return header, m.state_dict()


def _append_member(path, name, array):
    """Add a second member `name`.npy to the archive (zipfile warns of the duplicate)."""
    import io
    import warnings
    buf = io.BytesIO()
    np.save(buf, array)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as zf:
        warnings.simplefilter("ignore")
        zf.writestr(name + ".npy", buf.getvalue())


def header_array(header):
    return np.array([json.dumps(header)])


def corrupt_cases(tmp_path):
    """(description, path, expected message fragment) for many kinds of bad file."""
    header, params = good_arrays()
    cases = []

    def add(desc, match, write):
        p = tmp_path / (desc.replace(" ", "_") + ".npz")
        write(p)
        cases.append((desc, p, match))

    add("text file", "not a NumPy .npz archive", lambda p: p.write_text("hello, world\n"))
    add("empty file", "not a NumPy .npz archive", lambda p: p.write_bytes(b""))
    add("random bytes", "not a NumPy .npz archive",
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(300)))
    add("pickle file", "not a NumPy .npz archive",
        lambda p: p.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."))
    add("single npy", "single .npy array", lambda p: np.save(open(p, "wb"), np.zeros(3)))
    add("no header", "no '__fastrnn__' header", lambda p: write_npz(p, **params))
    add("header not string", "header must be one unicode string",
        lambda p: write_npz(p, **{HEADER_KEY: np.zeros(2)}, **params))
    add("bad json", "not valid JSON",
        lambda p: write_npz(p, **{HEADER_KEY: np.array(["{not json"])}, **params))
    add("foreign format", "not a fastrnn header",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(dict(header, format="x"))}))
    add("future version", "unsupported format version",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(dict(header, version=99))}))
    add("unknown class", "unknown class 'os.system'",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(dict(header, **{"class": "os.system"}))},
                            **params))
    add("bad config key", "invalid GRU config",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(
            dict(header, config=dict(header["config"], evil=1)))}, **params))
    add("bad config value", "invalid GRU config",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(
            dict(header, config=dict(header["config"], merge_mode="max")))}, **params))
    add("huge size", "inconsistent with the",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(
            dict(header, config=dict(header["config"], hidden_size=10**9)))}, **params))
    add("missing param", "missing keys: bias_hh_l0",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(header)},
                            **{k: v for k, v in params.items() if k != "bias_hh_l0"}))
    add("unexpected param", "unexpected keys: extra",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(header)}, **params,
                            extra=np.zeros(1)))
    add("misshaped param", r"weight_hh_l0: expected shape \(9, 3\), got \(3, 9\)",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(header)},
                            **dict(params, weight_hh_l0=params["weight_hh_l0"].T.copy())))
    add("wrong dtype", "wrong dtypes: weight_ih_l0: expected float32, got float64",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(header)},
                            **dict(params, weight_ih_l0=params["weight_ih_l0"].astype(np.float64))))
    add("string bool", "batch_first must be true or false, got 'false'",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(
            dict(header, config=dict(header["config"], batch_first="false")))}, **params))
    add("float size", "hidden_size: expected an integer >= 1, got 3.0",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(
            dict(header, config=dict(header["config"], hidden_size=3.0)))}, **params))
    add("sizes that multiply", "declares more parameter values than the",
        lambda p: write_npz(p, **{HEADER_KEY: header_array(
            dict(header, config=dict(header["config"], input_size=60, hidden_size=60,
                                     num_layers=60, bidirectional=True)))}, **params))
    add("raw member", "member 'notes.txt' is not a .npy array",
        lambda p: (write_npz(p, **{HEADER_KEY: header_array(header)}, **params),
                   zipfile.ZipFile(p, "a").writestr("notes.txt", b"hello")))
    add("duplicate member", "member 'weight_ih_l0.npy' appears more than once",
        lambda p: (write_npz(p, **{HEADER_KEY: header_array(header)}, **params),
                   _append_member(p, "weight_ih_l0", params["weight_ih_l0"] + 7)))
    add("deep json", "header is not valid JSON",
        lambda p: write_npz(p, **{HEADER_KEY: np.array(["[" * 100000 + "]" * 100000])},
                            **params))
    add("object array", "corrupted archive",
        lambda p: np.savez(open(p, "wb"), **{HEADER_KEY: np.array([{"a": 1}], dtype=object)}))
    return cases


def test_corrupted_and_foreign_files_raise_value_error(tmp_path):
    for desc, path, match in corrupt_cases(tmp_path):
        with pytest.raises(ValueError, match=match):
            fastrnn.load(path)


def test_truncated_archive(tmp_path):
    path = tmp_path / "m.npz"
    fastrnn.save(path, fastrnn.LSTM(3, 4))
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 30):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            fastrnn.load(path)


def test_flipped_weight_byte_fails_crc(tmp_path):
    """Silent corruption of a weight (no structural damage) is caught by the CRC check."""
    m = fastrnn.GRU(2, 3, seed=0)
    path = tmp_path / "m.npz"
    fastrnn.save(path, m)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(m.weight_hh_l0.data.tobytes()) + 5
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="'weight_hh_l0.npy' fails its CRC-32 check"):
        fastrnn.load(path)


def test_flipped_bytes_never_crash(tmp_path):
    """Single corrupted bytes give ValueError (or, if harmless, a valid module)."""
    path = tmp_path / "m.npz"
    fastrnn.save(path, fastrnn.GRU(2, 3, seed=0))
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(data), 60, replace=False):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        path.write_bytes(bytes(bad))
        try:
            m = fastrnn.load(path)
        except ValueError:
            continue
        assert isinstance(m, fastrnn.GRU)


def test_missing_file_and_unsaveable_module(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastrnn.load(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="not a saveable class"):
        fastrnn.save(tmp_path / "x.npz", fastrnn.Module())
    assert not (tmp_path / "x.npz").exists()
    target = tmp_path / "no-such-dir" / "x.npz"     # the message names the user's path
    with pytest.raises(FileNotFoundError, match=r"writing .*no-such-dir/x\.npz: cannot create "
                                                r"a file in .*no-such-dir\)") as e:
        fastrnn.save(target, fastrnn.LSTM(3, 4))
    assert e.value.filename == str(target) and "fastrnn-tmp" not in str(e.value)


# -- torch conversion ----------------------------------------------------------
TORCH_CASES = ["rnn", "lstm", "gru", "rnncell", "lstmcell", "grucell"]


def torch_module(torch, name):
    nn = torch.nn
    return {"rnn": lambda: nn.RNN(3, 5, 2, nonlinearity="relu", bidirectional=True),
            "lstm": lambda: nn.LSTM(3, 5, 2, batch_first=True, proj_size=2, dtype=torch.float64),
            "gru": lambda: nn.GRU(3, 5, 3, bias=False, dropout=0.5),
            "rnncell": lambda: nn.RNNCell(3, 5, nonlinearity="relu"),
            "lstmcell": lambda: nn.LSTMCell(3, 5, dtype=torch.float64),
            "grucell": lambda: nn.GRUCell(3, 5, bias=False)}[name]()


@pytest.mark.parametrize("name", TORCH_CASES)
def test_from_torch_and_back(name):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = torch_module(torch, name).eval()
    ours = fastrnn.from_torch(theirs)
    assert not ours.training
    dtype = np.float64 if name.startswith("lstm") else np.float32
    assert ours.dtype == dtype
    x = np.random.default_rng(0).standard_normal((4, 3) if name.endswith("cell")
                                                 else (2, 4, 3)).astype(dtype)
    with torch.no_grad():
        t_out = theirs(torch.from_numpy(x))
    for a, b in zip(flat(run(ours, x)), flat(t_out if isinstance(t_out, tuple) else (t_out,))):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)
    back = fastrnn.to_torch(ours)
    assert type(back) is type(theirs) and not back.training
    for (n, p), (n2, p2) in zip(theirs.named_parameters(), back.named_parameters()):
        assert n == n2 and p.dtype == p2.dtype
        assert torch.equal(p, p2)
    for attr in ("batch_first", "bidirectional", "dropout", "num_layers", "proj_size", "bias"):
        assert getattr(back, attr, None) == getattr(theirs, attr, None)


def test_to_torch_rejects_what_torch_lacks():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="merge_mode"):
        fastrnn.to_torch(fastrnn.GRU(2, 3, bidirectional=True, merge_mode="sum"))
    with pytest.raises(ValueError, match="identity"):
        fastrnn.to_torch(fastrnn.RNN(2, 3, nonlinearity="identity"))
    with pytest.raises(TypeError, match="expected a torch.nn"):
        fastrnn.from_torch(object())


def test_torch_missing_gives_clear_import_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="need PyTorch"):
        fastrnn.to_torch(fastrnn.GRU(2, 3))
    with pytest.raises(ImportError, match="need PyTorch"):
        fastrnn.from_torch(None)


def test_composites_save_and_load(tmp_path):
    """fastrnn.save refused a Sequential or a language model, which is what
    fastrnn.onnx.load and from_keras return beyond one stack (interop audit)."""
    from fastrnn.wrappers import Recurrent
    seq = fastrnn.nn.Sequential(fastrnn.nn.Embedding(20, 6, rng=0),
                                Recurrent(fastrnn.LSTM(6, 8, seed=1), return_sequences=False),
                                fastrnn.nn.Dropout(0.3), fastrnn.nn.Linear(8, 5, rng=2)).eval()
    path = str(tmp_path / "seq.npz")
    fastrnn.save(path, seq)
    back = fastrnn.load(path)
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    assert type(back) is fastrnn.nn.Sequential and not back.training
    assert back[1].return_sequences is False
    np.testing.assert_array_equal(back(ids), seq(ids))
    lm = fastrnn.RNNLanguageModel(30, 8, 12, num_layers=2, cell="gru", seed=0)   # training
    fastrnn.save(str(tmp_path / "lm.npz"), lm)
    lm2 = fastrnn.load(str(tmp_path / "lm.npz"))
    assert type(lm2) is fastrnn.RNNLanguageModel and lm2.training
    x = np.array([[1, 2, 3]]).T
    np.testing.assert_array_equal(lm2.eval()(x)[0], lm.eval()(x)[0])


def test_load_state_dict_names_what_is_not_a_state_dict():
    m = fastrnn.GRU(3, 4, seed=0)
    for bad in (None, [("weight_ih_l0", np.zeros((12, 3)))]):
        with pytest.raises(TypeError, match="state_dict: expected a mapping"):
            m.load_state_dict(bad)
    sd = m.state_dict()
    sd["bias_hh_l0"] = [[1.0, 2.0], [3.0]]                      # ragged
    with pytest.raises(ValueError, match=r"state_dict\['bias_hh_l0'\]: not an array"):
        m.load_state_dict(sd)


def test_a_loaded_module_skips_the_random_init_and_keeps_no_zeros(tmp_path, monkeypatch):
    """Loaders build fastrnn's layers inside weights_to_be_loaded (no random draws, which
    the strict load overwrites): loading draws nothing, and every loaded weight is the
    saved one. Outside the block a layer draws its init; inside, an explicit
    reset_parameters() still does."""
    import fastrnn
    from fastrnn.modules import module as module_mod
    from fastrnn.modules.module import weights_to_be_loaded
    m = fastrnn.LSTM(7, 9, num_layers=2, seed=4)
    cell = fastrnn.GRUCell(5, 6, seed=2)
    fastrnn.save(tmp_path / "m.npz", m)
    fastrnn.save(tmp_path / "c.npz", cell)
    draws = []
    real = module_mod.fill_uniform
    monkeypatch.setattr(module_mod, "fill_uniform", lambda *a: (draws.append(1), real(*a)))
    got, got_cell = fastrnn.load(tmp_path / "m.npz"), fastrnn.load(tmp_path / "c.npz")
    assert draws == []
    for (name, a), (_, b) in zip(m.named_parameters(), got.named_parameters()):
        assert np.array_equal(a.data, b.data), name
    for (name, a), (_, b) in zip(cell.named_parameters(), got_cell.named_parameters()):
        assert np.array_equal(a.data, b.data), name
    fastrnn.LSTM(7, 9, seed=4)
    assert draws                                     # a plain construction draws
    with weights_to_be_loaded():
        blank = fastrnn.LSTM(7, 9, seed=4)
        assert not any(p.data.any() for p in blank.parameters())
        blank.reset_parameters(np.random.default_rng(0))
        assert all(p.data.any() for p in blank.parameters())
