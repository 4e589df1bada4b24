"""TEMPORARY: re-exports the NumPy reference until the compiled kernels land."""
from fastrnn.reference import (rnn_forward, rnn_backward, lstm_forward, lstm_backward,  # noqa
                               gru_forward, gru_backward)
