"""ONNX export and import (optional extra ``fastrnn[onnx]``: the ``onnx`` package).

    fastrnn.onnx.export(model, "model.onnx", opset=17)   # RNN/LSTM/GRU, Linear, Embedding,
                                                         # Sequential, RNNLanguageModel
    model = fastrnn.onnx.load("model.onnx")              # a fastrnn module
    outs = fastrnn.onnx.run(model, feeds)                # same feeds/outputs as ONNX Runtime

Gate orders: ONNX LSTM i, o, f, c and torch/fastrnn i, f, g, o; ONNX GRU z, r, h
and fastrnn r, z, n (fastrnn's GRU is ONNX's ``linear_before_reset=1``; with
``reset_after=False``, ONNX's default ``linear_before_reset=0``). Weight
blocks are reordered, never recomputed, so an export/import round trip gives
the same bits.

The exported graph (time-major inside, as ONNX's RNN operators are):

    input (T,B,I) | (B,T,I) -[Transpose]-> per layer: LSTM/GRU/RNN node
      -> Y (T,D,B,H) -Transpose(0,2,1,3)-> Reshape(0,0,-1) (concat) | ReduceSum(axis 1) (sum)
    outputs: "output", "h_n" (L·D,B,H) = Concat of the nodes' Y_h, "c_n" (LSTM)
    optional inputs (export flags): "h0"/"c0" (L·D,B,H), "lengths" (B,) int32 as sequence_lens

Dimension names "T" and "B" are symbolic: any batch and sequence length run.
Not expressible with ONNX's recurrent operators, and refused with a ValueError:
LSTM ``proj_size``. The identity RNN exports as ONNX's ``Affine`` activation
(alpha 1, beta 0), ``merge_mode='sum'`` as a ReduceSum over the direction axis.
Dropout is an inference no-op in the exported graph (eval-mode semantics).

`load` reads a graph that is a chain: [Gather embedding] -> LSTM/GRU/RNN nodes
-> [MatMul+Add | Gemm linear head], with the glue exporters put around them
(Transpose, Squeeze/Unsqueeze, Reshape, Concat, Slice, Gather, Shape, Constant,
ConstantOfShape, Identity, Cast). It interprets the graph symbolically -- every
tensor is tracked as a constant, a shape, a zero state or the sequence in a
known axis layout -- and refuses anything it cannot run exactly with a
ValueError naming the node, its op and the attribute or input. Nothing in the
file is executed. It returns:

- a fastrnn ``RNN``/``LSTM``/``GRU`` when the graph is one recurrent stack;
- an ``RNNLanguageModel`` for embedding -> unidirectional stack -> linear
  decoder, time-major (what `export` writes for one);
- otherwise a ``fastrnn.nn.Sequential`` of Embedding / Recurrent(rnn) / Linear.

The returned module carries ``onnx_signature``: which graph input is the
sequence, the lengths and the initial states, and what each graph output is
(see `run`).
"""

import math
import os

import numpy as np

from fastrnn._atomic import replacing
from fastrnn.modules.module import Module
from fastrnn.modules.rnn import GRU, LSTM, RNN, RNNBase
from fastrnn.nn import Dropout, Embedding, Linear, Sequential
from fastrnn.wrappers import Recurrent

__all__ = ["export", "load", "run", "DEFAULT_OPSET", "MIN_OPSET"]

DEFAULT_OPSET = 17
MIN_OPSET = 14          # LSTM-14 / GRU-14 / RNN-14, ReduceSum with axes as an input
FOLD_MAX_VALUES = 1 << 24   # largest constant a load computes from other constants

# torch block k comes from ONNX block _TO_TORCH[cell][k]; and the inverse
_TO_TORCH = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
_TO_ONNX = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("fastrnn.onnx needs the onnx package, which is not installed "
                          "(pip install 'fastrnn[onnx]' or pip install onnx)") from e
    return onnx


def _blocks(a, order, H):
    """Reorder the gate blocks (H rows each) of axis 0 of `a`."""
    return np.concatenate([a[k * H:(k + 1) * H] for k in order], axis=0)


