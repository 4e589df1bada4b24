"""float32 matmul precision "medium": the driver's GEMMs on bf16 operands.

The kernels (src/bf16_gemm.h) against the NumPy twin (fastrnn.reference with
bf16=True: operands rounded to bf16, exact products, float64 sums), for every
cell, odd shapes, batch 1, T=1, lengths and reverse, under every ISA the machine
has (vdpbf16ps at avx512 on a CPU with AVX512-BF16, widening kernels elsewhere).
The twin differs from the float32 reference by bf16's rounding (~1e-3 relative);
the kernels differ from the twin by float32 sums and by the rare operand that
rounds the other way after such a sum, so the kernel tolerance is 20 times
tighter than the bf16 effect the twin must show. At T=1 (the GEMMs alone) the
kernels equal the twin to float32 sums (measured below 5e-7 on the Zen 4, 4.6e-5
where backward's gate gradient, computed from such a sum, rounds the other way); over
several steps a sum that rounds an operand the other way spreads (up to 3.2e-3,
and at most 0.25 of the float32 kernels' distance to the twin).
"""

import os
import types
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrnn
from fastrnn import _precision
from fastrnn import functional as F
from fastrnn import reference as R
from test_isa import isa  # noqa: F401  (the fixture: every ISA this CPU has)
from test_kernels import (CELLS, SHAPES, assert_same_bits_for_thread_counts, live_case,
                          make_case, rel_err, run)

ONE_STEP_TOL = 2e-4    # T=1: the GEMMs alone, kernels against the twin (float32 sums)
STEPS_TOL = 5e-3       # several steps: a float32 sum can round an operand the other way,
STEPS_SHARE = 0.35     # ... but the kernels stay far closer to the twin than float32 is
BF16_EFFECT = 2e-3     # the twin against float32: at least this far apart somewhere


def bf16_twin():
    """fastrnn.reference with every forward run with bf16=True (backward follows the cache)."""
    twin = types.SimpleNamespace(**{k: getattr(R, k) for k in dir(R) if not k.startswith("_")})
    for name in ("rnn_forward", "lstm_forward", "gru_forward"):
        fn = getattr(R, name)
        setattr(twin, name, lambda *a, _fn=fn, **kw: _fn(*a, bf16=True, **kw))
    return twin


@pytest.fixture
def medium():
    """Kernels in "medium" precision, on the bf16 path whatever the CPU."""
    before = fastrnn.get_float32_matmul_precision()
    fastrnn.set_float32_matmul_precision("medium")
    _precision._force_bf16 = True
    yield
    _precision._force_bf16 = False
    fastrnn.set_float32_matmul_precision(before)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("shape", SHAPES + [(9, 37, 40, 70), (1, 5, 30, 40), (2, 5, 600, 300),
                                   (40, 30, 8, 12)])   # plain: 1,200 rows, two K blocks of the sums
@pytest.mark.parametrize("variant", ["plain", "lengths_reverse"])
def test_bf16_kernels_match_the_bf16_twin(medium, isa, cell, shape, variant):
    seed = zlib.crc32(repr((cell, shape, variant)).encode())
    reverse = variant.endswith("reverse")
    case, seed = live_case(cell, np.float32, shape, True, variant.startswith("lengths"), True,
                           seed)
    outs, grads = run(F, cell, case, reverse, seed + 1)
    twin = run(bf16_twin(), cell, case, reverse, seed + 1)
    twin = twin[0] + twin[1]
    fastrnn.set_float32_matmul_precision("highest")
    f32 = run(F, cell, case, reverse, seed + 1)
    f32_distance = max(rel_err(a, b) for a, b in zip(f32[0] + f32[1], twin))
    errs = [rel_err(got, want) for got, want in zip(outs + grads, twin)]
    assert all(got.dtype == np.float32 for got in outs + grads)
    if shape[0] == 1 or f32_distance == 0:
        assert max(errs) <= ONE_STEP_TOL, f"{isa}: {errs}"
    else:
        assert max(errs) <= STEPS_TOL, f"{isa}: {errs}"
        assert max(errs) <= STEPS_SHARE * f32_distance, f"{isa}: {errs} vs {f32_distance}"


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_the_twin_rounds_to_bf16(cell):
    """The twin is not float32 in disguise: bf16 moves its results measurably, and
    no further than bf16's precision allows."""
    case = make_case(cell, np.float32, (6, 5, 24, 33), True, False, True, 2)
    outs, grads = run(R, cell, case, False, 3)
    twin_outs, twin_grads = run(bf16_twin(), cell, case, False, 3)
    errs = [rel_err(a, b) for a, b in zip(twin_outs + twin_grads, outs + grads)]
    assert max(errs) >= BF16_EFFECT
    assert max(errs) <= 0.05


