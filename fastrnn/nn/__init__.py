"""Building blocks for training: NumPy arrays in and out, ``forward`` and
``backward`` like the recurrent layers; ``backward`` accumulates into each
parameter's ``.grad`` and returns the gradient of the input.
"""

from fastrnn.nn.init import as_generator
from fastrnn.nn.embedding import Embedding
from fastrnn.nn.linear import Linear
from fastrnn.nn.dropout import Dropout, LockedDropout
from fastrnn.nn.weight_drop import WeightDrop
from fastrnn.nn.container import Sequential, ModuleList
from fastrnn.nn.loss import (CrossEntropyLoss, MSELoss, log_softmax, softmax,
                             softmax_cross_entropy, mse)

__all__ = ["as_generator", "Embedding", "Linear", "Dropout", "LockedDropout", "WeightDrop",
           "Sequential", "ModuleList",
           "CrossEntropyLoss", "MSELoss", "log_softmax", "softmax",
           "softmax_cross_entropy", "mse"]