# =============================================================================
# export
# =============================================================================
class _Builder:
    def __init__(self, onnx, dtype):
        from onnx import TensorProto
        self.onnx = onnx
        self.h = onnx.helper
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.elem = {np.dtype(np.float32): TensorProto.FLOAT,
                     np.dtype(np.float64): TensorProto.DOUBLE}[np.dtype(dtype)]
        self.dtype = np.dtype(dtype)
        self._n = 0

    def name(self, base):
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base, array):
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, n_out=1, base=None, out=None, **attrs):
        base = base or op
        outs = out if out is not None else [self.name(base) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs if n_out > 1 else outs[0]

    def add_input(self, name, elem, dims):
        self.inputs.append(self.h.make_tensor_value_info(name, elem, dims))
        return name

    def add_output(self, src, name, elem, dims):
        self.node("Identity", [src], out=[name])
        self.outputs.append(self.h.make_tensor_value_info(name, elem, dims))


def _check_exportable_rnn(rnn, where):
    if rnn.proj_size:
        raise ValueError(f"export: {where}: LSTM proj_size={rnn.proj_size} cannot be expressed "
                         f"with ONNX's LSTM operator (it has no projection); not exported")


def _export_stack(b, rnn, x, h0, c0, lens):
    """Emit the nodes of a (time-major) stack. x: (T,B,I). -> out (T,B,F), [Y_h], [Y_c]."""
    op = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN"}[rnn.mode]
    H, D, G = rnn.hidden_size, rnn.num_directions, _GATES[rnn.mode]
    order = _TO_ONNX[op]
    sfx = ["", "_reverse"][:D]
    hs, cs = [], []
    for k in range(rnn.num_layers):
        names = [f"_l{k}{s}" for s in sfx]
        sd = {n: getattr(rnn, n).data for n in rnn._param_names[k * D]
              + (rnn._param_names[k * D + 1] if D == 2 else [])}
        W = np.stack([_blocks(sd["weight_ih" + n], order, H) for n in names])  # (D, G·H, in)
        R = np.stack([_blocks(sd["weight_hh" + n], order, H) for n in names])  # (D, G·H, H)
        ins = [x, b.const(f"W{k}", W), b.const(f"R{k}", R)]
        if rnn.bias:
            Bi = np.stack([np.concatenate([_blocks(sd["bias_ih" + n], order, H),
                                           _blocks(sd["bias_hh" + n], order, H)])
                           for n in names])                                    # (D, 2·G·H)
            ins.append(b.const(f"B{k}", Bi))
        else:
            ins.append("")
        ins.append(lens or "")
        states = []
        for s in ([h0, c0] if op == "LSTM" else [h0]):
            if s is None:
                states.append("")
            elif rnn.num_layers == 1:
                states.append(s)
            else:
                states.append(b.node("Slice", [s, b.const("start", np.array([k * D], np.int64)),
                                               b.const("end", np.array([(k + 1) * D], np.int64)),
                                               b.const("axes", np.array([0], np.int64))]))
        ins += states
        while ins and ins[-1] == "":
            ins.pop()
        attrs = dict(hidden_size=H, direction="bidirectional" if D == 2 else "forward")
        if op == "GRU":
            attrs["linear_before_reset"] = 1 if rnn.reset_after else 0
        if op == "RNN":
            if rnn.nonlinearity == "identity":
                attrs.update(activations=["Affine"] * D, activation_alpha=[1.0] * D,
                             activation_beta=[0.0] * D)
            else:
                attrs["activations"] = [rnn.nonlinearity.capitalize()] * D
        outs = b.node(op, ins, n_out=3 if op == "LSTM" else 2, base=f"{op}{k}", **attrs)
        y = outs[0]                                                        # (T, D, B, H)
        hs.append(outs[1])
        if op == "LSTM":
            cs.append(outs[2])
        if rnn.merge_mode == "sum" and D == 2:
            x = b.node("ReduceSum", [y, b.const("axes", np.array([1], np.int64))], keepdims=0)
        else:
            yt = b.node("Transpose", [y], perm=[0, 2, 1, 3])                # (T, B, D, H)
            x = b.node("Reshape", [yt, b.const("shape", np.array([0, 0, -1], np.int64))])
    return x, hs, cs


def _seq_dims(batch_first, rest):
    return (["B", "T"] if batch_first else ["T", "B"]) + list(rest)


def export(model, path, opset=DEFAULT_OPSET, *, initial_state=False, lengths=False):
    """Write `model` to `path` as an ONNX file; returns the path.

    model: a fastrnn RNN/LSTM/GRU (any layers, bidirectional, batch_first,
        bias or not, merge_mode 'concat' or 'sum'; not proj_size), Linear,
        Embedding, Sequential of these (recurrent layers wrapped in
        `fastrnn.wrappers.Recurrent`, Dropout skipped), or RNNLanguageModel.
    opset: ONNX opset of the default domain, from MIN_OPSET (14) to what the
        installed onnx package knows.
    initial_state: (recurrent layers, RNNLanguageModel) add inputs "h0" (and
        "c0"), (L·D, B, H), for the initial state; without it the state starts
        at zero.
    lengths: (recurrent layers) add an input "lengths", (B,) int32, fed to the
        operators as sequence_lens: fastrnn's `lengths` argument.
    The file passes onnx.checker.check_model(full_check=True) (checked here).
    """
    onnx = _onnx()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"export: opset must be an integer, got {opset!r}")
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise ValueError(f"export: opset must be in [{MIN_OPSET}, {top}] (the installed onnx "
                         f"knows up to {top}), got {opset}")
    if not isinstance(model, Module):
        raise TypeError(f"export: model must be a fastrnn Module, got {type(model).__name__}")
    from fastrnn.lm import RNNLanguageModel

    dtype = _model_dtype(model)
    b = _Builder(onnx, dtype)
    elem = b.elem
    I64, I32 = onnx.TensorProto.INT64, onnx.TensorProto.INT32
    if (initial_state or lengths) and not isinstance(model, (RNNBase, RNNLanguageModel)):
        raise ValueError(f"export: initial_state/lengths apply to recurrent layers and "
                         f"RNNLanguageModel, not {type(model).__name__}")
    if lengths and not isinstance(model, RNNBase):
        raise ValueError("export: lengths=True is supported for a bare RNN/LSTM/GRU only")

    if isinstance(model, RNNBase):
        _check_exportable_rnn(model, type(model).__name__)
        L, D, H = model.num_layers, model.num_directions, model.hidden_size
        x = b.add_input("input", elem, _seq_dims(model.batch_first, [model.input_size]))
        h0 = c0 = lens = None
        if lengths:
            lens = b.add_input("lengths", I32, ["B"])
        if initial_state:
            h0 = b.add_input("h0", elem, [L * D, "B", H])
            if model.mode == "LSTM":
                c0 = b.add_input("c0", elem, [L * D, "B", H])
        if model.batch_first:
            x = b.node("Transpose", [x], perm=[1, 0, 2])
        out, hs, cs = _export_stack(b, model, x, h0, c0, lens)
        if model.batch_first:
            out = b.node("Transpose", [out], perm=[1, 0, 2])
        b.add_output(out, "output", elem, _seq_dims(model.batch_first, [model.output_size]))
        b.add_output(b.node("Concat", hs, axis=0), "h_n", elem, [L * D, "B", H])
        if cs:
            b.add_output(b.node("Concat", cs, axis=0), "c_n", elem, [L * D, "B", H])
    elif isinstance(model, RNNLanguageModel):
        rnn = model.rnn
        L, H = rnn.num_layers, rnn.hidden_size
        x = b.add_input("input", I64, ["T", "B"])
        h0 = c0 = None
        if initial_state:
            h0 = b.add_input("h0", elem, [L, "B", H])
            if rnn.mode == "LSTM":
                c0 = b.add_input("c0", elem, [L, "B", H])
        x = _export_embedding(b, model.encoder, x)
        x, hs, cs = _export_stack(b, rnn, x, h0, c0, None)
        x = _export_linear(b, model.decoder, x)
        b.add_output(x, "logits", elem, ["T", "B", model.vocab_size])
        b.add_output(b.node("Concat", hs, axis=0), "h_n", elem, [L, "B", H])
        if cs:
            b.add_output(b.node("Concat", cs, axis=0), "c_n", elem, [L, "B", H])
    else:
        steps = list(model) if isinstance(model, Sequential) else [model]
        steps = [m for m in steps if not isinstance(m, Dropout)]
        if not steps:
            raise ValueError("export: the Sequential has no layers to export")
        first = steps[0]
        if isinstance(first, Embedding):
            x = b.add_input("input", I64, ["N0", "N1"])
            rank = 3
        elif isinstance(first, Linear):
            x = b.add_input("input", elem, ["N0", "N1", first.in_features])
            rank = 3
        elif isinstance(first, Recurrent):
            x = b.add_input("input", elem, _seq_dims(first.rnn.batch_first,
                                                     [first.rnn.input_size]))
            rank = 3
        elif isinstance(first, RNNBase):
            raise TypeError(f"export: Sequential step 0: a bare {type(first).__name__} returns "
                            f"(out, state) and cannot run inside a Sequential; wrap it as "
                            f"fastrnn.wrappers.Recurrent(layer)")
        else:
            raise TypeError(f"export: cannot export {type(first).__name__}; expected "
                            f"RNN/LSTM/GRU, Linear, Embedding, Sequential or RNNLanguageModel")
        layout = None      # "TB" / "BT" once a recurrent layer fixes it
        for i, m in enumerate(steps):
            where = f"Sequential step {i} ({type(m).__name__})"
            if isinstance(m, Embedding):
                if i:
                    raise ValueError(f"export: {where}: an Embedding must come first")
                x = _export_embedding(b, m, x)
            elif isinstance(m, Linear):
                x = _export_linear(b, m, x)
            elif isinstance(m, Recurrent):
                rnn = m.rnn
                _check_exportable_rnn(rnn, where)
                if not m.return_sequences or m.return_state or m.go_backwards:
                    raise ValueError(f"export: {where}: only return_sequences=True without "
                                     f"return_state/go_backwards is exported")
                lay = "BT" if rnn.batch_first else "TB"
                if layout not in (None, lay):
                    raise ValueError(f"export: {where}: batch_first={rnn.batch_first} differs "
                                     f"from the previous recurrent layer's")
                layout = lay
                if rnn.batch_first:
                    x = b.node("Transpose", [x], perm=[1, 0, 2])
                x, _, _ = _export_stack(b, rnn, x, None, None, None)
                if rnn.batch_first:
                    x = b.node("Transpose", [x], perm=[1, 0, 2])
            elif isinstance(m, RNNBase):
                raise TypeError(f"export: {where}: a bare {type(m).__name__} returns (out, state) "
                                f"and cannot run inside a Sequential; wrap it as "
                                f"fastrnn.wrappers.Recurrent(layer)")
            else:
                raise TypeError(f"export: {where}: cannot export {type(m).__name__}")
        out_features = _features_of(steps[-1])
        names = {"TB": ["T", "B"], "BT": ["B", "T"], None: ["N0", "N1"]}[layout]
        b.add_output(x, "output", elem, names[:rank - 1] + [out_features])
        if layout is not None:  # give the input the same names
            b.inputs[0] = _rename_dims(onnx, b.inputs[0], {"N0": names[0], "N1": names[1]})

    graph = b.h.make_graph(b.nodes, f"fastrnn_{type(model).__name__}", b.inputs, b.outputs,
                           initializer=b.inits)
    opsets = [b.h.make_opsetid("", int(opset))]
    m = b.h.make_model(graph, opset_imports=opsets, producer_name="fastrnn",
                       ir_version=b.h.find_min_ir_version_for(opsets))
    onnx.checker.check_model(m, full_check=True)
    path = os.fspath(path)
    with replacing(path) as tmp:
        onnx.save_model(m, tmp)
    return path


