"""Truncated-BPTT batching, tokenisers with JSON vocabularies, metrics."""

import json
import math

import numpy as np
import pytest

from fastrnn.data.batching import TBPTTLoader, batchify, eval_streams
from fastrnn.data.tokenizers import (BPETokenizer, CharTokenizer, WordTokenizer,
                                     load_tokenizer, tokenizer_from_dict)
from fastrnn.lm import RNNLanguageModel
from fastrnn.metrics import NLLMeter, evaluate_lm, perplexity
from fastrnn.nn import softmax_cross_entropy


pytestmark = pytest.mark.usefixtures("one_kernel_thread")   # conftest.py


TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die "
        "than to famish?\n\nAll:\nResolved. resolved.\n") * 3


# -- batching ------------------------------------------------------------------------------
def test_batchify_streams_are_contiguous_columns():
    data = batchify(np.arange(23), 4)
    assert data.shape == (5, 4) and data.flags.c_contiguous
    np.testing.assert_array_equal(data[:, 1], np.arange(5, 10))
    with pytest.raises(ValueError, match="too few"):
        batchify(np.arange(3), 4)


def test_sequential_chunks_continue_each_stream():
    ids = np.arange(1000)
    loader = TBPTTLoader(ids, batch_size=4, seq_len=7, mode="sequential", seed=0,
                         random_offset=False)
    chunks = list(loader.epoch(0))
    assert len(chunks) == len(loader)
    assert chunks[0].reset and not any(c.reset for c in chunks[1:])
    for c in chunks:
        np.testing.assert_array_equal(c.y, c.x + 1)                 # next-token targets
        assert c.x.shape[1] == 4 and c.x.shape[0] <= 7
    for a, b in zip(chunks, chunks[1:]):
        np.testing.assert_array_equal(b.x[0], a.x[-1] + 1)          # stream b continues
    # every stream is covered without gaps: 250 tokens per stream, 249 targets
    assert sum(c.x.shape[0] for c in chunks) == 249
    assert chunks[-1].x.shape[0] == 249 - 7 * 35                    # short last chunk


def test_sequential_random_offset_changes_per_epoch_and_is_seeded():
    ids = np.arange(5000)
    loader = TBPTTLoader(ids, 8, 16, mode="sequential", seed=3)
    firsts = [next(loader.epoch(e)).x[0, 0] for e in range(6)]
    assert all(0 <= f < 16 for f in firsts) and len(set(firsts)) > 1
    again = TBPTTLoader(ids, 8, 16, mode="sequential", seed=3)
    assert [next(again.epoch(e)).x[0, 0] for e in range(6)] == firsts


def test_random_partitioning():
    ids = np.arange(3000)
    loader = TBPTTLoader(ids, batch_size=5, seq_len=10, mode="random", seed=1)
    chunks = list(loader.epoch(0))
    assert all(c.reset for c in chunks)                              # state reset every chunk
    starts = []
    for c in chunks:
        assert c.x.shape == (10, 5)
        np.testing.assert_array_equal(c.y, c.x + 1)
        np.testing.assert_array_equal(c.x[1:], c.x[:-1] + 1)         # contiguous sub-sequences
        starts.extend(c.x[0].tolist())
    assert len(set(starts)) == len(starts)                           # non-overlapping
    offsets = {s % 10 for s in starts}
    assert len(offsets) == 1                                         # one random offset per epoch
    assert starts != sorted(starts)                                  # shuffled
    other = [c.x[0].tolist() for c in loader.epoch(1)]
    assert other != [c.x[0].tolist() for c in chunks]                # a new order next epoch
    # resumable: starting at chunk k gives the same chunks as skipping k
    resumed = list(loader.epoch(0, start=3))
    np.testing.assert_array_equal(resumed[0].x, chunks[3].x)
    assert len(resumed) == len(chunks) - 3


def test_loader_too_short_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        TBPTTLoader(np.arange(10), 8, 16, mode="sequential")
    with pytest.raises(ValueError, match="too few"):
        TBPTTLoader(np.arange(100), 8, 16, mode="random")
    with pytest.raises(ValueError):
        TBPTTLoader(np.arange(100), 2, 4, mode="shuffled")


def test_eval_streams_predict_every_token_once():
    ids = np.arange(1, 104)
    x, y = eval_streams(ids, 4, pad_id=0, ignore_index=-100)
    targets = np.sort(y[y != -100])
    np.testing.assert_array_equal(targets, ids[1:])
    valid = y != -100
    np.testing.assert_array_equal(y[valid], x[valid] + 1)
    # padding only at the end of a stream
    for b in range(x.shape[1]):
        col = valid[:, b]
        assert not np.any(col[np.argmin(col):]) or col.all()


