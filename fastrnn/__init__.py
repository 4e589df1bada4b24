"""fastrnn: CPU recurrent networks (RNN, LSTM, GRU) with Cython/OpenMP kernels.

Shape letters used everywhere: T steps, B batch, I input size, H hidden size,
G gates (RNN 1, GRU 3, LSTM 4). Gate orders follow torch.nn: LSTM i, f, g, o;
GRU r, z, n. See docs/DESIGN.md.
"""

__version__ = "0.1.0"

from fastrnn._config import (config, get_num_threads, release_memory, set_num_threads,
                             show_config)
from fastrnn._isa import available_isas, get_isa, set_isa
from fastrnn._precision import get_float32_matmul_precision, set_float32_matmul_precision
from fastrnn import functional, reference
from fastrnn.modules.module import Module, Parameter

# -- layers: RNN/LSTM/GRU modules and cells, persistence
from fastrnn.modules.rnn import RNN, LSTM, GRU
from fastrnn.modules.cells import RNNCell, LSTMCell, GRUCell
from fastrnn.io import save, load, from_torch, to_torch
# -- training blocks: nn, optim, data, the language model
from fastrnn import nn, optim, data
from fastrnn.lm import RNNLanguageModel
# -- interchange: ONNX, Keras, safetensors (onnx/keras are imported only when used)
from fastrnn import onnx
from fastrnn.io import load_weights
from fastrnn.keras import from_keras
from fastrnn.wrappers import Recurrent
# -- inference: quantised copies, stream pools
from fastrnn.quantization import quantize
from fastrnn.streams import StreamPool