def _rename_dims(onnx, vi, mapping):
    for d in vi.type.tensor_type.shape.dim:
        if d.dim_param in mapping:
            d.dim_param = mapping[d.dim_param]
    return vi


def _features_of(m):
    if isinstance(m, Embedding):
        return m.embedding_dim
    if isinstance(m, Linear):
        return m.out_features
    return m.rnn.output_size


def _model_dtype(model):
    params = model.parameters()
    if not params:
        raise ValueError(f"export: {type(model).__name__} has no parameters")
    dt = params[0].dtype
    if dt not in (np.float32, np.float64):
        raise ValueError(f"export: parameters must be float32 or float64, got {dt}")
    bad = [n for n, p in model.named_parameters() if p.dtype != dt]
    if bad:
        raise ValueError(f"export: all parameters must share one dtype ({dt}); differ: {bad}")
    return dt


def _export_embedding(b, m, ids):
    return b.node("Gather", [b.const("embedding", m.weight.data), ids], axis=0)


def _export_linear(b, m, x):
    y = b.node("MatMul", [x, b.const("weight_t", np.ascontiguousarray(m.weight.data.T))])
    if m.bias is not None:
        y = b.node("Add", [y, b.const("bias", m.bias.data)])
    return y


# =============================================================================
# import: symbolic interpretation of the graph
# =============================================================================
class _Shape:
    """A shape vector (or scalar) with symbolic entries: ints or axis labels."""

    def __init__(self, items, scalar=False):
        self.items, self.scalar = list(items), scalar


class _Zeros:
    """A zero tensor of a (possibly symbolic) shape (ConstantOfShape of 0)."""

    def __init__(self, shape):
        self.shape = list(shape)


class _Seq:
    """The data flowing along the chain: output of stage `stage` (-1 = a graph
    input), axes labelled T, B, F (features), D (directions), H (hidden), or
    placeholders "X0"/"X1" of a graph input not yet bound to T/B."""

    def __init__(self, stage, axes, sizes, merge=None):
        self.stage, self.axes, self.sizes, self.merge = stage, tuple(axes), dict(sizes), merge


class _State:
    """Y_h / Y_c of recurrent nodes (list of node stage indices, concatenated on axis 0)."""

    def __init__(self, kind, stages):
        self.kind, self.stages = kind, list(stages)


class _StateIn:
    """A graph input initial state, rows [lo, hi) of axis 0."""

    def __init__(self, name, lo, hi, total):
        self.name, self.lo, self.hi, self.total = name, lo, hi, total


class _LengthsIn:
    def __init__(self, name):
        self.name = name


_GLUE = {"Transpose", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Slice", "Gather",
         "Shape", "Constant", "ConstantOfShape", "Identity", "Cast", "Gemm", "MatMul", "Add",
         "ReduceSum", "Dropout", "LSTM", "GRU", "RNN", "Sub", "Mul", "Div", "Expand"}