def test_reference_bf16_rounds_operands_exactly():
    """_mm with bf16 equals the product of the operands rounded by hand."""
    a = np.float32([[1 + 2 ** -8, 3.0]])             # 1 + 2^-8 is a tie: rounds to even (1.0)
    b = np.float32([[1.0], [1 + 3 * 2 ** -9]])      # rounds up to 1 + 2^-7
    assert R._mm(a, b, True)[0, 0] == np.float32(1.0 + 3.0 * (1 + 2 ** -7))
    assert R._mm(a, b, False)[0, 0] == np.float32(a[0, 0] + 3.0 * b[1, 0])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("split", ["rows", "units"])
def test_bf16_one_and_two_threads_bitwise_identical(medium, cell, split, monkeypatch):
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_MAX_BATCH", 10**6 if split == "units" else 0)
    monkeypatch.setattr(F, "ROWS_MIN_PER_THREAD", 10**6)    # units even where rows would win
    monkeypatch.setattr(F, "UNITS_MIN_STEPS", 0)
    monkeypatch.setattr(F, "BACKWARD_UNITS_MAX_BATCH", 10**6 if split == "units" else 0)
    monkeypatch.setattr(F, "BACKWARD_UNITS_L2_MAX_BATCH", 10**6 if split == "units" else 0)
    case = make_case(cell, np.float32, (7, 11, 13, 45), True, True, True, 5)
    assert_same_bits_for_thread_counts(cell, case, False, 6, (1, 2))


def test_precision_setting_is_validated_and_scoped():
    assert fastrnn.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError, match="precision must be one of"):
        fastrnn.set_float32_matmul_precision("low")
    with pytest.raises(ValueError, match="got 3"):
        fastrnn.set_float32_matmul_precision(3)
    before = fastrnn.get_float32_matmul_precision()
    try:
        fastrnn.set_float32_matmul_precision("medium")
        assert not _precision.bf16_products(np.float64), "float64 never rounds to bf16"
        fastrnn.set_float32_matmul_precision("high")
        assert not _precision.bf16_products(np.float32)
    finally:
        fastrnn.set_float32_matmul_precision(before)


def test_backward_uses_the_precision_forward_ran_with(medium):
    """Switching the setting between forward and backward changes nothing: the
    cache remembers how forward ran."""
    case = make_case("lstm", np.float32, (5, 4, 6, 9), True, False, True, 8)
    c = case
    y, h, cn, cache = F.lstm_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"], c["b_ih"],
                                     c["b_hh"])
    y2, h2, cn2, cache2 = F.lstm_forward(c["x"], c["h0"], c["c0"], c["w_ih"], c["w_hh"],
                                         c["b_ih"], c["b_hh"])
    dy = np.ones_like(y)
    g1 = F.lstm_backward(dy, None, None, cache)
    fastrnn.set_float32_matmul_precision("highest")
    g2 = F.lstm_backward(dy, None, None, cache2)
    for a, b in zip(g1, g2):
        assert np.array_equal(a, b)


def test_trainer_runs_at_the_configured_precision_and_restores_it(monkeypatch):
    """TrainConfig.matmul_precision holds for the run (training and validation) alone."""
    from fastrnn.train import TrainConfig, Trainer
    seen = []
    real = _precision.bf16_products
    monkeypatch.setattr(_precision, "bf16_products",
                        lambda dtype: seen.append(_precision._precision) or real(dtype))
    text = "the quick brown fox jumps over the lazy dog\n" * 40
    cfg = TrainConfig(hidden=24, embed=8, batch_size=4, seq_len=12, eval_every=None,
                      max_steps=3, seed=1, matmul_precision="medium")
    res = Trainer(cfg.validate(), text).run(progress=False)
    assert np.isfinite(res["val_loss"])
    assert seen and set(seen) == {"medium"}
    assert fastrnn.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        TrainConfig(matmul_precision="bf16").validate()


