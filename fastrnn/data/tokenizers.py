"""Tokenisers: character, word and byte-pair (BPE), with JSON vocabularies.

All tokenisers share one interface:

* ``Tokenizer.fit(text)`` (classmethod) builds the vocabulary from a text;
* ``encode(text) -> int64 array`` and ``decode(ids) -> str``;
* ``vocab_size``, ``to_dict()`` / ``from_dict(d)``, ``save(path)`` /
  ``load_tokenizer(path)`` (plain JSON, never pickle).

Character: one id per distinct character (sorted). Word: whitespace-separated
words, every line ends with ``<eos>``, unknown words map to ``<unk>``; decode
joins words with spaces and turns ``<eos>`` into a newline. BPE: starts from
the characters of the text and greedily merges the most frequent adjacent
pair ``num_merges`` times, inside pre-tokenised chunks (a word with its
leading space, a run of punctuation, a run of whitespace); decoding is exact.
"""

import collections
import heapq
import json
import re

import numpy as np

from fastrnn._atomic import replacing

__all__ = ["CharTokenizer", "WordTokenizer", "BPETokenizer", "load_tokenizer",
           "tokenizer_from_dict", "TOKENIZERS"]

UNK = "<unk>"
EOS = "<eos>"


def _token_ids(ids, vocab_size):
    """ids as a flat int64 array, each checked to be a token of the vocabulary (a negative
    id would otherwise index from the end: -1 decoded as the last token)."""
    a = np.asarray(ids).reshape(-1)
    if a.size and a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.array_equal(a, np.rint(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"ids: expected integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ValueError(f"ids: expected token ids in [0, {vocab_size - 1}], got values from "
                         f"{int(a.min())} to {int(a.max())}")
    return a


class Tokenizer:
    kind = None

    def __init__(self, tokens):
        tokens = list(tokens)
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self.itos = tokens
        self.stoi = {t: i for i, t in enumerate(tokens)}

    @property
    def vocab_size(self):
        return len(self.itos)

    def __len__(self):
        return len(self.itos)

    def to_dict(self):
        return {"type": self.kind, "tokens": list(self.itos)}

    def to_json(self):
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def save(self, path):
        with replacing(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_json())

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One token per character. Encoding an unseen character raises
    ``KeyError`` naming it, unless the vocabulary has ``<unk>`` (built with
    ``fit(text, unk=True)``)."""

    kind = "char"

    def __init__(self, chars, unk=False):
        chars = list(chars)
        for c in chars:
            if len(c) != 1:
                raise ValueError(f"character vocabulary entry {c!r} is not one character")
        self.unk = bool(unk)
        super().__init__(chars + ([UNK] if unk else []))

    @classmethod
    def fit(cls, text, unk=False):
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)), unk=unk)

    def encode(self, text):
        stoi = self.stoi
        try:
            return np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            if self.unk:
                u = stoi[UNK]
                return np.array([stoi.get(c, u) for c in text], dtype=np.int64)
            raise KeyError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids):
        itos = self.itos
        return "".join(itos[i] for i in _token_ids(ids, len(itos)).tolist())

    def to_dict(self):
        chars = self.itos[:-1] if self.unk else self.itos
        return {"type": self.kind, "tokens": list(chars), "unk": self.unk}

    @classmethod
    def from_dict(cls, d):
        return cls(d["tokens"], unk=d.get("unk", False))


class WordTokenizer(Tokenizer):
    """Whitespace-separated words; each line ends with ``<eos>``.

    ``fit(text, min_freq=1, max_size=None)`` keeps the most frequent words
    (ties broken alphabetically); ``<unk>`` and ``<eos>`` are always ids 0, 1.
    """

    kind = "word"

    @classmethod
    def fit(cls, text, min_freq=1, max_size=None):
        counts = collections.Counter(text.split())
        if not counts:
            raise ValueError("cannot build a word vocabulary from text without words")
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        words = sorted((w for w, c in counts.items() if c >= min_freq),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max(0, max_size - 2)]
        return cls([UNK, EOS] + words)

    def tokenize(self, text):
        out = []
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # a trailing newline ends the last line, it does not start one
        for line in lines:
            out.extend(line.split())
            out.append(EOS)
        return out

    def encode(self, text, final_eos=True):
        """Ids of the words of ``text``, ``<eos>`` after every line. With
        ``final_eos=False`` a last line without a newline gets no ``<eos>``
        (useful for priming generation mid-sentence)."""
        stoi, unk = self.stoi, self.stoi[UNK]
        words = self.tokenize(text)
        if not final_eos and words and not text.endswith("\n"):
            words.pop()
        return np.array([stoi.get(w, unk) for w in words], dtype=np.int64)

    def decode(self, ids):
        parts = []
        line = []
        for i in _token_ids(ids, len(self.itos)).tolist():
            w = self.itos[i]
            if w == EOS:
                parts.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(w)
        if line:
            parts.append(" ".join(line))
        return "".join(parts)

    @classmethod
    def from_dict(cls, d):
        return cls(d["tokens"])


_PRETOKEN = re.compile(r" ?\w+| ?[^\w\s]+|\s+")


def _pretokenize(text):
    return _PRETOKEN.findall(text)


class BPETokenizer(Tokenizer):
    """Byte-pair encoding over characters.

    ``fit(text, num_merges=...)`` learns merges: the vocabulary is the
    distinct characters of the text (plus ``<unk>`` for characters seen later
    that are not in it) followed by one token per merge, in merge order.
    Encoding applies merges by rank within each pre-token.
    """

    kind = "bpe"

    def __init__(self, chars, merges):
        chars = list(chars)
        merges = [tuple(m) for m in merges]
        tokens = [UNK] + chars + ["".join(m) for m in merges]
        # two merges can produce the same string; keep the vocabulary unique
        seen, uniq = set(), []
        for t in tokens:
            if t not in seen:
                seen.add(t)
                uniq.append(t)
        super().__init__(uniq)
        self.chars = chars
        self.merges = merges
        self.ranks = {m: r for r, m in enumerate(merges)}
        self._cache = {}

    @classmethod
    def fit(cls, text, num_merges=256, alphabet=""):
        """Learn up to ``num_merges`` merges from ``text``; the base alphabet is
        the characters of ``text`` plus those of ``alphabet``."""
        if not text:
            raise ValueError("cannot train BPE on empty text")
        chars = sorted(set(text) | set(alphabet))
        word_freq = collections.Counter(_pretokenize(text))
        words = [list(w) for w in word_freq]
        freqs = [word_freq[w] for w in word_freq]

        pair_count = collections.Counter()
        where = collections.defaultdict(set)        # pair -> indices of words holding it
        for wi, (syms, f) in enumerate(zip(words, freqs)):
            for a, b in zip(syms, syms[1:]):
                pair_count[a, b] += f
                where[a, b].add(wi)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)

        merges = []
        while len(merges) < num_merges and heap:
            negc, pair = heapq.heappop(heap)
            c = pair_count.get(pair, 0)
            if c <= 0:
                continue
            if -negc != c:                          # stale entry: re-push the current count
                heapq.heappush(heap, (-c, pair))
                continue
            if c < 2:
                break                               # nothing left that occurs twice
            merges.append(pair)
            a, b = pair
            new = a + b
            touched = set()
            for wi in where.pop(pair, ()):
                syms, f = words[wi], freqs[wi]
                for x, y in zip(syms, syms[1:]):     # remove this word's old pairs
                    pair_count[x, y] -= f
                out, i = [], 0
                while i < len(syms):
                    if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                        out.append(new)
                        i += 2
                    else:
                        out.append(syms[i])
                        i += 1
                words[wi] = out
                for x, y in zip(out, out[1:]):       # add its new pairs
                    pair_count[x, y] += f
                    where[x, y].add(wi)
                    touched.add((x, y))
            pair_count.pop(pair, None)
            for p in touched:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        return cls(chars, merges)

    def _bpe(self, chunk):
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        syms = list(chunk)
        ranks = self.ranks
        while len(syms) > 1:
            best, best_rank = None, None
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            a, b = syms[best], syms[best + 1]
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        stoi, unk = self.stoi, self.stoi[UNK]
        ids = [stoi.get(s, unk) for s in syms]
        if len(self._cache) < 200_000:
            self._cache[chunk] = ids
        return ids

    def encode(self, text):
        out = []
        for chunk in _pretokenize(text):
            out.extend(self._bpe(chunk))
        return np.array(out, dtype=np.int64)

    def decode(self, ids):
        itos = self.itos
        return "".join(itos[i] for i in _token_ids(ids, len(itos)).tolist())

    def to_dict(self):
        return {"type": self.kind, "chars": list(self.chars),
                "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d):
        return cls(d["chars"], d["merges"])


TOKENIZERS = {"char": CharTokenizer, "word": WordTokenizer, "bpe": BPETokenizer}


def tokenizer_from_dict(d):
    """Rebuild a tokenizer from ``to_dict()`` output (checks the type tag)."""
    if not isinstance(d, dict) or d.get("type") not in TOKENIZERS:
        raise ValueError(f"not a fastrnn vocabulary (type {d.get('type') if isinstance(d, dict) else d!r})")
    try:
        return TOKENIZERS[d["type"]].from_dict(d)
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed {d['type']} vocabulary: {e}") from None


def load_tokenizer(path):
    """Load a vocabulary saved with ``tokenizer.save(path)``."""
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON vocabulary ({e})") from None
    return tokenizer_from_dict(d)