class _Loader:
    def __init__(self, model, path):
        onnx = _onnx()
        self.onnx = onnx
        self.nh = onnx.numpy_helper
        self.path = path
        self.graph = model.graph
        self.opset = None
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                self.opset = o.version
            elif any(n.domain == o.domain for n in self.graph.node):
                raise self.fail(f"operator set domain {o.domain!r} is not supported")
        if self.opset is None:
            raise self.fail("no default-domain opset import")
        self.vals = {}
        self.stages = []           # dicts describing the chain, in order
        self.bind = {}             # placeholder label -> "T" / "B"
        self.input_roles = {}      # graph input name -> role
        self.input_seq = None      # the sequence input as first read by a layer

    def fail(self, why, node=None, attr=None):
        where = ""
        if node is not None:
            where = f"node {node.name or '(unnamed)'!r} (op {node.op_type}"
            where += f", attribute {attr!r}): " if attr else "): "
        return ValueError(f"fastrnn.onnx.load({self.path!r}): {where}{why}")

    # -- helpers ---------------------------------------------------------------
    def fold_size(self, node, shape):
        """Refuse to fold a constant of more than FOLD_MAX_VALUES values (a model of a
        few bytes could otherwise ask for gigabytes). Called, before computing, by the
        folds whose result can be larger than their inputs (ConstantOfShape, MatMul,
        broadcasting arithmetic, Gather, Concat); the others keep or shrink sizes."""
        n = math.prod(int(s) for s in shape)
        if n > FOLD_MAX_VALUES:
            raise self.fail(f"a constant of shape {list(shape)} ({n} values; at most "
                            f"{FOLD_MAX_VALUES} are folded)", node)

    def attrs(self, node):
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def val(self, node, i):
        if i >= len(node.input) or node.input[i] == "":
            return None
        name = node.input[i]
        if name not in self.vals:
            raise self.fail(f"input {name!r} is not produced by any earlier node", node)
        return self.vals[name]

    def const(self, node, i, what):
        v = self.val(node, i)
        if not isinstance(v, np.ndarray):
            raise self.fail(f"{what} (input {i}) must be a constant, got {_kind(v)}", node)
        return v

    def resolve(self, label):
        return self.bind.get(label, label)

    def axes(self, seq):
        return tuple(self.resolve(a) for a in seq.axes)

    def set_bind(self, label, to, node):
        label = self.resolve(label)
        if label == to:
            return
        if label in ("X0", "X1"):
            self.bind[label] = to
            other = "X1" if label == "X0" else "X0"
            if other not in self.bind:
                self.bind[other] = "B" if to == "T" else "T"
            return
        raise self.fail(f"expected the input's axis {to} here, got axis {label}", node)

    # -- main ----------------------------------------------------------------------
    def run(self):
        g = self.graph
        for t in g.initializer:
            self.vals[t.name] = self.nh.to_array(t)
        init_names = set(self.vals)
        for vi in g.input:
            if vi.name in init_names:
                continue        # an initializer listed as input (old IR): a constant
            self.vals[vi.name] = self.graph_input(vi)
        for node in g.node:
            self.step(node)
        return self.build()

    def graph_input(self, vi):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        et = tt.elem_type
        T = self.onnx.TensorProto
        if et in (T.FLOAT, T.DOUBLE):
            if len(dims) != 3:
                raise self.fail(f"graph input {vi.name!r}: expected a rank-3 float input, "
                                f"got rank {len(dims)}")
            return _GraphIn(vi.name, "float", dims)
        if et in (T.INT64, T.INT32):
            return _GraphIn(vi.name, "int", dims)
        raise self.fail(f"graph input {vi.name!r}: unsupported element type "
                        f"{T.DataType.Name(et)}")

    def step(self, node):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise self.fail(f"operator domain {node.domain!r} is not supported", node)
        if op not in _GLUE:
            raise self.fail(f"unsupported operator {op}; fastrnn.onnx.load reads chains of "
                            f"LSTM/GRU/RNN nodes with embedding (Gather), linear "
                            f"(MatMul/Add/Gemm) and shape glue", node)
        a = self.attrs(node)
        ins = [self.val(node, i) for i in range(len(node.input))]
        if op in ("LSTM", "GRU", "RNN"):
            outs = self.recurrent(node, a, ins)
        elif op == "Constant":
            outs = [self.constant(node, a)]
        elif all(isinstance(v, np.ndarray) or v is None for v in ins) and op != "Dropout":
            outs = [self.const_eval(node, op, a, ins)]
        else:
            outs = getattr(self, "op_" + op, self.op_other)(node, a, ins)
        for name, v in zip(node.output, outs):
            if name:
                self.vals[name] = v

    # -- constants -----------------------------------------------------------------
    def constant(self, node, a):
        if "value" in a:
            return self.nh.to_array(a["value"])
        for k, dt in (("value_float", np.float32), ("value_floats", np.float32),
                      ("value_int", np.int64), ("value_ints", np.int64)):
            if k in a:
                return np.array(a[k], dt)
        raise self.fail(f"unsupported Constant attribute(s) {sorted(a)}", node)

    def axes_arg(self, node, a, ins, idx):
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(ins) > idx and ins[idx] is not None:
            return [int(v) for v in self.const(node, idx, "axes").reshape(-1)]
        return None

    def const_eval(self, node, op, a, ins):
        x = ins[0] if ins else None
        try:
            if op == "Identity" or op == "Dropout":
                return x
            if op == "Cast":
                return x.astype(self.onnx.helper.tensor_dtype_to_np_dtype(a["to"]))
            if op == "Transpose":
                return np.transpose(x, a.get("perm"))
            if op == "Unsqueeze":
                axes = self.axes_arg(node, a, ins, 1)
                r = x.ndim + len(axes)
                for ax in sorted(v % r for v in axes):
                    x = np.expand_dims(x, ax)
                return x
            if op == "Squeeze":
                axes = self.axes_arg(node, a, ins, 1)
                return np.squeeze(x, axis=None if axes is None else tuple(axes))
            if op == "Concat":
                self.fold_size(node, (sum(np.size(v) for v in ins if v is not None),))
                return np.concatenate([v for v in ins if v is not None], axis=a["axis"])
            if op == "Reshape":
                shape = [int(s) for s in ins[1]]
                if not a.get("allowzero", 0):
                    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
                return x.reshape(shape)
            if op == "Slice":
                starts, ends, axes, steps = self.slice_args(node, a, ins)
                sl = [slice(None)] * x.ndim
                for s, e, ax, st in zip(starts, ends, axes, steps):
                    sl[ax] = slice(s, e, st)
                return x[tuple(sl)]
            if op == "Gather":
                ax = a.get("axis", 0) % max(x.ndim, 1)
                self.fold_size(node, x.shape[:ax] + np.shape(ins[1]) + x.shape[ax + 1:])
                return np.take(x, ins[1], axis=a.get("axis", 0))
            if op == "Shape":
                return np.array(x.shape, np.int64)
            if op == "ConstantOfShape":
                v = self.nh.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
                self.fold_size(node, [int(s) for s in x])
                return np.full([int(s) for s in x], v.reshape(-1)[0], v.dtype)
            if op == "Expand":   # torch's zero initial state when every shape is fixed
                shape = np.broadcast_shapes(x.shape, tuple(int(s) for s in ins[1].reshape(-1)))
                self.fold_size(node, shape)
                return np.array(np.broadcast_to(x, shape))
            if op in ("Add", "Sub", "Mul", "Div"):
                self.fold_size(node, np.broadcast_shapes(ins[0].shape, ins[1].shape))
                f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}.get(op)
                if f is None:
                    return (ins[0] // ins[1] if ins[0].dtype.kind in "iu"
                            else ins[0] / ins[1])
                return f(ins[0], ins[1])
            if op == "MatMul":
                self.fold_size(node, np.broadcast_shapes(ins[0].shape[:-2], ins[1].shape[:-2])
                               + ins[0].shape[-2:-1] + ins[1].shape[-1:])
                return ins[0] @ ins[1]
            if op == "ReduceSum":
                axes = self.axes_arg(node, a, ins, 1)
                return np.sum(x, axis=None if axes is None else tuple(axes),
                              keepdims=bool(a.get("keepdims", 1)))
        except ValueError:
            raise
        except Exception as e:
            raise self.fail(f"cannot evaluate on constants ({type(e).__name__}: {e})", node)
        raise self.fail("not supported on constant inputs", node)

    def slice_args(self, node, a, ins):
        if "starts" in a:          # opset < 10
            starts, ends = list(a["starts"]), list(a["ends"])
            axes = list(a.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = [int(v) for v in self.const(node, 1, "starts").reshape(-1)]
            ends = [int(v) for v in self.const(node, 2, "ends").reshape(-1)]
            axes = ([int(v) for v in self.const(node, 3, "axes").reshape(-1)]
                    if len(ins) > 3 and ins[3] is not None else list(range(len(starts))))
            steps = ([int(v) for v in self.const(node, 4, "steps").reshape(-1)]
                     if len(ins) > 4 and ins[4] is not None else [1] * len(starts))
        return starts, ends, axes, steps

    # -- symbolic ops ------------------------------------------------------------------
    def op_other(self, node, a, ins):
        kinds = ", ".join(_kind(v) for v in ins)
        raise self.fail(f"not supported on these inputs ({kinds})", node)

    def as_seq(self, node, v):
        """Graph inputs become sequences on first use as data."""
        if isinstance(v, _GraphIn):
            return self.input_as_seq(node, v)
        return v

    def input_as_seq(self, node, gi):
        role = self.input_roles.get(gi.name)
        if role not in (None, "x"):
            raise self.fail(f"graph input {gi.name!r} is used both as {role} and as the "
                            f"sequence", node)
        others = [n for n, r in self.input_roles.items() if r == "x" and n != gi.name]
        if others:
            raise self.fail(f"two graph inputs feed the chain ({others[0]!r}, {gi.name!r})", node)
        self.input_roles[gi.name] = "x"
        if gi.kind == "int":
            if len(gi.dims) != 2:
                raise self.fail(f"graph input {gi.name!r}: token ids must be rank 2, got "
                                f"rank {len(gi.dims)}", node)
            seq = _Seq(-1, ("X0", "X1"), {}, None)
        else:
            seq = _Seq(-1, ("X0", "X1", "F"), {"F": gi.dims[2]}, None)
        self.input_seq = seq
        return seq

    def op_Identity(self, node, a, ins):
        return [ins[0]]

    op_Dropout = op_Identity

    def op_Cast(self, node, a, ins):
        v = ins[0]
        if isinstance(v, _Shape):
            return [v]
        raise self.fail("Cast of non-constant data is not supported", node, "to")

    def op_Shape(self, node, a, ins):
        v = self.as_seq(node, ins[0])
        if isinstance(v, _Seq):
            items = [v.sizes.get(ax, ax) if ax in ("F", "D", "H") else ax for ax in v.axes]
            items = [it if it is not None else "F?" for it in items]
            s, e = a.get("start", 0), a.get("end", None)
            return [_Shape(items[s:e])]
        return self.op_other(node, a, ins)

    def op_Gather(self, node, a, ins):
        data, idx = ins[0], ins[1] if len(ins) > 1 else None
        axis = a.get("axis", 0)
        if isinstance(data, _Shape) and isinstance(idx, np.ndarray):
            items = np.array(data.items, dtype=object)[idx]
            if idx.ndim == 0:
                return [_Shape([items], scalar=True)]
            return [_Shape(list(items))]
        if isinstance(data, np.ndarray) and isinstance(idx, (_GraphIn, _Seq)):
            seq = self.as_seq(node, idx)
            if axis != 0 or data.ndim != 2:
                raise self.fail(f"an embedding Gather needs a 2-D table and axis=0, got "
                                f"{data.ndim}-D and axis={axis}", node, "axis")
            if seq.stage != -1 or "F" in seq.axes:
                raise self.fail("an embedding lookup must read the graph's token-id input", node)
            self.new_stage(node, dict(kind="embedding", weight=data), seq)
            return [_Seq(len(self.stages) - 1, seq.axes + ("F",), {"F": data.shape[1]})]
        return self.op_other(node, a, ins)

    def op_Unsqueeze(self, node, a, ins):
        v = ins[0]
        axes = self.axes_arg(node, a, ins, 1)
        if isinstance(v, _Shape) and v.scalar and axes == [0]:
            return [_Shape(v.items)]
        return self.op_other(node, a, ins)

    def op_Squeeze(self, node, a, ins):
        v = self.as_seq(node, ins[0])
        axes = self.axes_arg(node, a, ins, 1)
        if isinstance(v, _Seq):
            if axes is None:
                raise self.fail("Squeeze without axes is not supported", node, "axes")
            r = len(v.axes)
            axes = sorted(ax % r for ax in axes)
            for ax in axes:
                if v.axes[ax] != "D" or v.sizes.get("D") != 1:
                    raise self.fail(f"can only squeeze the direction axis of a unidirectional "
                                    f"output, not axis {ax} ({v.axes[ax]})", node, "axes")
            new = tuple(x for i, x in enumerate(v.axes) if i not in axes)
            return [self.merge_dh(v, new, "concat")]
        if isinstance(v, _State):
            raise self.fail("squeezing a final state is not supported", node)
        return self.op_other(node, a, ins)

    def merge_dh(self, v, axes, merge):
        """A sequence whose (D, H) became F."""
        axes = tuple("F" if x == "H" else x for x in axes)
        D = v.sizes.get("D", 1)
        F = v.sizes["H"] * (D if merge == "concat" else 1)
        return _Seq(v.stage, axes, {"F": F}, merge=merge)

    def op_Concat(self, node, a, ins):
        if all(isinstance(v, (_Shape, np.ndarray)) for v in ins):
            items = []
            for v in ins:
                items += v.items if isinstance(v, _Shape) else [int(s) for s in v.reshape(-1)]
            return [_Shape(items)]
        if all(isinstance(v, _State) for v in ins) and len({v.kind for v in ins}) == 1:
            if a.get("axis", 0) != 0:
                raise self.fail("final states concatenate on axis 0 only", node, "axis")
            return [_State(ins[0].kind, [s for v in ins for s in v.stages])]
        return self.op_other(node, a, ins)

    def op_ConstantOfShape(self, node, a, ins):
        v = self.nh.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        if np.any(v != 0):
            raise self.fail("only a zero-filled ConstantOfShape is supported", node, "value")
        if isinstance(ins[0], _Shape):
            return [_Zeros(ins[0].items)]
        return self.op_other(node, a, ins)

    def op_Expand(self, node, a, ins):
        """Zeros expanded to a shape read from the input (torch's export of a zero
        initial state when every axis is fixed): a zero state of that shape."""
        x, shape = ins[0], ins[1]
        if not (isinstance(x, np.ndarray) and not np.any(x) and isinstance(shape, _Shape)):
            return self.op_other(node, a, ins)
        items = list(shape.items)
        dims = [1] * (len(items) - x.ndim) + list(x.shape)
        if len(dims) > len(items):
            items = [1] * (len(dims) - len(items)) + items
        out = []
        for d, s in zip(dims, items):   # broadcasting, a symbolic size taken where d == 1
            if d != 1 and not (s == 1 or s == d or not isinstance(s, int)):
                raise self.fail(f"Expand of shape {x.shape} to {shape.items}", node)
            out.append(s if d == 1 else d)
        return [_Zeros(out)]

    def op_Slice(self, node, a, ins):
        v = ins[0]
        starts, ends, axes, steps = self.slice_args(node, a, ins)
        if isinstance(v, (_Zeros, _GraphIn, _Shape)) and len(starts) == 1 and steps == [1]:
            ax, s, e = axes[0], starts[0], ends[0]
            if isinstance(v, _Shape):
                return [_Shape(v.items[s:e])]
            if ax != 0:
                raise self.fail("an initial state is sliced on axis 0 only", node, "axes")
            if isinstance(v, _Zeros):
                n = v.shape[0]
                if not isinstance(n, int):
                    raise self.fail("slice of a zero state with a symbolic first axis", node)
                return [_Zeros([len(range(n)[s:e])] + v.shape[1:])]
            n = v.dims[0]
            if n is None:
                raise self.fail(f"initial-state input {v.name!r} needs a fixed first axis", node)
            r = range(n)[s:e]
            return [_StateIn(v.name, r.start, r.stop, n)]
        return self.op_other(node, a, ins)

    def op_Transpose(self, node, a, ins):
        v = self.as_seq(node, ins[0])
        if isinstance(v, _Seq):
            perm = a.get("perm", list(reversed(range(len(v.axes)))))
            return [_Seq(v.stage, [v.axes[p] for p in perm], v.sizes, v.merge)]
        return self.op_other(node, a, ins)

    def op_Reshape(self, node, a, ins):
        v = self.as_seq(node, ins[0])
        shape = ins[1]
        if isinstance(v, _Seq) and isinstance(shape, (np.ndarray, _Shape)):
            items = shape.items if isinstance(shape, _Shape) else [int(s) for s in shape]
            ax = v.axes
            if len(ax) == 4 and ax[2:] == ("D", "H") and len(items) == 3:
                F = v.sizes["D"] * v.sizes["H"]
                keep = all((it == 0 and not a.get("allowzero", 0))
                           or (isinstance(it, str) and self.resolve(it) == self.resolve(ax[i]))
                           for i, it in enumerate(items[:2]))
                if keep and items[2] in (-1, F):
                    return [self.merge_dh(v, ax[:2] + ("H",), "concat")]
            raise self.fail(f"reshape of the sequence from axes {self.axes(v)} to {items} is "
                            f"not supported (only merging directions and hidden units)", node)
        return self.op_other(node, a, ins)

    def op_ReduceSum(self, node, a, ins):
        v = self.as_seq(node, ins[0])
        axes = self.axes_arg(node, a, ins, 1)
        if isinstance(v, _Seq) and axes is not None and len(axes) == 1:
            ax = axes[0] % len(v.axes)
            if v.axes[ax] == "D" and not a.get("keepdims", 1):
                return [self.merge_dh(v, tuple(x for i, x in enumerate(v.axes) if i != ax),
                                      "sum")]
        raise self.fail("only a sum over the direction axis (keepdims=0) is supported", node,
                        "axes")

    def op_MatMul(self, node, a, ins):
        x, w = self.as_seq(node, ins[0]), ins[1]
        if isinstance(x, _Seq) and isinstance(w, np.ndarray) and x.axes[-1:] == ("F",):
            if w.ndim != 2 or w.shape[0] != x.sizes["F"]:
                raise self.fail(f"weight (input 1) must be ({x.sizes['F']}, out), got shape "
                                f"{w.shape}", node)
            return [self.linear(node, x, w.T, None)]
        return self.op_other(node, a, ins)

    def op_Gemm(self, node, a, ins):
        x = self.as_seq(node, ins[0])
        if not isinstance(x, _Seq) or len(x.axes) != 2 or x.axes[-1] != "F":
            return self.op_other(node, a, ins)
        for k, want in (("alpha", 1.0), ("beta", 1.0), ("transA", 0)):
            if a.get(k, want) != want:
                raise self.fail(f"only {k}={want} is supported, got {a[k]}", node, k)
        w = self.const(node, 1, "weight")
        w = w.T if not a.get("transB", 0) else w                       # (out, in)
        c = self.const(node, 2, "bias") if len(ins) > 2 and ins[2] is not None else None
        if c is not None and c.shape not in ((w.shape[0],), (1, w.shape[0])):
            raise self.fail(f"bias (input 2) must have shape ({w.shape[0]},), got {c.shape}",
                            node)
        if w.shape[1] != x.sizes["F"]:
            raise self.fail(f"weight must take {x.sizes['F']} features, has {w.shape[1]}", node)
        return [self.linear(node, x, w, None if c is None else c.reshape(-1))]

    def op_Add(self, node, a, ins):
        x, c = ins[0], ins[1]
        if isinstance(c, _Seq) or isinstance(c, _GraphIn):
            x, c = c, x
        x = self.as_seq(node, x)
        if isinstance(x, _Seq) and isinstance(c, np.ndarray):
            st = self.stages[x.stage] if x.stage >= 0 else None
            if (st is None or st["kind"] != "linear" or st["bias"] is not None
                    or x.stage != len(self.stages) - 1 or x.axes != st["axes"]):
                raise self.fail("a constant can only be added as the bias of the preceding "
                                "MatMul", node)
            n = st["weight"].shape[0]
            if c.size != n or c.shape[-1] != n:
                raise self.fail(f"bias must have shape ({n},), got {c.shape}", node)
            st["bias"] = c.reshape(-1)
            return [x]
        return self.op_other(node, a, ins)

    def linear(self, node, x, w, bias):
        self.new_stage(node, dict(kind="linear", weight=np.ascontiguousarray(w), bias=bias,
                                  axes=None), x)
        out = _Seq(len(self.stages) - 1, x.axes, {"F": w.shape[0]})
        self.stages[-1]["axes"] = out.axes
        return out

    def new_stage(self, node, stage, seq):
        """Append a stage that reads `seq`; it must be the end of the chain so far."""
        if seq.stage != len(self.stages) - 1:
            raise self.fail("the graph is not a chain: this node reads the output of an "
                            "earlier layer than the last one", node)
        if seq.stage >= 0:
            prev = self.stages[seq.stage]
            if "out" in prev:
                raise self.fail("the graph is not a chain: a layer's output feeds two layers",
                                node)
            prev["out"] = seq
        stage["in"] = seq
        stage["node"] = node
        self.stages.append(stage)

    # -- recurrent nodes --------------------------------------------------------------
    def recurrent(self, node, a, ins):
        op = node.op_type
        allowed = {"hidden_size", "direction", "activations", "activation_alpha",
                   "activation_beta", "clip", "layout", "linear_before_reset", "input_forget"}
        for k in a:
            if k not in allowed:
                raise self.fail("unknown attribute", node, k)
        if "clip" in a:
            raise self.fail(f"cell clipping (clip={a['clip']}) is not supported", node, "clip")
        if a.get("input_forget", 0):
            raise self.fail("coupled input-forget gate (input_forget=1) is not supported",
                            node, "input_forget")
        if a.get("layout", 0) != 0:
            raise self.fail("layout=1 (batch-major recurrent operators) is not supported; "
                            "use Transpose around a layout=0 node", node, "layout")
        direction = a.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "bidirectional"):
            raise self.fail(f"direction={direction!r} is not supported (forward or "
                            f"bidirectional)", node, "direction")
        D = 2 if direction == "bidirectional" else 1
        if op == "GRU" and a.get("linear_before_reset", 0) not in (0, 1):
            raise self.fail(f"linear_before_reset must be 0 or 1, got "
                            f"{a.get('linear_before_reset')}", node, "linear_before_reset")
        nonlin = self.activations(node, a, D)
        W = self.const(node, 1, "W")
        R = self.const(node, 2, "R")
        G = _GATES[op]
        if "hidden_size" not in a:
            raise self.fail("hidden_size is required", node, "hidden_size")
        if type(a["hidden_size"]) is not int or a["hidden_size"] < 1:   # ONNX: an INT
            raise self.fail(f"hidden_size must be an integer >= 1, got {a['hidden_size']!r}",
                            node, "hidden_size")
        H = a["hidden_size"]
        if W.ndim != 3 or W.shape[:2] != (D, G * H):
            raise self.fail(f"W must be ({D}, {G * H}, input), got shape {W.shape}", node)
        if R.shape != (D, G * H, H):
            raise self.fail(f"R must be ({D}, {G * H}, {H}), got shape {R.shape}", node)
        if W.dtype not in (np.float32, np.float64) or R.dtype != W.dtype:
            raise self.fail(f"weights must be float32 or float64, got {W.dtype}/{R.dtype}", node)
        Bi = self.val(node, 3)
        if Bi is not None:
            Bi = self.const(node, 3, "B")
            if Bi.shape != (D, 2 * G * H):
                raise self.fail(f"B must be ({D}, {2 * G * H}), got shape {Bi.shape}", node)
        x = self.as_seq(node, self.val(node, 0))
        if not isinstance(x, _Seq) or len(x.axes) != 3 or x.axes[2] != "F":
            raise self.fail(f"X (input 0) must be the sequence (T, B, features), got {_kind(x)}",
                            node)
        self.set_bind(x.axes[0], "T", node)
        self.set_bind(x.axes[1], "B", node)
        if x.sizes.get("F") not in (None, W.shape[2]):
            raise self.fail(f"W takes {W.shape[2]} input features, X has {x.sizes['F']}", node)
        lens = self.val(node, 4)
        if lens is not None:
            if not isinstance(lens, _GraphIn) or lens.kind != "int":
                raise self.fail(f"sequence_lens (input 4) must be an integer graph input, got "
                                f"{_kind(lens)}", node)
            self.role(node, lens.name, "lengths")
            lens = lens.name
        states = []
        for i, nm in ((5, "initial_h"), (6, "initial_c")):
            v = self.val(node, i) if (i == 5 or op == "LSTM") else None
            if isinstance(v, _GraphIn):
                if v.dims[0] is None:
                    raise self.fail(f"{nm} input {v.name!r} needs a fixed first axis", node)
                v = _StateIn(v.name, 0, v.dims[0], v.dims[0])
            if isinstance(v, _StateIn):
                self.role(node, v.name, "h0" if i == 5 else "c0")
            elif isinstance(v, _Zeros):
                if len(v.shape) != 3 or v.shape[0] != D or v.shape[2] != H:
                    raise self.fail(f"{nm} must be ({D}, B, {H}), got {v.shape}", node)
            elif isinstance(v, np.ndarray):
                if v.shape[0] != D or np.any(v != 0):
                    raise self.fail(f"{nm}: only a zero constant initial state is supported",
                                    node)
                v = None
            elif v is not None:
                raise self.fail(f"{nm} (input {i}) must be zeros or a graph input, got "
                                f"{_kind(v)}", node)
            states.append(v if isinstance(v, _StateIn) else None)
        if op == "LSTM":
            P = self.val(node, 7)
            if P is not None and (not isinstance(P, np.ndarray) or np.any(P != 0)):
                raise self.fail("peephole weights (input 7, P) are not supported", node)
        self.new_stage(node, dict(kind="rnn", op=op, D=D, H=H, W=W, R=R, B=Bi,
                                  nonlinearity=nonlin, lens=lens, h0=states[0],
                                  reset_after=bool(a.get("linear_before_reset", 0)),
                                  c0=states[1] if len(states) > 1 else None), x)
        k = len(self.stages) - 1
        outs = [_Seq(k, ("T", "D", "B", "H"), {"D": D, "H": H}), _State("h", [k])]
        if op == "LSTM":
            outs.append(_State("c", [k]))
        return outs

    def role(self, node, name, role):
        old = self.input_roles.get(name)
        if old not in (None, role):
            raise self.fail(f"graph input {name!r} is used both as {old} and as {role}", node)
        self.input_roles[name] = role

    def activations(self, node, a, D):
        op = node.op_type
        acts = a.get("activations")
        acts = [s.decode() if isinstance(s, bytes) else s for s in acts] if acts else None
        alpha, beta = a.get("activation_alpha"), a.get("activation_beta")
        if op == "LSTM":
            if acts and [s.lower() for s in acts] != ["sigmoid", "tanh", "tanh"] * D:
                raise self.fail(f"non-default activations {acts} (fastrnn's LSTM is "
                                f"Sigmoid, Tanh, Tanh)", node, "activations")
        elif op == "GRU":
            if acts and [s.lower() for s in acts] != ["sigmoid", "tanh"] * D:
                raise self.fail(f"non-default activations {acts} (fastrnn's GRU is "
                                f"Sigmoid, Tanh)", node, "activations")
        else:
            acts = acts or ["Tanh"] * D
            low = [s.lower() for s in acts]
            if len(low) != D or len(set(low)) != 1 or low[0] not in ("tanh", "relu", "affine"):
                raise self.fail(f"activations {acts}: fastrnn's RNN runs one of Tanh, Relu or "
                                f"Affine(alpha=1, beta=0) in both directions", node,
                                "activations")
            if low[0] == "affine":
                if list(alpha or []) != [1.0] * D or list(beta or [0.0] * D) != [0.0] * D:
                    raise self.fail(f"Affine activation with alpha={alpha}, beta={beta}: only "
                                    f"alpha=1, beta=0 (the identity) is supported", node,
                                    "activation_alpha")
                return "identity"
            if alpha or beta:
                raise self.fail("activation_alpha/beta are not supported", node,
                                "activation_alpha")
            return low[0]
        if alpha or beta:
            raise self.fail("activation_alpha/beta are not supported", node, "activation_alpha")
        return None

    # -- building the fastrnn model -----------------------------------------------------
    def build(self):
        g = self.graph
        if not self.stages:
            raise self.fail("the graph has no embedding, recurrent or linear layer")
        outputs = []
        for vo in g.output:
            v = self.vals.get(vo.name)
            v = self.as_seq(None, v) if isinstance(v, _GraphIn) else v
            if isinstance(v, _Seq):
                if v.stage != len(self.stages) - 1:
                    raise self.fail(f"graph output {vo.name!r} is an intermediate layer's output")
                last = self.stages[-1]
                if "out" in last and last["out"] is not v:
                    raise self.fail(f"graph output {vo.name!r}: the last layer's output is used "
                                    f"twice")
                if last["kind"] == "rnn" and "F" not in v.axes:
                    raise self.fail(f"graph output {vo.name!r} has the recurrent operator's "
                                    f"raw layout {self.axes(v)}; fastrnn returns (T, B, D·H)")
                last["out"] = v
                outputs.append((vo.name, "out"))
            elif isinstance(v, _State):
                outputs.append((vo.name, v))
            else:
                raise self.fail(f"graph output {vo.name!r} is {_kind(v)}, not the sequence or "
                                f"a final state")
        if not any(r == "out" for _, r in outputs):
            raise self.fail("no graph output is the last layer's output sequence")
        # The whole chain runs in the graph input's layout: (T, B) or (B, T). Every
        # recurrent node reads (T, B, F) whatever the glue in between, since axes
        # are tracked by meaning; only the model's output must come back in that layout.
        in_ax = tuple(self.resolve(x) for x in self.input_seq.axes[:2])
        self.batch_first = in_ax == ("B", "T")
        out_ax = self.axes(self.stages[-1]["out"])[:2]
        if any(st["kind"] == "rnn" for st in self.stages) and out_ax != in_ax:
            raise self.fail(f"the model reads its input as {in_ax} but returns {out_ax}: "
                            f"fastrnn modules keep one layout")
        unused = [vi.name for vi in g.input if isinstance(self.vals.get(vi.name), _GraphIn)
                  and vi.name not in self.input_roles]
        if unused:
            raise self.fail(f"graph input {unused[0]!r} is not used by the chain")

        # group consecutive recurrent nodes into fastrnn stacks
        groups = []           # list of ("rnn", [stages]) | ("embedding"/"linear", stage)
        for st in self.stages:
            prev = groups[-1] if groups else None
            if (st["kind"] == "rnn" and prev is not None and prev[0] == "rnn"
                    and self.stackable(prev[1][-1], st)):
                prev[1].append(st)
            elif st["kind"] == "rnn":
                groups.append(("rnn", [st]))
            else:
                groups.append((st["kind"], st))
        mods, sig = [], dict(x=next(n for n, r in self.input_roles.items() if r == "x"),
                             lengths=None, h0=None, c0=None, outputs={},
                             batch_first=self.batch_first)
        rnn_groups = [grp for kind, grp in groups if kind == "rnn"]
        for kind, grp in groups:
            if kind == "embedding":
                w = grp["weight"]
                if w.dtype not in (np.float32, np.float64):
                    raise self.fail(f"embedding table must be float32/float64, got {w.dtype}",
                                    grp["node"])
                m = Embedding(w.shape[0], w.shape[1], dtype=w.dtype)
                m.weight.data[...] = w
                mods.append(m)
            elif kind == "linear":
                w, bias = grp["weight"], grp["bias"]
                m = Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
                m.weight.data[...] = w
                if bias is not None:
                    m.bias.data[...] = bias
                mods.append(m)
            else:
                mods.append(self.build_stack(grp, sig))
        # states among the outputs
        for name, r in outputs:
            if r == "out":
                sig["outputs"][name] = "out"
                continue
            grp = next((grp for grp in rnn_groups if grp[0] is self.stages[r.stages[0]]), None)
            if grp is None or [self.stages[i] for i in r.stages] != grp:
                raise self.fail(f"graph output {name!r} concatenates final states of recurrent "
                                f"nodes that are not one whole stack")
            if len(rnn_groups) != 1:
                raise self.fail(f"graph output {name!r}: final states are returned only for "
                                f"a model with one recurrent stack")
            sig["outputs"][name] = "h_n" if r.kind == "h" else "c_n"
        has_states = any(v in ("h_n", "c_n") for v in sig["outputs"].values())
        model = self.assemble(mods, groups, sig, has_states)
        model.onnx_signature = sig
        return model.eval()

    def stackable(self, a, b):
        if a["op"] != b["op"] or a["H"] != b["H"] or a["D"] != b["D"]:
            return False
        if (a["B"] is None) != (b["B"] is None) or a["nonlinearity"] != b["nonlinearity"]:
            return False
        if a["reset_after"] != b["reset_after"]:   # one GRU stack has one form
            return False
        # one stack has one merge mode: a layer merging its directions otherwise (its own
        # Y) starts a new stack (fastrnn's export of concat then sum failed to load)
        own = b["out"].merge if "out" in b else None
        return (a["lens"] == b["lens"] and b["in"].merge is not None
                and (own is None or own == b["in"].merge))

    def build_stack(self, grp, sig):
        first, last = grp[0], grp[-1]
        node = first["node"]
        op, D, H, L = first["op"], first["D"], first["H"], len(grp)
        merges = {st["out"].merge for st in grp if "out" in st}
        merges.discard(None)
        if D == 2 and len(merges) > 1:
            raise self.fail("directions are merged differently in successive layers", node)
        merge = merges.pop() if merges else "concat"
        if D == 2 and "out" not in last:
            raise self.fail("the last recurrent node's output Y is not used", last["node"])
        batch_first = self.batch_first
        W0 = first["W"]
        kw = dict(num_layers=L, bias=first["B"] is not None, batch_first=batch_first,
                  bidirectional=D == 2, dtype=W0.dtype, merge_mode=merge)
        if op == "LSTM":
            m = LSTM(W0.shape[2], H, **kw)
        elif op == "GRU":   # linear_before_reset=0 (ONNX's default): the reset gate first
            m = GRU(W0.shape[2], H, reset_after=first["reset_after"], **kw)
        else:
            m = RNN(W0.shape[2], H, nonlinearity=first["nonlinearity"], **kw)
        order = _TO_TORCH[op]
        sfx = ["", "_reverse"]
        for k, st in enumerate(grp):
            if st["W"].dtype != W0.dtype:
                raise self.fail("layers of one stack have different dtypes", st["node"])
            want_in = m.input_size if k == 0 else m.output_size
            if st["W"].shape[2] != want_in:
                raise self.fail(f"W must take {want_in} inputs, got {st['W'].shape[2]}", st["node"])
            for d in range(D):
                n = f"_l{k}{sfx[d]}"
                getattr(m, "weight_ih" + n).data[...] = _blocks(st["W"][d], order, H)
                getattr(m, "weight_hh" + n).data[...] = _blocks(st["R"][d], order, H)
                if st["B"] is not None:
                    G = _GATES[op]
                    getattr(m, "bias_ih" + n).data[...] = _blocks(st["B"][d, :G * H], order, H)
                    getattr(m, "bias_hh" + n).data[...] = _blocks(st["B"][d, G * H:], order, H)
        # initial states: all zero, or layer k reads rows [kD, (k+1)D) of one input
        for key in ("h0", "c0"):
            ss = [st[key] for st in grp]
            if all(s is None for s in ss):
                continue
            names = {s.name if s else None for s in ss}
            ok = (len(names) == 1 and all(s.lo == k * D and s.hi == (k + 1) * D
                                          and s.total == L * D for k, s in enumerate(ss)))
            if not ok:
                raise self.fail(f"initial state {key}: layer k must read rows [k·{D}, (k+1)·{D}) "
                                f"of one ({L * D}, B, {H}) graph input", first["node"])
            if sig[key] not in (None, ss[0].name):
                raise self.fail("two recurrent stacks take initial states", first["node"])
            sig[key] = ss[0].name
        if first["lens"]:
            sig["lengths"] = first["lens"]
        return m

    def assemble(self, mods, groups, sig, has_states):
        from fastrnn.lm import RNNLanguageModel
        kinds = [k for k, _ in groups]
        if kinds == ["rnn"]:
            return mods[0]
        if sig["lengths"]:
            raise self.fail("sequence_lens is supported only for a graph that is one recurrent "
                            "stack")
        if kinds == ["embedding", "rnn", "linear"]:
            emb, rnn, dec = mods
            ok = (not rnn.bidirectional and not rnn.batch_first and rnn.bias
                  and dec.bias is not None and dec.in_features == rnn.hidden_size
                  and dec.out_features == emb.num_embeddings and emb.weight.dtype == rnn.dtype
                  and (rnn.mode != "RNN" or rnn.nonlinearity in ("tanh", "relu")))
            if ok:
                cell = {"LSTM": "lstm", "GRU": "gru"}.get(rnn.mode) or "rnn_" + rnn.nonlinearity
                lm = RNNLanguageModel(emb.num_embeddings, emb.embedding_dim, rnn.hidden_size,
                                      rnn.num_layers, cell=cell, dtype=rnn.dtype,
                                      reset_after=getattr(rnn, "reset_after", True))
                lm.encoder, lm.rnn, lm.decoder = emb, rnn, dec
                return lm
        if has_states or sig["h0"] or sig["c0"]:
            raise self.fail("initial or final states are supported for a single recurrent stack "
                            "or an embedding -> recurrent -> linear language model only")
        return Sequential(*[Recurrent(m) if isinstance(m, RNNBase) else m for m in mods])