def test_cli_takes_the_precision_from_flag_and_config_file(tmp_path):
    from fastrnn.cli import build_parser, config_from_args
    from fastrnn._configfile import apply_config_file
    t = build_parser()._train_parser
    assert config_from_args(t.parse_args([])).matmul_precision == "highest"
    flag = t.parse_args(["--matmul-precision", "medium"])
    assert config_from_args(flag).matmul_precision == "medium"
    with pytest.raises(SystemExit):
        t.parse_args(["--matmul-precision", "low"])
    f = tmp_path / "r.toml"
    f.write_text('[run]\nmatmul-precision = "medium"\n')
    assert config_from_args(apply_config_file(t, str(f), [])).matmul_precision == "medium"
    line = ["--matmul-precision", "high"]               # the command line beats the file
    ns = apply_config_file(build_parser()._train_parser, str(f), line)
    assert config_from_args(ns).matmul_precision == "high"


def test_the_cli_says_when_medium_runs_float32(capsys):
    """config() and `fastrnn train` say what "medium" runs here: float32 below ISA
    avx512 on any CPU, and (at avx512) bf16 exactly where bf16_dot_pays or AMX-BF16
    tiles run the products."""
    from fastrnn import _quantized, _recurrent
    from fastrnn.cli import main
    notice = "so they run in float32"
    run = ["train", "--hidden", "8", "--embed", "4", "--batch-size", "2", "--seq-len", "4",
           "--max-steps", "1", "--val-fraction", "0.01", "--no-progress", "--sample-length", "0",
           "--matmul-precision", "medium"]
    before = fastrnn.config()["isa"]
    for name in fastrnn.config()["isas_available"]:
        fastrnn.set_isa(name)
        try:
            expect_bf16 = name == "avx512" and (_quantized.bf16_dot_pays()
                                                 or _recurrent._amx_bf16())
            assert fastrnn.config()["medium_runs"] == ("bf16" if expect_bf16 else "float32")
            assert main(run) == 0
            out = capsys.readouterr().out
            assert (notice in out) != expect_bf16, (name, out)
            assert main(run[:-2]) == 0          # "highest": nothing to say
            assert notice not in capsys.readouterr().out
        finally:
            fastrnn.set_isa(before)


@pytest.mark.parametrize("module", ["LSTM", "GRU", "RNN"])
def test_eval_layers_run_bf16_under_medium(medium, module):
    """An eval-mode layer call (the fast path otherwise) gives the general path's
    bf16 result under "medium"; cells keep float32."""
    layer = getattr(fastrnn, module)(6, 20, seed=3).eval()
    x = np.random.default_rng(4).standard_normal((5, 3, 6)).astype(np.float32)
    got, _ = layer(x)
    w = [p.data for p in layer.parameters()]
    fn = {"LSTM": F.lstm_forward, "GRU": F.gru_forward, "RNN": F.rnn_forward}[module]
    want = fn(x, None, None, *w, training=False)[0] if module == "LSTM" else \
        fn(x, None, *w, training=False)[0]
    assert np.array_equal(got, want)
    fastrnn.set_float32_matmul_precision("highest")
    full, _ = layer(x)
    assert not np.array_equal(got, full), "medium must round to bf16 here"


