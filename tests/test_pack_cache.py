"""Packed weights kept between eval calls (src/pack_cache.h, src/_pack_cache.pxd).

An eval call keeps its packed W_ih / W_hh slices, keyed by a digest of the
weights' bytes, and the next call with the same weights skips the packing. What
must hold: a cached call gives bitwise the result of an uncached one; any change
to the weights (in place, one value, by one ulp) is seen; nothing about the
packing (ISA, threads, precision) is reused where it differs; training calls
keep nothing but a single step's (a cell's steps through a sequence read the same
weights); fastrnn.release_memory() frees what is idle.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastrnn
from fastrnn import _precision, _recurrent
from fastrnn import functional as F

MODULES = {"LSTM": fastrnn.LSTM, "GRU": fastrnn.GRU, "RNN": fastrnn.RNN}
# the reset-before GRU keeps W_ih's packing only (its threads pack their rows of W_hh
# per call): in the tests of eval calls that reuse and re-check a packing
RESET_BEFORE = {"GRU reset_after=False": lambda I, H, **kw: fastrnn.GRU(I, H, reset_after=False,
                                                                          **kw)}


def digest(data, n_threads=1):
    return _recurrent._digest(np.frombuffer(bytes(data), np.uint8), n_threads)


def entries():
    return _recurrent._pack_cache_stats()[0]


@pytest.fixture(autouse=True)
def empty_cache():
    # Eval calls run on the pool's team when its workers are awake, else on one thread
    # (src/team_pool.h), and the two pack differently: with the workers held asleep,
    # every eval call here runs on one thread, so the counts of kept copies are exact.
    # (tests/test_team_pool.py runs both ways.)
    assert _recurrent.pool_hold(True)
    fastrnn.release_memory()
    yield
    fastrnn.release_memory()
    _recurrent.pool_hold(False)


def uncached(fn):
    """fn() with every kept copy dropped first: packed afresh."""
    fastrnn.release_memory()
    assert entries() == 0
    return fn()


# ---- the digest -------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 8, 63, 64, 65, 1000, (1 << 18) - 3, (1 << 18) + 9,
                               3 * (1 << 18) + 100])
def test_digest_sees_every_single_byte_change_and_ignores_threads(n):
    rng = np.random.default_rng(n)
    data = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    base = digest(data)
    assert digest(data, 2) == base == digest(data, 3)
    positions = set(rng.integers(0, max(n, 1), 40).tolist()) | {0, n - 1} if n else set()
    for pos in positions:
        for bit in (0, 7):
            data[pos] ^= 1 << bit
            assert digest(data) != base, (n, pos, bit)
            assert digest(data, 2) == digest(data)
            data[pos] ^= 1 << bit
    assert digest(data) == base


def test_digest_is_the_same_under_every_isa():
    """Three codings (AVX-512, AVX2 intrinsics, scalar) of one digest."""
    rng = np.random.default_rng(9)
    before = fastrnn.config()["isa"]
    try:
        for n in (0, 3, 64, 255, 256, 257, 1000, (1 << 18) + 300, 3 * (1 << 18) + 77):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            values = set()
            for isa in fastrnn.config()["isas_available"]:
                fastrnn.set_isa(isa)
                values |= {digest(data), digest(data, 2)}
            assert len(values) == 1, (n, values)
    finally:
        fastrnn.set_isa(before)


def test_digest_tells_lengths_and_swaps_apart():
    assert digest(b"") != digest(b"\0") != digest(b"\0\0")
    a = np.arange(64, dtype=np.float32)
    b = a.copy()
    b[[3, 40]] = b[[40, 3]]           # the same values, two of them swapped
    assert digest(a.tobytes()) != digest(b.tobytes())


@pytest.mark.parametrize("n", [1024, 4096 + 40, (1 << 18) + 512])
def test_digest_sees_a_top_bit_and_a_later_word_changed_together(n):
    """Bit 63 of a word and any bit of the lane's next word (512 bytes on with 64
    lanes, 256 with the 32 of before, or in the tail): the digest's step once let
    such a pair cancel for any weights (a sign flipped and one bit of the lane's
    next word), so stale packed weights were used."""
    rng = np.random.default_rng(n)
    data = rng.integers(0, 2**63, n // 8, dtype=np.uint64)
    base = digest(data.tobytes())
    for j in (0, 5, 31, n // 8 - 40):
        for later in (j + 32, j + 64):
            if later >= n // 8:
                continue
            for bit in range(64):
                d = data.copy()
                d[j] ^= np.uint64(1 << 63)
                d[later] ^= np.uint64(1 << bit)
                assert digest(d.tobytes()) != base, (n, j, later, bit)


_ONE_DIGEST = ("import numpy as np; from fastrnn import _recurrent; "
               "d = np.arange(4096, dtype=np.uint8).tobytes(); "
               "print(_recurrent._digest(np.frombuffer(d, np.uint8)))")


def test_the_digest_is_keyed_per_process():
    """The lanes start from a key drawn per process: the same bytes digest the same
    within a process (above) and differently in another, so an edit cannot be
    crafted outside to cancel in it (an audit crafted a second model whose weights
    hashed like the first's: its eval call ran with the first one's packing)."""
    seen = {subprocess.run([sys.executable, "-c", _ONE_DIGEST], capture_output=True,
                           text=True, check=True, timeout=60).stdout.strip() for _ in range(3)}
    assert len(seen) == 3
    here = np.arange(4096, dtype=np.uint8)
    assert digest(here.tobytes()) == digest(here.tobytes()) not in seen


def _crafted_to_cancel(data, key):
    """data (uint64 words) with word 0 edited and word 64 (lane 0's next) chosen so
    that the unkeyed step, started from `key`, ends lane 0 where it did."""
    def mix(h, w):
        y = (h ^ w) & (2**64 - 1)
        y ^= y >> 32
        y = (y + (y & 0xFFFFFFFF) * 0xD6E8FEB8) & (2**64 - 1)
        return ((y << 29) | (y >> 35)) & (2**64 - 1)
    lane0 = 0x13198A2E03707344 ^ key
    d = data.copy()
    d[0] ^= np.uint64(1 << 40)
    before, after = mix(lane0, int(data[0])), mix(lane0, int(d[0]))
    d[64] = np.uint64(int(data[64]) ^ before ^ after)
    return d


def test_an_edit_crafted_for_the_unkeyed_digest_is_seen():
    """The cancelling edit the unkeyed digest allowed (h ^ word is all a step reads)
    changes the keyed one: made for key 0, it fails here."""
    data = np.random.default_rng(5).integers(0, 2**63, 1024, dtype=np.uint64)
    crafted = _crafted_to_cancel(data, 0)
    assert not np.array_equal(crafted, data)
    assert digest(crafted.tobytes()) != digest(data.tobytes())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_edit_made_to_cancel_the_old_digest_is_seen(dtype):
    """The audit's edit (one weight's sign, one bit of the word 256 bytes later; and
    512 bytes later, the lane's next word since the digest has 64 lanes) gives the
    results of the new weights, in this module and in a fresh one."""
    m = fastrnn.LSTM(64, 64, dtype=dtype, seed=0).eval()
    x = np.random.default_rng(1).standard_normal((10, 8, 64)).astype(dtype)   # W_hh packed
    m(x)
    u = m.weight_hh_l0.data.reshape(-1).view(np.uint64)
    u[5] ^= np.uint64(1 << 63)
    u[37] ^= np.uint64(1 << 28)
    u[100] ^= np.uint64(1 << 63)
    u[164] ^= np.uint64(1 << 28)
    after = m(x)[0]
    fresh = fastrnn.LSTM(64, 64, dtype=dtype).eval()
    fresh.load_state_dict(m.state_dict())
    _recurrent._pack_cache_enable(False)
    try:
        truth = m(x)[0]
    finally:
        _recurrent._pack_cache_enable(True)
    assert np.array_equal(after, truth)
    assert np.array_equal(fresh(x)[0], truth)


# ---- eval calls ---------------------------------------------------------------

def eval_layer(module, I, H, seed=0, **kw):
    return {**MODULES, **RESET_BEFORE}[module](I, H, seed=seed, **kw).eval()


@pytest.mark.parametrize("module", sorted(MODULES) + sorted(RESET_BEFORE))
@pytest.mark.parametrize("B", [2, 5, 40])      # packs W_hh at B >= 2 for T*B >= 32; 40: row split
def test_eval_calls_reuse_the_packing_and_match_a_fresh_one(module, B):
    layer = eval_layer(module, 24, 72, bidirectional=True)
    x = np.random.default_rng(1).standard_normal((30, B, 24)).astype(np.float32)
    fresh = uncached(lambda: layer(x)[0])
    assert entries() > 0, "an eval call that packs keeps its packed weights"
    kept = entries()
    for _ in range(3):
        again = layer(x)[0]
        assert np.array_equal(again, fresh)
    assert entries() == kept, "the same weights are found, not packed again"


@pytest.mark.parametrize("module", sorted(MODULES) + sorted(RESET_BEFORE))
@pytest.mark.parametrize("name", ["weight_hh_l0", "weight_ih_l0", "weight_hh_l0_reverse"])
def test_an_in_place_change_of_one_weight_by_one_ulp_is_seen(module, name):
    layer = eval_layer(module, 20, 48, bidirectional=True)
    x = np.random.default_rng(2).standard_normal((40, 6, 20)).astype(np.float32)
    w = getattr(layer, name).data
    before = uncached(lambda: layer(x)[0])
    # Not every one-ulp change shows in the output (rounding can absorb it): take the
    # first of the largest weights whose change does, packed afresh.
    for flat_i in np.argsort(-np.abs(w), axis=None)[:64]:
        i = np.unravel_index(flat_i, w.shape)
        old = w[i]
        w[i] = np.nextafter(old, np.float32(np.inf))
        want = uncached(lambda: layer(x)[0])
        w[i] = old
        if not np.array_equal(want, before):
            break
    else:
        pytest.fail(f"no one-ulp change of {name}'s 64 largest weights shows in the output")
    assert np.array_equal(layer(x)[0], before)        # the old weights, packed and kept
    kept = entries()
    assert kept > 0
    w[i] = np.nextafter(old, np.float32(np.inf))      # in place: the array is the same object
    assert np.array_equal(layer(x)[0], want), "the kept packing of the old weights was used"
    assert entries() == kept, "the changed weight is packed again, over its stale copy"
    w[i] += np.float32(0.25)                          # a change large enough to show
    changed = layer(x)[0]
    assert not np.array_equal(changed, before)
    assert np.array_equal(changed, uncached(lambda: layer(x)[0]))


@pytest.mark.parametrize("module", sorted(MODULES))
@pytest.mark.parametrize("precision", ["highest", "medium"])    # medium: bf16 panels
def test_weights_updated_between_eval_calls_do_not_pile_up_stale_copies(module, precision):
    """A training loop that evaluates after every update: each new packing of an array
    takes the place (and the buffer) of that array's stale one, so the cache holds one
    copy per array and layout however many updates there were."""
    layer = eval_layer(module, 20, 48)
    x = np.random.default_rng(4).standard_normal((40, 6, 20)).astype(np.float32)
    with _precision.scoped(precision):
        _precision._force_bf16 = precision == "medium"
        try:
            layer(x)
            kept, held = _recurrent._pack_cache_stats()
            assert kept > 0
            for step in range(20):
                for p in layer.parameters():
                    p.data *= np.float32(0.999)
                y = layer(x)[0]
                assert _recurrent._pack_cache_stats() == (kept, held)
            assert np.array_equal(y, uncached(lambda: layer(x)[0]))
        finally:
            _precision._force_bf16 = False


def test_a_stale_copy_still_serves_another_array_with_its_contents():
    """The key is the contents: a second array holding the old weights finds the copy
    packed from the first until the first array's next packing replaces it."""
    a = eval_layer("LSTM", 20, 48)
    b = eval_layer("LSTM", 20, 48)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(5).standard_normal((40, 6, 20)).astype(np.float32)
    want = a(x)[0]
    kept = entries()
    assert np.array_equal(b(x)[0], want) and entries() == kept     # found: same contents
    a.weight_hh_l0.data[0, 0] += np.float32(0.5)
    a(x)                                                            # replaces a's stale copy
    assert entries() == kept
    assert np.array_equal(b(x)[0], want)                            # b packs its own again
    assert entries() == kept + 1


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_functional_eval_calls_are_cached_and_training_calls_are_not(cell):
    rng = np.random.default_rng(3)
    T, B, I, H = 25, 8, 16, 40
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    w_ih = rng.standard_normal((G * H, I)).astype(np.float32) * 0.2
    w_hh = rng.standard_normal((G * H, H)).astype(np.float32) * 0.2
    fwd = getattr(F, f"{cell}_forward")
    args = ((x, None, None, w_ih, w_hh, None, None) if cell == "lstm"
            else (x, None, w_ih, w_hh, None, None))
    fwd(*args, training=True)
    assert entries() == 0, "training calls change the weights every step: nothing kept"
    fresh = fwd(*args, training=False)[0]
    assert entries() > 0
    assert np.array_equal(fwd(*args, training=False)[0], fresh)
    assert np.array_equal(fwd(*args, training=True)[0], fresh)
    w_hh[0, 0] += 1.0
    fresh = uncached(lambda: fwd(*args, training=False)[0])
    assert np.array_equal(fwd(*args, training=False)[0], fresh)


def test_threads_isa_and_precision_each_get_their_own_packing():
    """Each setting's packing is kept apart. Two threads: in float32 an eval call runs on
    the pool's team (the fixture's hold is lifted here, and calls repeat until one ran on
    a team), which packs each thread's slice; under "medium" on OpenMP's threads."""
    from test_team_pool import until_team
    layer = eval_layer("LSTM", 32, 96)
    x = np.random.default_rng(4).standard_normal((40, 3, 32)).astype(np.float32)
    before_threads, before_isa = fastrnn.get_num_threads(), fastrnn.config()["isa"]
    try:
        for isa in fastrnn.config()["isas_available"]:
            fastrnn.set_isa(isa)
            for n in (1, 2):
                fastrnn.set_num_threads(n)
                _recurrent.pool_hold(n == 1)
                for precision in ("highest", "medium"):
                    on_team = n == 2 and precision == "highest"
                    call = (lambda: until_team(lambda: layer(x))) if on_team else \
                        (lambda: layer(x))
                    with _precision.scoped(precision):
                        _precision._force_bf16 = precision == "medium"
                        try:
                            want = uncached(lambda: layer(x)[0])
                            call()                         # fill the cache at this setting
                            got = call()[0]
                        finally:
                            _precision._force_bf16 = False
                    assert np.array_equal(got, want), (isa, n, precision)
    finally:
        _recurrent.pool_hold(True)
        fastrnn.set_isa(before_isa)
        fastrnn.set_num_threads(before_threads)
    # all of those settings at once in the cache, then each again: still each its own
    for isa in fastrnn.config()["isas_available"]:
        fastrnn.set_isa(isa)
        try:
            layer(x)
        finally:
            fastrnn.set_isa(before_isa)
    assert np.array_equal(layer(x)[0], uncached(lambda: layer(x)[0]))


def test_the_cache_stays_within_its_entries_and_release_memory_empties_it():
    x = np.random.default_rng(5).standard_normal((20, 4, 16)).astype(np.float32)
    layers = [eval_layer("GRU", 16, 64, seed=s) for s in range(40)]   # 80 packings
    outs = [layer(x)[0] for layer in layers]
    n, nbytes = _recurrent._pack_cache_stats()
    assert 0 < n <= 64 and nbytes <= 256 << 20    # FASTRNN_PACK_CACHE_SLOTS, _KEEP
    for layer, out in zip(layers, outs):          # evicted or not, the same numbers
        assert np.array_equal(layer(x)[0], out)
    fastrnn.release_memory()
    assert _recurrent._pack_cache_stats() == (0, 0)


def test_two_layers_with_equal_weights_share_one_packing():
    # One thread: with two, a call packs for a team's split, or for the calling thread
    # alone when no worker is awake (src/team_pool.h), and either may come first.
    a, b = eval_layer("LSTM", 16, 48, seed=7), eval_layer("LSTM", 16, 48, seed=7)
    x = np.random.default_rng(6).standard_normal((30, 4, 16)).astype(np.float32)
    with fastrnn.functional.thread_share(1):
        ya = a(x)[0]
        kept = entries()
        assert np.array_equal(b(x)[0], ya)
        assert entries() == kept


def test_python_threads_calling_one_layer_at_once_get_right_answers():
    layer = eval_layer("LSTM", 24, 64)
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal((30, 4, 24)).astype(np.float32) for _ in range(6)]
    want = [uncached(lambda x=x: layer(x)[0]) for x in xs]
    got = [None] * len(xs)
    errors = []

    def work(k):
        try:
            for _ in range(5):
                got[k] = layer(xs[k])[0]
        except Exception as e:   # noqa: BLE001 (re-raised below, in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