# -- tokenisers ------------------------------------------------------------------------------
def test_char_tokenizer_roundtrip_and_unknown(tmp_path):
    tok = CharTokenizer.fit(TEXT)
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int64 and tok.decode(ids) == TEXT
    assert tok.vocab_size == len(set(TEXT))
    with pytest.raises(KeyError, match="'Z'"):
        tok.encode("Zebra")
    n = tok.vocab_size                   # ids outside the vocabulary: -1 decoded as the last
    for bad in ([-1], [n], [0, n + 5]):
        with pytest.raises(ValueError, match=rf"ids: expected token ids in \[0, {n - 1}\]"):
            tok.decode(bad)
    with pytest.raises(TypeError, match="ids: expected integers"):
        tok.decode([0.5])
    assert tok.decode([]) == "" and tok.decode(np.array([1.0, 2.0])) == tok.decode([1, 2])
    path = tmp_path / "vocab.json"
    tok.save(path)
    json.loads(path.read_text(encoding="utf-8"))                     # plain JSON
    again = load_tokenizer(path)
    assert isinstance(again, CharTokenizer) and again.itos == tok.itos
    unk = CharTokenizer.fit("abc", unk=True)
    assert unk.decode(unk.encode("abz")) == "ab<unk>"
    with pytest.raises(ValueError):
        CharTokenizer.fit("")


def test_word_tokenizer_eos_and_unk(tmp_path):
    tok = WordTokenizer.fit("the cat sat\nthe dog\n")
    ids = tok.encode("the cat\nthe bird\n")
    words = [tok.itos[i] for i in ids]
    assert words == ["the", "cat", "<eos>", "the", "<unk>", "<eos>"]
    assert tok.decode(ids) == "the cat\nthe <unk>\n"
    assert [tok.itos[i] for i in tok.encode("the cat")] == ["the", "cat", "<eos>"]
    assert [tok.itos[i] for i in tok.encode("the cat", final_eos=False)] == ["the", "cat"]
    assert tok.itos[:3] == ["<unk>", "<eos>", "the"]                 # most frequent first
    tok.save(tmp_path / "w.json")
    assert load_tokenizer(tmp_path / "w.json").itos == tok.itos
    small = WordTokenizer.fit("a a a b b c\n", max_size=4)
    assert small.itos == ["<unk>", "<eos>", "a", "b"]


def test_bpe_tokenizer_learns_merges_and_roundtrips(tmp_path):
    tok = BPETokenizer.fit(TEXT, num_merges=60)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT                                   # lossless
    assert len(ids) < 0.6 * len(TEXT)                                # merges compress
    assert 0 < len(tok.merges) <= 60
    # the most frequent adjacent pair in the text is learned first
    assert "".join(tok.merges[0]) in TEXT
    unseen = "Speak, Zed?"
    assert tok.decode(tok.encode(unseen)) == "Speak, <unk>ed?"
    tok.save(tmp_path / "b.json")
    again = load_tokenizer(tmp_path / "b.json")
    np.testing.assert_array_equal(again.encode(TEXT), ids)
    with_alpha = BPETokenizer.fit("aaab", num_merges=5, alphabet="xyz")
    assert {"x", "y", "z"} <= set(with_alpha.itos)


def test_bpe_merge_counts_match_a_naive_recount():
    text = "low lower lowest newer newest wider wide\n" * 5
    tok = BPETokenizer.fit(text, num_merges=15)
    # naive reference: recount all pairs after each merge
    import collections
    import re
    words = collections.Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    segs = {w: list(w) for w in words}
    for merge in tok.merges:
        counts = collections.Counter()
        for w, s in segs.items():
            for a, b in zip(s, s[1:]):
                counts[a, b] += words[w]
        best = max(counts.values())
        assert counts[merge] == best                                   # a most frequent pair
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == merge:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out


def test_bad_vocabulary_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON"):
        load_tokenizer(p)
    with pytest.raises(ValueError):
        tokenizer_from_dict({"type": "pickle"})
    with pytest.raises(ValueError):
        tokenizer_from_dict({"type": "bpe"})


# -- metrics -------------------------------------------------------------------------------
def test_perplexity_and_meter():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(65)) == pytest.approx(65)
    assert perplexity(1e6) == math.inf
    m = NLLMeter()
    m.update(6.0, 3)
    m.update_mean(1.0, 1)
    assert m.mean == pytest.approx(7.0 / 4) and m.ppl == pytest.approx(math.exp(1.75))


def test_evaluate_lm_covers_all_tokens_and_matches_one_stream():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, 301)
    model = RNNLanguageModel(11, 8, 16, cell="gru", dtype=np.float64, seed=0)
    model.train()
    res = evaluate_lm(model, ids, num_streams=1, seq_len=7)
    assert res["tokens"] == 300 and model.training                    # mode restored
    model.eval()
    logits, _ = model(ids[:-1, None])
    manual, _ = softmax_cross_entropy(logits, ids[1:, None], need_grad=False)
    assert res["loss"] == pytest.approx(manual, rel=1e-10)
    assert res["ppl"] == pytest.approx(math.exp(manual))
    # more streams: same token count, similar loss (cold starts change it a little)
    res4 = evaluate_lm(model, ids, num_streams=4, seq_len=50)
    assert res4["tokens"] == 300 and abs(res4["loss"] - manual) < 0.1
    # an untrained model is close to uniform
    assert abs(res["loss"] - math.log(11)) < 0.5