@given(cell=st.sampled_from(["lstm", "gru", "rnn_tanh"]), T=st.integers(1, 3),
       B=st.integers(1, 19), I=st.integers(1, 37), H=st.integers(1, 41),
       lengths=st.booleans(), reverse=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_bf16_kernels_match_the_twin_on_any_shape(cell, T, B, I, H, lengths, reverse, seed):
    """Packing edges (odd K, N not a multiple of 16, more than 8 rows) on random shapes;
    short sequences keep rounding flips rare, so the one-step bound applies to y."""
    case = make_case(cell, np.float32, (T, B, I, H), True, lengths, True, seed)
    before = fastrnn.get_float32_matmul_precision()
    fastrnn.set_float32_matmul_precision("medium")
    _precision._force_bf16 = True
    try:
        outs, grads = run(F, cell, case, reverse, seed + 1)
    finally:
        _precision._force_bf16 = False
        fastrnn.set_float32_matmul_precision(before)
    twin_outs, twin_grads = run(bf16_twin(), cell, case, reverse, seed + 1)
    for got, want in zip(outs + grads, twin_outs + twin_grads):
        assert got.shape == want.shape and np.all(np.isfinite(got))
        assert rel_err(got, want) <= (ONE_STEP_TOL if T == 1 else STEPS_TOL)


def _cpu_has_amx():
    return "amx_bf16" in fastrnn.config()["cpu_vector_flags"]


def _os_grants_amx():
    """Does Linux grant this process the AMX tile data (arch_prctl, as amx_bf16.h asks)?"""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0   # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA


def test_amx_tiles_run_the_bf16_gemms_where_the_cpu_has_them():
    """At ISA avx512 on a CPU with AMX-BF16 (Linux grants the tiles), "medium" runs
    bf16 on AMX (src/amx_bf16.h); below avx512, or with FASTRNN_AMX=0, it does not."""
    from fastrnn import _recurrent
    if not _cpu_has_amx() or "avx512" not in fastrnn.config()["isas_available"]:
        pytest.skip("this CPU has no AMX-BF16: the AMX kernel was not run")
    if os.environ.get("FASTRNN_AMX") == "0":
        pytest.skip("FASTRNN_AMX=0: AMX is off in this process")
    if not _os_grants_amx():
        pytest.skip("the kernel refused this process the AMX tiles (Linux < 5.16?)")
    before = fastrnn.config()["isa"]
    try:
        fastrnn.set_isa("avx512")
        assert _recurrent._amx_bf16() and fastrnn.config()["bf16_gemm"] == "amx_bf16"
        assert fastrnn.config()["medium_runs"] == "bf16"
        fastrnn.set_isa("avx2")
        assert not _recurrent._amx_bf16() and fastrnn.config()["bf16_gemm"] == "widened"
    finally:
        fastrnn.set_isa(before)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_bf16_inference_splits_units_up_to_batch_64_on_amx(medium, cell, monkeypatch):
    """At inference with bf16 products on AMX, batches up to BF16_UNITS_MAX_BATCH
    split hidden units (rows elsewhere); either way 1 and 2 threads agree bit for
    bit, and inference equals training's forward."""
    from fastrnn import _recurrent
    from test_driver import SplitSpy, forward_only
    monkeypatch.setattr(F, "SMALL_WORK_FLOP", 0)
    monkeypatch.setattr(F, "UNITS_STEP_MIN_FLOP", 0)
    monkeypatch.setattr(F, "ROWS_MIN_PER_THREAD", 10**6)   # a W_hh too small for rows_upto
    case = make_case(cell, np.float32, (20, 40, 24, 48), True, True, True, 7)
    spy = SplitSpy(F._recurrent)
    monkeypatch.setattr(F, "_recurrent", spy)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        two = forward_only(cell, case)
        units = spy.by_units[-1]
        fastrnn.set_num_threads(1)
        one = forward_only(cell, case)
    finally:
        fastrnn.set_num_threads(before)
    assert units == (_recurrent._amx_bf16() and 40 <= F.BF16_UNITS_MAX_BATCH)
    for a, b in zip(two, one):
        assert np.array_equal(a, b)
    trained = run(F, cell, case, False, 3)[0]
    assert np.array_equal(two[0], trained[0])


def test_without_amx_the_avx512_bf16_kernels_still_match_the_twin():
    """On an AMX machine the tests above run the AMX kernel at avx512; this runs
    them again in a process with FASTRNN_AMX=0, so that the vdpbf16ps kernels
    (what an AVX512-BF16 CPU without AMX runs) are checked here too."""
    import os
    import subprocess
    import sys
    if not _cpu_has_amx():
        pytest.skip("no AMX-BF16 on this CPU: the tests above ran the vdpbf16ps kernels")
    env = dict(os.environ, FASTRNN_AMX="0")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)   # cwd: `import fastrnn` finds the tree under test
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(here, "test_precision.py"), "-k",
         "match_the_bf16_twin and avx512 or one_and_two_threads or any_shape"],
        env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
    check = subprocess.run([sys.executable, "-c", "import fastrnn; print(fastrnn.config()"
                            "['bf16_gemm'])"], env=env, cwd=root, capture_output=True,
                           text=True, timeout=120)
    assert check.stdout.strip() in ("avx512_bf16", "widened"), check.stdout + check.stderr
