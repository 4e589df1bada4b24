"""Build an ONNX RNN/LSTM/GRU model from torch-layout weights (onnx.helper only).

Gate orders differ between torch (and fastrnn) and ONNX, so weight rows are
reordered block by block (each block is H rows):

    LSTM  torch i, f, g, o   ->  ONNX i, o, f, c   (blocks 0, 3, 1, 2)
    GRU   torch r, z, n      ->  ONNX z, r, h      (blocks 1, 0, 2), with
          linear_before_reset=1, which is torch's form of the GRU
    RNN   one block, activation Tanh (or Relu)

ONNX's ``Y`` is (T, D, B, H); each layer's output is transposed and reshaped to
torch's (T, B, D*H) before it feeds the next layer. The model's outputs are
``Y`` (T, B, D*H), ``Y_h`` (L*D, B, H) and, for LSTM, ``Y_c`` (L*D, B, H): the
same layouts as torch.nn's ``out``, ``h_n``, ``c_n``. With ``with_state=True``
the model also takes ``h0`` (and ``c0``), (L*D, B, H), as inputs.

``single_node=True`` (one unidirectional layer, what a batch-1 step is timed on)
builds the recurrent node alone: its inputs and outputs are the model's, ``Y``
stays ONNX's (T, 1, B, H). The Slice, Transpose, Reshape and Concat nodes around
it cost ONNX Runtime about 4 us a call (27 % of an LSTM H=64 step; session 25's
audit of the benchmark), which a user's own one-layer model would not pay.
"""

import numpy as np

from fastrnn.benchmark.common import GATES

__all__ = ["build_model", "ONNX_GATE_ORDER", "OPSET"]

#: Opset used for the model: LSTM-14, GRU-14 and RNN-14 are current there.
OPSET = 17

#: For each cell, which torch gate block goes to each ONNX gate position.
ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}


def _reorder(a, cell, H):
    """Reorder the G blocks of H rows of a torch weight or bias to ONNX's order."""
    order = ONNX_GATE_ORDER[cell]
    return np.concatenate([a[k * H:(k + 1) * H] for k in order], axis=0)


def build_model(cell, weights, I, H, T, B, layers=1, bidirectional=False,
                dtype=np.float32, with_state=False, single_node=False):
    """An ``onnx.ModelProto`` computing the same function as ``torch.nn.<Cell>``
    with these weights (a dict of torch.nn's parameter names to arrays).

    Shapes are fixed: input ``X`` is (T, B, I). A bias-free layer (no ``bias_*``
    keys) gets no ``B`` input.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    G = GATES[cell]
    D = 2 if bidirectional else 1
    if single_node and (layers != 1 or bidirectional):
        raise ValueError("single_node: one unidirectional layer only")
    elem = TensorProto.FLOAT if np.dtype(dtype) == np.float32 else TensorProto.DOUBLE
    op = {"lstm": "LSTM", "gru": "GRU"}.get(cell, "RNN")
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("X", elem, [T, B, I])]
    if with_state:
        inputs.append(helper.make_tensor_value_info("h0", elem, [layers * D, B, H]))
        if cell == "lstm":
            inputs.append(helper.make_tensor_value_info("c0", elem, [layers * D, B, H]))

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    shape_name = init("reshape_TBD", np.array([0, 0, -1], dtype=np.int64))
    layer_in = "X"
    y_h, y_c = [], []
    for layer in range(layers):
        suffixes = [""] + (["_reverse"] if bidirectional else [])
        names = [f"l{layer}{s}" for s in suffixes]
        W = np.stack([_reorder(weights[f"weight_ih_{n}"], cell, H) for n in names])
        R = np.stack([_reorder(weights[f"weight_hh_{n}"], cell, H) for n in names])
        node_inputs = [layer_in, init(f"W{layer}", W.astype(dtype)),
                       init(f"R{layer}", R.astype(dtype))]
        if f"bias_ih_{names[0]}" in weights:
            Bias = np.stack([np.concatenate([_reorder(weights[f"bias_ih_{n}"], cell, H),
                                             _reorder(weights[f"bias_hh_{n}"], cell, H)])
                             for n in names])
            node_inputs.append(init(f"B{layer}", Bias.astype(dtype)))
        else:
            node_inputs.append("")
        if with_state and single_node:
            node_inputs += ["", "h0"] + (["c0"] if cell == "lstm" else [])
        elif with_state:
            # Slice layer `layer`'s D states out of h0 (and c0).
            starts = init(f"start{layer}", np.array([layer * D], dtype=np.int64))
            ends = init(f"end{layer}", np.array([(layer + 1) * D], dtype=np.int64))
            axes = init(f"axes{layer}", np.array([0], dtype=np.int64))
            nodes.append(helper.make_node("Slice", ["h0", starts, ends, axes], [f"h0_{layer}"]))
            node_inputs += ["", f"h0_{layer}"]  # sequence_lens, initial_h
            if cell == "lstm":
                nodes.append(helper.make_node("Slice", ["c0", starts, ends, axes],
                                              [f"c0_{layer}"]))
                node_inputs.append(f"c0_{layer}")
        attrs = {"hidden_size": H, "direction": "bidirectional" if bidirectional else "forward"}
        if cell == "gru":
            attrs["linear_before_reset"] = 1
        if op == "RNN":
            act = "Relu" if cell == "rnn_relu" else "Tanh"
            attrs["activations"] = [act] * D
        if single_node:   # the node's outputs are the model's
            outs = ["Y", "Y_h"] + (["Y_c"] if cell == "lstm" else [])
            nodes.append(helper.make_node(op, node_inputs, outs, name=op, **attrs))
            break
        outs = [f"Y{layer}", f"Yh{layer}"] + ([f"Yc{layer}"] if cell == "lstm" else [])
        nodes.append(helper.make_node(op, node_inputs, outs, name=f"{op}{layer}", **attrs))
        y_h.append(f"Yh{layer}")
        if cell == "lstm":
            y_c.append(f"Yc{layer}")
        # (T, D, B, H) -> (T, B, D, H) -> (T, B, D*H)
        nodes.append(helper.make_node("Transpose", [f"Y{layer}"], [f"Yt{layer}"],
                                      perm=[0, 2, 1, 3]))
        out_name = "Y" if layer == layers - 1 else f"X{layer + 1}"
        nodes.append(helper.make_node("Reshape", [f"Yt{layer}", shape_name], [out_name]))
        layer_in = out_name

    if single_node:
        outputs = [helper.make_tensor_value_info("Y", elem, [T, 1, B, H]),
                   helper.make_tensor_value_info("Y_h", elem, [1, B, H])]
        if cell == "lstm":
            outputs.append(helper.make_tensor_value_info("Y_c", elem, [1, B, H]))
    else:
        nodes.append(helper.make_node("Concat", y_h, ["Y_h"], axis=0))
        outputs = [helper.make_tensor_value_info("Y", elem, [T, B, D * H]),
                   helper.make_tensor_value_info("Y_h", elem, [layers * D, B, H])]
        if cell == "lstm":
            nodes.append(helper.make_node("Concat", y_c, ["Y_c"], axis=0))
            outputs.append(helper.make_tensor_value_info("Y_c", elem, [layers * D, B, H]))
    graph = helper.make_graph(nodes, f"fastrnn_{cell}", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fastrnn.benchmark")
    model.ir_version = 8  # opset 17 needs IR >= 8; old enough for any current runtime
    onnx.checker.check_model(model)
    return model