@pytest.mark.parametrize("env, kept", [("0", False), ("1", True), ("", True)])
def test_fastrnn_pack_cache_env_turns_it_off(env, kept):
    code = ("import numpy as np, fastrnn; from fastrnn import _recurrent; "
            "m = fastrnn.GRU(8, 32, seed=0).eval(); "
            "m(np.ones((20, 4, 8), np.float32)); "
            "print(fastrnn.config()['pack_cache'], _recurrent._pack_cache_stats()[0] > 0)")
    env_vars = {**os.environ, "FASTRNN_PACK_CACHE": env}
    out = subprocess.run([sys.executable, "-c", code], env=env_vars, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(kept), str(kept)]


def test_fastrnn_pack_cache_env_rejects_other_values():
    env_vars = {**os.environ, "FASTRNN_PACK_CACHE": "yes"}
    res = subprocess.run([sys.executable, "-c", "import fastrnn"], env=env_vars,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "FASTRNN_PACK_CACHE must be 0 or 1, got 'yes'" in res.stderr


def test_benchmark_header_says_when_the_cache_is_off():
    code = ("from fastrnn.benchmark.runner import machine_header; "
            "print('per call' in machine_header([], 2))")
    for env, off in (("0", True), ("1", False)):
        out = subprocess.run([sys.executable, "-c", code],
                             env={**os.environ, "FASTRNN_PACK_CACHE": env},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == str(off)


@pytest.mark.parametrize("cls", [fastrnn.LSTMCell, fastrnn.GRUCell, fastrnn.RNNCell])
def test_a_cell_in_training_keeps_its_packing_through_a_sequence(cls):
    """A training call of a single step (T=1) that packs (batch over 8) keeps its
    packed weights: a cell's next steps read the same weights. An in-place edit
    between steps is seen (bitwise an uncached run's numbers), and an optimizer's
    in-place updates leave one copy per weight, not one per update."""
    rng = np.random.default_rng(4)
    B, I, H, T = 12, 20, 36, 4
    x = rng.standard_normal((T, B, I)).astype(np.float32)

    def sequence(cell, edit):
        outs, state = [], None
        for t in range(T):
            if t == 2 and edit:
                cell.weight_hh.data[3, 5] += 1e-3           # in place, mid-sequence
            state = cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return outs

    for edit in (False, True):
        cached = sequence(cls(I, H, seed=1), edit)
        assert entries() == 2                              # W_ih's and W_hh's packings
        fastrnn.release_memory()
        _recurrent._pack_cache_enable(False)                # every step packs anew
        try:
            fresh = sequence(cls(I, H, seed=1), edit)
        finally:
            _recurrent._pack_cache_enable(True)
        for a, b in zip(cached, fresh):
            assert np.array_equal(a, b)
        fastrnn.release_memory()
    cell = cls(I, H, seed=1)
    opt = fastrnn.optim.SGD(cell.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        outs = sequence(cell, False)
        carry = np.ones((B, H), np.float32)
        for t in reversed(range(T)):
            _, carry = cell.backward((carry, None) if cls is fastrnn.LSTMCell else carry)
            carry = carry[0] if isinstance(carry, tuple) else carry
        opt.step()
    assert entries() == 2


def test_a_training_step_with_large_weights_keeps_nothing(monkeypatch):
    """Past functional.STEP_PACKS_MAX_BYTES of weights a single training step packs
    into scratch as before: packings that do not fit beside each other in the cache
    would evict, at every call, the one the next call needs."""
    rng = np.random.default_rng(5)
    cell = fastrnn.LSTMCell(20, 36, seed=1)                  # 4 * 36 * 56 * 4 bytes
    x = rng.standard_normal((12, 20)).astype(np.float32)
    monkeypatch.setattr(F, "STEP_PACKS_MAX_BYTES",
                        cell.weight_ih.data.nbytes + cell.weight_hh.data.nbytes - 1)
    cell(x)
    assert entries() == 0
    monkeypatch.setattr(F, "STEP_PACKS_MAX_BYTES", 32 << 20)
    cell(x)
    assert entries() == 2
