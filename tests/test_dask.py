"""fastrnn.dask on a real distributed.LocalCluster (2 worker processes, 1 thread each).

Bitwise: a Dask partition's outputs are exactly the model's outputs computed
in this process on the same partition (same batches: `predict_local`, or for
dense arrays the module called on the block itself).
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastrnn
from fastrnn import _modelfile

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
distributed = pytest.importorskip("distributed")
import fastrnn.dask as fd  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                       dashboard_address=None, silence_logs=40)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _lstm(**kw):
    kw.setdefault("batch_first", True)
    return fastrnn.LSTM(6, 12, num_layers=2, seed=0, **kw).eval()


def _x(n=60, t=9, i=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, t, i)).astype(np.float32)


def _ragged(n=70, i=6, tmax=15, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(t), i)).astype(np.float32)
            for t in rng.integers(1, tmax + 1, n)]


def test_fastrnn_never_imports_dask():
    code = "import sys, fastrnn; sys.exit('dask' in sys.modules or 'distributed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- serialisation -------------------------------------------------------------
def test_model_bytes_are_fastrnn_save_bytes(tmp_path):
    m = _lstm()
    fastrnn.save(tmp_path / "m.npz", m)
    data = _modelfile.to_bytes(m)
    assert data == (tmp_path / "m.npz").read_bytes()
    back = _modelfile.from_bytes(data)
    assert type(back) is fastrnn.LSTM and not back.training
    x = _x(8)
    assert np.array_equal(back(x)[0], m(x)[0])


@pytest.mark.parametrize("make", [
    lambda: fastrnn.nn.Sequential(fastrnn.GRU(6, 10, batch_first=True, seed=2),
                                  fastrnn.nn.Dropout(0.3), fastrnn.nn.Linear(10, 3, rng=1)),
    lambda: fastrnn.RNNLanguageModel(17, 8, 12, num_layers=2, cell="gru", seed=3),
])
def test_composite_round_trip(make, tmp_path):
    m = make().eval()
    _modelfile.save_model(tmp_path / "m.npz", m)
    back = _modelfile.load_model(tmp_path / "m.npz")
    assert type(back) is type(m) and not back.training
    for (k, a), (k2, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and np.array_equal(a, b)
    bad = bytearray(_modelfile.to_bytes(m))
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        _modelfile.from_bytes(bytes(bad))


# -- dense arrays -----------------------------------------------------------------
@pytest.mark.parametrize("output", ["sequence", "last", "state"])
def test_array_bitwise_equal_to_local_call(client, output):
    m, x = _lstm(), _x()
    res = fd.predict(m, da.from_array(x, chunks=8), output=output, batch_size=64)
    got = dask.compute(*res) if isinstance(res, tuple) else (res.compute(),)
    outs, hs, cs = [], [], []
    for a in range(0, len(x), 8):                  # the module on each block, here
        out, (h, c) = m(x[a:a + 8])
        outs.append(out)
        hs.append(h.transpose(1, 0, 2))
        cs.append(c.transpose(1, 0, 2))
    if output == "sequence":
        want = (np.concatenate(outs),)
    elif output == "last":
        want = (np.concatenate(outs)[:, -1],)
    else:
        want = (np.concatenate(hs), np.concatenate(cs))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w)


def test_array_time_major_with_lengths(client):
    m = fastrnn.GRU(6, 12, bidirectional=True, seed=4).eval()        # batch_first=False
    x = _x(40).transpose(1, 0, 2).copy()                               # (T, N, I)
    lengths = np.random.default_rng(5).integers(1, 10, 40)
    y = fd.predict(m, da.from_array(x, chunks=(9, 10, 6)), lengths=lengths)
    assert y.shape == (9, 40, 24) and y.chunks[1] == (10,) * 4
    got = y.compute()
    want = np.concatenate([m(x[:, a:a + 10], lengths=lengths[a:a + 10])[0]
                           for a in range(0, 40, 10)], axis=1)
    assert np.array_equal(got, want)
    last = fd.predict(m, da.from_array(x, chunks=(9, 10, 6)), lengths=lengths,
                      output="last").compute()
    assert np.array_equal(last, want[lengths - 1, np.arange(40)])


# -- bags and DataFrame columns ----------------------------------------------------------
def test_bag_bitwise_and_in_order(client):
    m, seqs = _lstm(), _ragged()
    bag = db.from_sequence(seqs, npartitions=5)
    got = fd.predict(m, bag, output="sequence", batch_size=6).compute()
    parts = [p.compute() for p in bag.to_delayed()]
    want = [o for p in parts for o in fd.predict_local(m, p, output="sequence", batch_size=6)]
    assert len(got) == len(seqs)
    for s, g, w in zip(seqs, got, want):
        assert g.shape == (len(s), 12) and np.array_equal(g, w)
    # and each equals the model run on that sequence alone (up to the small-batch kernel)
    for s, g in zip(seqs[:10], got[:10]):
        np.testing.assert_allclose(g, m(s[None])[0][0], rtol=0, atol=1e-6)
    last = fd.predict(m, bag, output="last", batch_size=6).compute()
    assert all(np.array_equal(l, g[-1]) for l, g in zip(last, got))


def test_language_model_bag_and_dataframe(client):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    lm = fastrnn.RNNLanguageModel(23, 8, 16, cell="lstm", seed=1).eval()
    rng = np.random.default_rng(7)
    ids = [rng.integers(0, 23, int(t)).tolist() for t in rng.integers(1, 12, 45)]
    bag = db.from_sequence(ids, npartitions=3)
    got = fd.predict(lm, bag, output="last").compute()
    parts = [p.compute() for p in bag.to_delayed()]
    want = [o for p in parts for o in fd.predict_local(lm, p, output="last")]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    logits, _ = lm(np.array(ids[0])[:, None])                          # (T, 1, V)
    np.testing.assert_allclose(got[0], logits[-1, 0], atol=1e-5)
    with dask.config.set({"dataframe.convert-string": False}):
        df = dd.from_pandas(pd.DataFrame({"ids": ids}, index=np.arange(100, 145)),
                            npartitions=3)
        series = fd.predict(lm, df["ids"], output="last", name="next_token_logits")
        pdf = series.compute()
    assert list(pdf.index) == list(range(100, 145)) and pdf.name == "next_token_logits"
    dparts = [p.compute()["ids"].tolist() for p in df.to_delayed()]
    dwant = [o for p in dparts for o in fd.predict_local(lm, p, output="last")]
    assert all(np.array_equal(g, w) for g, w in zip(pdf.tolist(), dwant))


def test_sequential_state_and_threads_default(client):
    net = fastrnn.nn.Sequential(fastrnn.LSTM(6, 10, batch_first=True, seed=2),
                                fastrnn.nn.Linear(10, 3, rng=1)).eval()
    seqs = _ragged(30)
    h, c = zip(*fd.predict(net, db.from_sequence(seqs, npartitions=2),
                           output="state").compute())
    for s, hh, cc in zip(seqs[:5], h, c):
        _, (h0, c0) = net[0](s[None])
        np.testing.assert_allclose(hh, h0[:, 0], atol=1e-6)
        np.testing.assert_allclose(cc, c0[:, 0], atol=1e-6)
    # a worker with 1 thread running 1 task: 1 kernel thread
    assert client.submit(fd._scoring.default_threads, pure=False).result() == 1


def test_model_reaches_each_worker_once(client):
    client.run(fd.clear_cache)
    m = fastrnn.GRU(6, 20, seed=11, batch_first=True).eval()
    digest = fd.model_blob(m).digest
    key = f"fastrnn-model-{digest[:20]}"

    def transfers(dask_worker, key=key):
        return sum(key in (d.get("keys") or {}) for d in dask_worker.transfer_incoming_log)

    before = client.run(transfers)
    y = fd.predict(m, da.from_array(_x(120), chunks=4))       # 30 tasks
    y.compute()
    info = client.run(fd.cache_info)
    after = client.run(transfers)
    for addr, i in info.items():
        assert i["loads"] <= 1 and digest in i["digests"] or i["loads"] == 0
        assert after[addr] - before[addr] <= 1                 # the bytes came at most once
    assert sum(i["loads"] for i in info.values()) == len(info)  # both ran tasks, loaded once
    assert sum(i["hits"] for i in info.values()) == 30 - len(info)


# -- failures -------------------------------------------------------------------------
def test_bad_partition_names_partition_and_problem(client):
    m, seqs = _lstm(), _ragged(40)
    bad = list(seqs)
    bad[25] = np.zeros((4, 5), np.float32)                       # wrong feature size
    with pytest.raises(ValueError, match=r"partition 2: sequence 5: feature size 5 .* "
                                         r"input size 6"):
        fd.predict(m, db.from_sequence(bad, npartitions=4)).compute()
    bad = list(seqs)
    bad[3] = seqs[3].astype(np.float64)                          # wrong dtype
    with pytest.raises(TypeError, match=r"partition 0: sequence 3: dtype float64 .* float32"):
        fd.predict(m, db.from_sequence(bad, npartitions=4)).compute()
    nan = list(seqs)
    nan[7] = np.full((3, 6), np.nan, np.float32)                 # NaN is data, not an error
    out = fd.predict(m, db.from_sequence(nan, npartitions=4)).compute()
    assert np.isnan(out[7]).all() and np.isfinite(out[8]).all()
    # a dense array whose blocks lie about their dtype (metadata float32, data float64)
    liar = da.from_array(_x(8), chunks=8).map_blocks(lambda b: b.astype(np.float64),
                                                     dtype=np.float32)
    x = da.concatenate([da.from_array(_x(16), chunks=8), liar])
    with pytest.raises(TypeError, match=r"partition 2: dtype float64"):
        fd.predict(m, x).compute()
    with pytest.raises(ValueError, match="feature size 5"):
        fd.predict(m, da.zeros((10, 4, 5), chunks=5, dtype=np.float32))
    with pytest.raises(ValueError, match="training mode"):
        fd.predict(fastrnn.LSTM(6, 4), da.zeros((10, 4, 6), chunks=5, dtype=np.float32))
    # a cell runs one step: refused up front (it passed the plan and failed in a task)
    for cell in (fastrnn.LSTMCell(6, 4).eval(),
                 fastrnn.nn.Sequential(fastrnn.GRUCell(6, 4), fastrnn.nn.Linear(4, 2)).eval(),
                 fastrnn.quantize(fastrnn.LSTMCell(6, 4).eval(), "int8")):
        with pytest.raises(TypeError, match=r"Cell runs a single time step.*use a layer"):
            fd.predict(cell, da.zeros((10, 4, 6), chunks=5, dtype=np.float32))


def test_worker_killed_mid_computation(client):
    m = fastrnn.LSTM(6, 48, num_layers=2, batch_first=True, seed=3).eval()
    x = _x(1600, t=30)
    y = fd.predict(m, da.from_array(x, chunks=20))             # 80 tasks
    futures = client.compute(list(y.to_delayed().ravel()))
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    deadline = time.time() + 60
    while time.time() < deadline:                              # until the victim holds results
        info = client.run(fd.cache_info, workers=[victim])[victim]
        if info["hits"] >= 3:
            break
        time.sleep(0.02)
    done_at_kill = sum(f.done() for f in futures)
    os.kill(pids[victim], signal.SIGKILL)
    got = np.concatenate(client.gather(futures))
    assert done_at_kill < len(futures)
    want = np.concatenate([m(x[a:a + 20])[0] for a in range(0, len(x), 20)])
    assert np.array_equal(got, want)
    client.wait_for_workers(2, timeout=60)


# -- the command line -------------------------------------------------------------------
def test_cli_npy_local_and_on_cluster(client, tmp_path, capsys):
    from fastrnn.cli import main
    m, x = _lstm(), _x(50)
    fastrnn.save(tmp_path / "m.npz", m)
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "y.npy"), "--partition-size", "20", "--no-progress"]) == 0
    want = np.concatenate([m(x[a:a + 20])[0][:, -1] for a in range(0, 50, 20)])
    assert np.array_equal(np.load(tmp_path / "y.npy"), want)
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "s.npz"), "--kind", "state", "--partition-size", "20",
                 "--scheduler", client.scheduler.address]) == 0
    z = np.load(tmp_path / "s.npz")
    assert z["h"].shape == (50, 2, 12) and z["c"].shape == (50, 2, 12)
    assert np.array_equal(z["h"][:, -1], want)
    assert "50 sequences" in capsys.readouterr().out


def test_cli_refuses_an_output_that_would_destroy_data(tmp_path, capsys):
    """--output naming the model, the input, or a directory with other files in it
    is refused before anything is computed or written; each file is left as it was
    (an audit found the first two overwritten and the directory deleted)."""
    from fastrnn.cli import main
    m, x = _lstm(), _x(10)
    model, inp = tmp_path / "m.npz", tmp_path / "x.npy"
    fastrnn.save(model, m)
    np.save(inp, x)
    mine = tmp_path / "mine.parquet"
    mine.mkdir()
    (mine / "README.txt").write_text("the user's")
    (mine / "part.00000.parquet").write_bytes(b"old part")
    (tmp_path / "d.npz").mkdir()
    before = {p: p.read_bytes() for p in (model, inp, mine / "README.txt")}
    for out, says in ((inp, "that is the input"), (model, "that is the model file"),
                      (mine, "files fastrnn predict did not write ('README.txt')"),
                      (tmp_path / "d.npz", "a directory; give a file name"),
                      (tmp_path / "no-dir" / "o.npy", "does not exist")):   # before the job
        capsys.readouterr()
        assert main(["predict", str(model), str(inp), "-o", str(out), "--no-progress"]) == 2
        assert says in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(mine)) == ["README.txt", "part.00000.parquet"]
    fastrnn.load(model)                                  # still a model


def test_cli_ragged_npz_and_parquet(client, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from fastrnn.cli import main
    m, seqs = _lstm(), _ragged(30)
    fastrnn.save(tmp_path / "m.npz", m)
    lengths = np.array([len(s) for s in seqs])
    np.savez(tmp_path / "r.npz", data=np.concatenate(seqs), lengths=lengths)
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "r.npz"), "-o",
                 str(tmp_path / "o.npz"), "--kind", "sequence", "--partition-size", "10",
                 "--no-progress", "--scheduler", client.scheduler.address]) == 0
    z = np.load(tmp_path / "o.npz")
    want = [o for a in range(0, 30, 10)
            for o in fd.predict_local(m, seqs[a:a + 10], output="sequence")]
    assert np.array_equal(z["lengths"], lengths)
    assert np.array_equal(z["output"], np.concatenate(want))

    lm = fastrnn.RNNLanguageModel(15, 8, 10, cell="gru", seed=2).eval()
    fd.save_model(tmp_path / "lm.npz", lm)
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, 15, int(t)).tolist() for t in rng.integers(1, 9, 40)]
    pd.DataFrame({"ids": ids}).to_parquet(tmp_path / "ids.parquet", row_group_size=16)
    assert main(["predict", str(tmp_path / "lm.npz"), str(tmp_path / "ids.parquet"), "-o",
                 str(tmp_path / "out.parquet"), "--no-progress"]) == 0
    out = pd.read_parquet(tmp_path / "out.parquet").sort_index()
    want = [o for a in range(0, 40, 16) for o in fd.predict_local(lm, ids[a:a + 16],
                                                                  output="last")]
    assert list(out.index) == list(range(40))
    assert all(np.array_equal(np.asarray(g, np.float32), w)
               for g, w in zip(out["output"], want))
    # an error is reported, with the partition, and a non-zero exit code
    assert main(["predict", str(tmp_path / "m.npz"), str(tmp_path / "ids.parquet"), "-o",
                 str(tmp_path / "bad.npz"), "--no-progress"]) == 2


def test_example_dask_scoring(client, tmp_path):
    from scripts import load_script
    mod = load_script("examples/dask_scoring.py")
    res = mod.main(n=3000, partition_size=700, steps=150, scheduler=client.scheduler.address,
                   out=str(tmp_path / "scores.npy"), verbose=False)
    scores = np.load(tmp_path / "scores.npy")
    assert scores.shape == (3000,) and ((scores >= 0) & (scores <= 1)).all()
    assert res["accuracy"] > 0.8, res


def test_calls_with_other_settings_on_the_same_data_keep_their_own_results():
    """Task keys carry the call's settings: with the model and the input alone, two
    calls differing in lengths (or output) shared keys and dask returned one's
    results for the other."""
    m = fastrnn.GRU(3, 5, batch_first=True, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((11, 7, 3)).astype(np.float32)
    xd = da.from_array(x, chunks=4)
    a, b = dask.compute(fd.predict(m, xd, "last", lengths=np.full(11, 7)),
                        fd.predict(m, xd, "last", lengths=np.full(11, 3)))
    assert np.array_equal(a, fd.predict_local(m, x, "last", lengths=np.full(11, 7)))
    assert np.array_equal(b, fd.predict_local(m, x, "last", lengths=np.full(11, 3)))
    s, last = dask.compute(fd.predict(m, xd, "sequence"), fd.predict(m, xd, "last"))
    assert s.shape == (11, 7, 5) and last.shape == (11, 5)
    bag = db.from_sequence([x[0], x[1, :4]], npartitions=1)
    s, last = dask.compute(fd.predict(m, bag, "sequence"), fd.predict(m, bag, "last"))
    assert s[1].shape == (4, 5) and last[1].shape == (5,)


def test_token_ids_of_mixed_dtypes_and_the_layout_flag():
    """Ids pad as int64 (300 in a batch led by a uint8 sequence wrapped to 44), and
    token ids are (N, T) whatever batch_first says (the output was transposed)."""
    from fastrnn.nn import Embedding, Sequential
    emb = Sequential(Embedding(400, 4), fastrnn.GRU(4, 5, batch_first=True)).eval()
    mixed = fd.predict_local(emb, [np.array([1, 2, 3], np.uint8), [300, 5]], "last")
    same = fd.predict_local(emb, [np.array([1, 2, 3]), np.array([300, 5])], "last")
    assert all(np.array_equal(p, q) for p, q in zip(mixed, same))
    lm = fastrnn.RNNLanguageModel(50, 4, 6, seed=0).eval()
    ids = np.random.default_rng(1).integers(0, 50, (6, 4))
    want = fd.predict_local(lm, ids, "sequence")
    assert want.shape == (6, 4, 50)
    assert np.array_equal(fd.predict_local(lm, ids, "sequence", batch_first=False), want)
    got = fd.predict(lm, da.from_array(ids, chunks=3), "sequence", batch_first=False)
    assert got.shape == (6, 4, 50) and np.array_equal(got.compute(), want)


def test_cli_parquet_output_replaces_a_directory_whole(tmp_path):
    """A second run into the same .parquet directory leaves only its own parts; a
    failing run leaves the earlier result as it was (it had mixed old and new parts)."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from fastrnn.cli import main
    lm = fastrnn.RNNLanguageModel(15, 8, 10, cell="gru", seed=2).eval()
    fd.save_model(tmp_path / "lm.npz", lm)
    rng = np.random.default_rng(3)
    out = tmp_path / "out.parquet"

    def run(n, rows_per_group, bad=False):
        ids = [rng.integers(0, 15, int(t)).tolist() for t in rng.integers(1, 9, n)]
        if bad:
            ids[-1] = [99]                      # outside the vocabulary: that part fails
        pd.DataFrame({"ids": ids}).to_parquet(tmp_path / "ids.parquet",
                                              row_group_size=rows_per_group)
        return main(["predict", str(tmp_path / "lm.npz"), str(tmp_path / "ids.parquet"),
                     "-o", str(out), "--no-progress"])
    assert run(9, 3) == 0 and len(pd.read_parquet(out)) == 9
    assert run(4, 2) == 0 and len(pd.read_parquet(out)) == 4
    before = sorted(os.listdir(out))
    assert run(9, 3, bad=True) == 2
    assert sorted(os.listdir(out)) == before and len(pd.read_parquet(out)) == 4
    assert sorted(os.listdir(tmp_path)) == ["ids.parquet", "lm.npz", "out.parquet"]


def test_zero_rows_give_empty_outputs():
    """No rows at all: empty outputs of the right shape (NumPy's 'need at least one
    array to concatenate' before)."""
    m = fastrnn.LSTM(3, 5, batch_first=True, seed=0).eval()
    x = np.zeros((0, 4, 3), np.float32)
    assert fd.predict_local(m, x, "sequence").shape == (0, 4, 5)
    assert fd.predict(m, da.from_array(x, chunks=2), "last").compute().shape == (0, 5)
    h, c = fd.predict_local(m, x, "state")
    assert h.shape == c.shape == (0, 1, 5)
    gru = fastrnn.GRU(3, 5, seed=0).eval()                      # time-major
    assert fd.predict_local(gru, np.zeros((4, 0, 3), np.float32), "sequence",
                            batch_first=False).shape == (4, 0, 5)
