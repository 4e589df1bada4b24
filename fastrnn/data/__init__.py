"""Data for training: tokenisers (character, word, BPE) and truncated-BPTT batching.

The bundled corpus ``tinyshakespeare.txt`` lives here too (see README.md).
"""

from fastrnn.data.tokenizers import (BPETokenizer, CharTokenizer, WordTokenizer,
                                     load_tokenizer, tokenizer_from_dict)
from fastrnn.data.batching import Chunk, TBPTTLoader, batchify, eval_streams

__all__ = ["CharTokenizer", "WordTokenizer", "BPETokenizer", "load_tokenizer",
           "tokenizer_from_dict", "TBPTTLoader", "Chunk", "batchify", "eval_streams"]
