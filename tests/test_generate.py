"""Sampling (temperature, top-k, greedy, seeds) and text generation with priming."""

import numpy as np
import pytest

import fastrnn
from fastrnn.data.tokenizers import CharTokenizer, WordTokenizer
from fastrnn.generate import generate, generate_ids, sample_logits, start_ids
from fastrnn.lm import RNNLanguageModel
from fastrnn.nn import softmax
from fastrnn.train import TrainConfig, Trainer


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])


def freqs(n=20000, **kw):
    rng = np.random.default_rng(0)
    draws = sample_logits(np.tile(LOGITS, (n, 1)), rng=rng, **kw)
    assert draws.shape == (n,)
    return np.bincount(draws, minlength=len(LOGITS)) / n


def test_greedy_and_zero_temperature_take_argmax():
    assert sample_logits(LOGITS, greedy=True) == 5
    assert sample_logits(LOGITS, temperature=0) == 5
    assert sample_logits(LOGITS, top_k=1, rng=3) == 5
    batch = np.array([[0.0, 1.0], [5.0, -5.0]])
    np.testing.assert_array_equal(sample_logits(batch, greedy=True), [1, 0])


def test_sampling_follows_softmax_with_temperature():
    np.testing.assert_allclose(freqs(), softmax(LOGITS), atol=0.01)
    np.testing.assert_allclose(freqs(temperature=2.0), softmax(LOGITS / 2), atol=0.01)
    cold = freqs(temperature=0.25)
    assert cold[5] > 0.95


def test_top_k_restricts_and_renormalises():
    f = freqs(top_k=2)
    assert set(np.nonzero(f)[0]) == {0, 5}
    p = softmax(np.array([2.0, 3.0]))
    np.testing.assert_allclose([f[0], f[5]], p, atol=0.01)
    with pytest.raises(ValueError):
        sample_logits(LOGITS, top_k=0, rng=0)
    with pytest.raises(ValueError):
        sample_logits(LOGITS, temperature=-1)


def test_sampling_is_seeded():
    a = sample_logits(np.tile(LOGITS, (50, 1)), rng=42)
    b = sample_logits(np.tile(LOGITS, (50, 1)), rng=42)
    c = sample_logits(np.tile(LOGITS, (50, 1)), rng=43)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture(scope="module")
def cyclic_model():
    """A small char LSTM trained on a periodic text until it predicts it."""
    text = "abcdefgh" * 400
    cfg = TrainConfig(hidden=32, embed=8, batch_size=8, seq_len=16, lr=0.02, max_steps=80,
                      val_fraction=0.1, eval_every=None, seed=0)
    trainer = Trainer(cfg, text)
    res = trainer.run(progress=False)
    return trainer, res


def test_generation_continues_the_priming_text(cyclic_model):
    trainer, res = cyclic_model
    assert res["val_loss"] < 0.1                                 # it has learned the cycle
    out = generate(trainer.model, trainer.tokenizer, prime="cde", length=12, greedy=True)
    assert out == "fghabcdefgha"
    out = generate(trainer.model, trainer.tokenizer, prime="h", length=4, temperature=0.5,
                   seed=1)
    assert out == "abcd"
    assert trainer.model.training                                # mode restored


def test_generation_is_seeded_and_unknown_prime_is_an_error(cyclic_model):
    trainer, _ = cyclic_model
    m, tok = trainer.model, trainer.tokenizer
    a = generate(m, tok, prime="a", length=40, temperature=5.0, seed=7)
    b = generate(m, tok, prime="a", length=40, temperature=5.0, seed=7)
    c = generate(m, tok, prime="a", length=40, temperature=5.0, seed=8)
    assert a == b and a != c and len(a) == 40
    with pytest.raises(KeyError, match="'x'"):
        generate(m, tok, prime="xyz", length=3)


def test_generate_ids_and_start_ids():
    model = RNNLanguageModel(7, 4, 8, cell="rnn_tanh", seed=0)
    ids = generate_ids(model, [1, 2, 3], 10, seed=0)
    assert ids.shape == (10,) and ids.min() >= 0 and ids.max() < 7
    with pytest.raises(ValueError):
        generate_ids(model, [], 3)
    char = CharTokenizer.fit("ab\ncd")
    assert char.itos[start_ids(char)[0]] == "\n"
    word = WordTokenizer.fit("x y\n")
    assert word.itos[start_ids(word)[0]] == "<eos>"
    assert start_ids(CharTokenizer.fit("ab"))[0] == 0