class _GraphIn:
    def __init__(self, name, kind, dims):
        self.name, self.kind, self.dims = name, kind, dims


def _kind(v):
    if v is None:
        return "absent"
    if isinstance(v, np.ndarray):
        return f"a constant of shape {v.shape}"
    return {"_Shape": "a shape", "_Zeros": "a zero tensor", "_Seq": "the sequence",
            "_State": "a final state", "_StateIn": "an initial-state input",
            "_GraphIn": "a graph input"}.get(type(v).__name__, type(v).__name__)


def load(path):
    """Import the ONNX model at `path` as a fastrnn module (see the module docstring).

    Raises ValueError naming the node, op and attribute for anything that
    fastrnn cannot run exactly; FileNotFoundError if the file is missing.
    """
    onnx = _onnx()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as e:
        raise ValueError(f"fastrnn.onnx.load({path!r}): not a readable ONNX model "
                         f"({type(e).__name__}: {e})") from e
    if len(model.graph.node) == 0:
        raise ValueError(f"fastrnn.onnx.load({path!r}): the graph has no nodes "
                         f"(not an ONNX model, or an empty one)")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"fastrnn.onnx.load({path!r}): initializer {t.name!r} is stored in "
                             f"an external file; not supported")
    try:
        return _Loader(model, path).run()
    except (TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        # a node whose attributes or inputs are missing or of the wrong kind (a damaged
        # file) trips Python in the middle of the walk; say so for the file
        raise ValueError(f"fastrnn.onnx.load({path!r}): malformed model "
                         f"({type(e).__name__}: {e})") from e


def run(model, feeds):
    """Run a model returned by `load` on ONNX-Runtime-style `feeds` (input name ->
    array); returns {output name: array} for the graph's outputs, so the result
    compares one to one with ``onnxruntime.InferenceSession(path).run(None, feeds)``."""
    sig = getattr(model, "onnx_signature", None)
    if sig is None:
        raise ValueError("run: model has no onnx_signature (was it returned by fastrnn.onnx.load?)")
    unknown = set(feeds) - {sig["x"], sig["lengths"], sig["h0"], sig["c0"]}
    if unknown:
        raise ValueError(f"run: unexpected feed(s) {sorted(unknown)}; the model's inputs are "
                         f"{[n for n in (sig['x'], sig['lengths'], sig['h0'], sig['c0']) if n]}")
    if sig["x"] not in feeds:
        raise ValueError(f"run: feeds must contain the sequence input {sig['x']!r}")
    x = feeds[sig["x"]]
    from fastrnn.lm import RNNLanguageModel
    h0 = feeds.get(sig["h0"]) if sig["h0"] else None
    c0 = feeds.get(sig["c0"]) if sig["c0"] else None
    res = {}
    if isinstance(model, (RNNBase, RNNLanguageModel)):
        is_lstm = (model.mode if isinstance(model, RNNBase) else model.rnn.mode) == "LSTM"
        state = None
        if h0 is not None or c0 is not None:
            state = (h0, c0) if is_lstm else h0
        if isinstance(model, RNNBase):
            lens = feeds.get(sig["lengths"]) if sig["lengths"] else None
            out, state = model(x, state, lengths=lens)
        else:
            out, state = model(x, state)
        h_n, c_n = state if is_lstm else (state, None)
        res = {"out": out, "h_n": h_n, "c_n": c_n}
    else:
        res = {"out": model(x)}
    return {name: res[role] for name, role in sig["outputs"].items()}