def test_word_generation_primes_mid_sentence(monkeypatch):
    """A word prime without a final newline continues its sentence: the model is primed
    with the prime's words and no <eos> after them."""
    from fastrnn import generate as gen_mod
    word = WordTokenizer.fit("the cat sat on the mat\n" * 20)
    model = RNNLanguageModel(word.vocab_size, 4, 8, cell="gru", seed=0)
    primed = []
    real = gen_mod.generate_ids
    monkeypatch.setattr(gen_mod, "generate_ids",
                        lambda m, ids, *a, **k: primed.append(list(ids)) or real(m, ids, *a, **k))
    text = generate(model, word, prime="the cat", length=6, seed=0)
    assert primed == [list(word.encode("the cat", final_eos=False))]
    assert primed[0] == list(word.encode("the cat"))[:-1]          # the <eos> left out
    assert isinstance(text, str) and len(text.split()) <= 6


def test_num_samples_each_row_its_own_stream_and_seeded():
    model = RNNLanguageModel(11, 4, 16, cell="lstm", seed=0)
    a = generate_ids(model, [1, 2], 25, temperature=3.0, seed=5, num_samples=4)
    b = generate_ids(model, [1, 2], 25, temperature=3.0, seed=5, num_samples=4)
    c = generate_ids(model, [1, 2], 25, temperature=3.0, seed=6, num_samples=4)
    assert a.shape == (4, 25) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 11
    np.testing.assert_array_equal(a, b)                          # reproducible
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) == 4                       # rows do not share draws
    greedy = generate_ids(model, [1, 2], 6, greedy=True, num_samples=3)
    assert (greedy == greedy[0]).all()                           # same prime, same argmax
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="num_samples"):
            generate_ids(model, [1], 3, num_samples=bad)
    with pytest.raises(TypeError, match="seed"):
        generate_ids(model, [1], 3, num_samples=2, seed=np.random.default_rng(0))


def test_sample_logits_per_row_generators():
    logits = np.tile(LOGITS, (3, 1))
    rngs = [np.random.default_rng(s) for s in (1, 2, 3)]
    got = sample_logits(logits, rng=rngs)
    want = [int(sample_logits(LOGITS[None], rng=np.random.default_rng(s))[0]) for s in (1, 2, 3)]
    assert got.tolist() == want
    with pytest.raises(ValueError, match="one generator per row"):
        sample_logits(logits, rng=rngs[:2])


def test_generate_texts_from_a_quantised_model():
    char = CharTokenizer.fit("abcdefgh\n" * 5)
    model = RNNLanguageModel(char.vocab_size, 4, 16, cell="gru", seed=0)
    q = fastrnn.quantize(model, "int8")
    texts = generate(q, char, prime="ab", length=7, seed=1, num_samples=3)
    assert len(texts) == 3 and all(len(t) == 7 for t in texts)
    assert texts == generate(q, char, prime="ab", length=7, seed=1, num_samples=3)


def test_num_samples_start_from_the_given_state():
    """generate_ids(state=..., num_samples=n) ignored the state: every sample started
    from zeros. Greedy samples from a state equal the single greedy sequence from it."""
    lm = RNNLanguageModel(30, embed_size=8, hidden_size=33, cell="gru", seed=0).eval()
    _, state = lm(np.array([[3], [5], [7]]), None)
    one = generate_ids(lm, [1, 2], 8, greedy=True, state=state)
    many = generate_ids(lm, [1, 2], 8, greedy=True, state=state, num_samples=3)
    assert (many == one).all()
    assert not (generate_ids(lm, [1, 2], 8, greedy=True, num_samples=2) == one).all()
    with pytest.raises(ValueError, match="state: expected arrays of shape"):
        generate_ids(lm, [1, 2], 4, state=np.zeros((1, 4, 33), np.float32), num_samples=3)


def test_a_temperature_so_small_that_logits_overflow_takes_the_arg_max():
    logits = np.array([[0.1, 3.0, -2.0], [5.0, 1.0, 2.0]])
    for t in (1e-308, 5e-324):
        assert sample_logits(logits, t, rng=0).tolist() == [1, 0]   # it was [0, 0]


def test_bad_generation_arguments_are_named_errors():
    """From a user trial (session 35): a NaN temperature sampled greedily, a float
    priming id or length was truncated, a negative length was NumPy's message."""
    lm = RNNLanguageModel(10, 4, 8, seed=0)
    for kw, err, match in [(dict(temperature=float("nan")), ValueError, "temperature must be"),
                           (dict(length=-1), ValueError, r"length: expected an integer >= 0"),
                           (dict(length=2.5), ValueError, r"length: .* got 2.5"),
                           (dict(length=-1, num_samples=2), ValueError, "length: expected"),
                           (dict(prime_ids=[1.7]), TypeError, "prime_ids: expected integer")]:
        args = dict(prime_ids=[1], length=5, seed=0)
        args.update(kw)
        with pytest.raises(err, match=match):
            generate_ids(lm, **args)
    assert generate_ids(lm, [1], 0, seed=0).shape == (0,)
    assert generate_ids(lm, np.array([1], np.int32), 3, seed=0).shape == (3,)
    with pytest.raises(ValueError, match="temperature must be >= 0, got nan"):
        sample_logits(np.zeros(4), float("nan"), None, False, np.random.default_rng(0))
