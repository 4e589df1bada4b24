"""The engines the runner times side by side: fastrnn, PyTorch CPU, ONNX Runtime.

Each engine is built for one :class:`Case` from the same torch-named weights and
the same input, and offers

    run()      one timed call: an inference forward (mode "forward"), a
               forward+backward (mode "train") or one batch-1 step (mode "step")
    timed_calls()  (optional) a context around a run of timed calls: torch's
               inference mode, entered once per sample
    results()  the arrays of the last call, as a dict with common keys
               ("y", "h_n", "c_n", "dx", "grad:<torch parameter name>", ...),
               used to check every peer against fastrnn before timing

fastrnn is reached through the package at call time (``fastrnn.LSTM``,
``fastrnn.LSTMCell``, ``fastrnn.functional``), so the benchmark follows whatever
the package currently provides. When a layer or cell class is missing, a
single-layer single-direction case falls back to ``fastrnn.functional``.
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np

from fastrnn.benchmark import common
from fastrnn.modules.module import aligned_copy, aligned_zeros

__all__ = ["Case", "EngineUnavailable", "FastrnnEngine", "TorchEngine", "OnnxEngine",
           "ENGINES", "available_peers"]


class EngineUnavailable(Exception):
    """This engine cannot run this case (not installed, unsupported dtype, ...)."""


@dataclass
class Case:
    """One benchmark case. For mode "step", T and B are 1."""
    cell: str
    mode: str
    I: int
    H: int
    T: int
    B: int
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def D(self):
        return 2 if self.bidirectional else 1

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    @property
    def flops(self):
        return common.flop_count(self.cell, self.I, self.H, self.T, self.B, self.mode,
                                 self.layers, self.bidirectional)

    def label(self):
        extra = f" L{self.layers}" if self.layers > 1 else ""
        extra += " bi" if self.bidirectional else ""
        return f"{self.cell} {self.mode} I={self.I} H={self.H} T={self.T} B={self.B}{extra}"

    def make_data(self):
        """(weights, x, dy, h0, c0) for this case, deterministic in ``seed``."""
        step = self.mode == "step"
        weights = common.make_weights(self.cell, self.I, self.H,
                                      1 if step else self.layers,
                                      False if step else self.bidirectional,
                                      self.np_dtype, seed=self.seed, cell_only=step)
        x, dy = common.make_inputs(self.I, self.H, self.T, self.B, self.D, self.np_dtype,
                                   seed=self.seed + 1)
        h0 = c0 = None
        if step:  # a step continues from some state; layers start from zeros
            rng = np.random.default_rng(self.seed + 2)
            h0 = rng.uniform(-0.5, 0.5, size=(self.B, self.H)).astype(self.np_dtype)
            c0 = rng.uniform(-0.5, 0.5, size=(self.B, self.H)).astype(self.np_dtype)
        return weights, x, dy, h0, c0


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


# ---------------------------------------------------------------------------
# fastrnn
# ---------------------------------------------------------------------------

_LAYER_CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
_CELL_CLASSES = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell"}


def _construct(cls, args, kwargs, dtype):
    """Build a fastrnn module in ``dtype``: pass ``dtype=`` when the class takes
    it, otherwise cast its parameters after construction."""
    try:
        module = cls(*args, dtype=dtype, **kwargs)
    except TypeError:
        module = cls(*args, **kwargs)
    for p in module.parameters():
        if p.data.dtype != dtype:
            p.data = aligned_copy(p.data, dtype)
            p.grad = aligned_zeros(p.data.shape, dtype)
    return module


class FastrnnEngine:
    name = "fastrnn"

    def __init__(self, case, weights, x, dy, h0=None, c0=None):
        import fastrnn
        self.case, self.x, self.dy, self.h0, self.c0 = case, x, dy, h0, c0
        self._out = None
        self.frozen = False
        cell = case.cell
        kwargs = {"nonlinearity": cell.split("_", 1)[1]} if cell.startswith("rnn") else {}
        if case.mode == "step":
            cls = getattr(fastrnn, _CELL_CLASSES[cell], None)
        else:
            cls = getattr(fastrnn, _LAYER_CLASSES[cell], None)
        if cls is not None:
            self.impl = "cell" if case.mode == "step" else "module"
            if case.mode == "step":
                self.module = _construct(cls, (case.I, case.H), kwargs, case.np_dtype)
            else:
                self.module = _construct(cls, (case.I, case.H),
                                         dict(kwargs, num_layers=case.layers,
                                              bidirectional=case.bidirectional),
                                         case.np_dtype)
            self.module.load_state_dict(weights)
            self.module.train(case.mode == "train")
            if case.mode != "train":
                # inference as deployed: weights as constants, as in an ONNX Runtime
                # session (Module.freeze(): eval calls skip hashing them)
                self.module.freeze()
                self.frozen = True
        else:
            if case.layers != 1 or case.bidirectional:
                raise EngineUnavailable(f"fastrnn.{_LAYER_CLASSES[cell]} is not available "
                                        "(the functional fallback is single-layer, one direction)")
            self.impl = "functional"
            self.module = None
            prefix = "" if case.mode == "step" else "_l0"
            self.w = tuple(weights[f"{k}{prefix}"]
                           for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def run(self):
        case = self.case
        if self.module is None:
            import fastrnn
            F = fastrnn.functional
            if case.mode == "step":
                out, _ = common.kernel_forward(F, case.cell, self.x, self.w, self.h0, self.c0,
                                               training=False)
                self._out = {"h": out["h_n"], "c": out.get("c_n")}
            else:
                self._out = common.kernel_run(F, case.cell, case.mode, self.x, self.w, self.dy)
            return
        m = self.module
        if case.mode == "step":
            x = self.x[0]
            if case.cell == "lstm":
                h, c = m(x, (self.h0, self.c0))
                self._out = {"h": h, "c": c}
            else:
                self._out = {"h": m(x, self.h0)}
            return
        if case.mode == "train":
            m.zero_grad()
        y, state = m(self.x)
        out = {"y": y}
        if case.cell == "lstm":
            out["h_n"], out["c_n"] = state
        else:
            out["h_n"] = state
        if case.mode == "train":
            out["dx"] = _first(m.backward(self.dy))
        self._out = out

    def results(self):
        out = dict(self._out)
        if self.module is None:
            if self.case.mode == "train":
                for ours, torch_name in (("dw_ih", "weight_ih_l0"), ("dw_hh", "weight_hh_l0"),
                                         ("db_ih", "bias_ih_l0"), ("db_hh", "bias_hh_l0")):
                    out["grad:" + torch_name] = out.pop(ours)
                out.pop("dh0", None)
                out.pop("dc0", None)
            if self.case.mode != "step":
                # functional h_n is (B, H); a layer's is (layers * D, B, H) = (1, B, H)
                for key in ("h_n", "c_n"):
                    if out.get(key) is not None:
                        out[key] = out[key][None]
        elif self.case.mode == "train":
            for name, p in self.module.named_parameters():
                out["grad:" + name] = p.grad
        return out


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

class TorchEngine:
    name = "torch"

    def __init__(self, case, weights, x, dy, h0=None, c0=None):
        try:
            import torch
        except ImportError as exc:
            raise EngineUnavailable(f"torch is not installed ({exc})") from None
        self.torch = torch
        self.case = case
        tdtype = {"float32": torch.float32, "float64": torch.float64}[case.dtype]
        cell = case.cell
        kwargs = {"nonlinearity": cell.split("_", 1)[1]} if cell.startswith("rnn") else {}
        if case.mode == "step":
            cls = getattr(torch.nn, _CELL_CLASSES[cell])
            self.module = cls(case.I, case.H, dtype=tdtype, **kwargs)
        else:
            cls = getattr(torch.nn, _LAYER_CLASSES[cell])
            self.module = cls(case.I, case.H, num_layers=case.layers,
                              bidirectional=case.bidirectional, dtype=tdtype, **kwargs)
        self.module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                     for k, v in weights.items()})
        self.module.train(case.mode == "train")
        self.x = torch.from_numpy(x.copy())
        if case.mode == "train":
            self.x.requires_grad_(True)
        self.dy = torch.from_numpy(dy.copy())
        self.h0 = None if h0 is None else torch.from_numpy(h0.copy())
        self.c0 = None if c0 is None else torch.from_numpy(c0.copy())
        self._out = None
        self._in_mode = False   # inside timed_calls(): inference mode already entered

    @contextlib.contextmanager
    def timed_calls(self):
        """The timing loop's context (timing._sample): inference calls enter torch's
        inference mode once around a sample, as a serving loop would. Entered per
        call it cost 4-5 us, 17-25 % of a small cell's step (session 25's audit)."""
        if self.case.mode == "train":
            yield
            return
        with self.torch.inference_mode():
            self._in_mode = True
            try:
                yield
            finally:
                self._in_mode = False

    def run(self):
        torch, m, case = self.torch, self.module, self.case
        if case.mode == "train":
            for p in m.parameters():
                p.grad = None
            self.x.grad = None
            y, state = m(self.x)
            y.backward(self.dy)
            self._out = (y, state)
            return
        if not self._in_mode:
            with self.timed_calls():
                return self.run()
        if case.mode == "step":
            x = self.x[0]
            if case.cell == "lstm":
                self._out = m(x, (self.h0, self.c0))
            else:
                self._out = m(x, self.h0)
        else:
            self._out = m(self.x)

    def results(self):
        case = self.case

        def np_(t):
            return t.detach().numpy()
        if case.mode == "step":
            if case.cell == "lstm":
                return {"h": np_(self._out[0]), "c": np_(self._out[1])}
            return {"h": np_(self._out)}
        y, state = self._out
        out = {"y": np_(y)}
        if case.cell == "lstm":
            out["h_n"], out["c_n"] = np_(state[0]), np_(state[1])
        else:
            out["h_n"] = np_(state)
        if case.mode == "train":
            out["dx"] = np_(self.x.grad)
            for name, p in self.module.named_parameters():
                out["grad:" + name] = np_(p.grad)
        return out


# ---------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------

class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, case, weights, x, dy, h0=None, c0=None, threads=1):
        if case.mode == "train":
            raise EngineUnavailable("ONNX Runtime has no training: train mode is skipped")
        if case.dtype != "float32":
            raise EngineUnavailable("ONNX Runtime's CPU RNN kernels are float32 only")
        try:
            import onnxruntime as ort
            import onnx  # noqa: F401  (the model is built with onnx.helper)
        except ImportError as exc:
            raise EngineUnavailable(f"onnxruntime/onnx is not installed ({exc})") from None
        from fastrnn.benchmark.onnx_model import build_model
        self.case = case
        step = case.mode == "step"
        if step:  # cell weights (weight_ih, ...) are layer 0 of a one-step model
            weights = {f"{k}_l0": v for k, v in weights.items()}
        model = build_model(case.cell, weights, case.I, case.H, case.T, case.B,
                            1 if step else case.layers, False if step else case.bidirectional,
                            case.np_dtype, with_state=step, single_node=step)
        # a step fetches the state alone, as a streaming caller would
        self.fetch = (["Y_h", "Y_c"] if case.cell == "lstm" else ["Y_h"]) if step else None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.feeds = {"X": np.ascontiguousarray(x)}
        if step:
            self.feeds["h0"] = h0[None].copy()
            if case.cell == "lstm":
                self.feeds["c0"] = c0[None].copy()
        self._out = None

    def run(self):
        self._out = self.session.run(self.fetch, self.feeds)

    def results(self):
        out = self._out
        if self.case.mode == "step":
            res = {"h": out[0][0]}
            if self.case.cell == "lstm":
                res["c"] = out[1][0]
            return res
        res = {"y": out[0], "h_n": out[1]}
        if self.case.cell == "lstm":
            res["c_n"] = out[2]
        return res


ENGINES = {"fastrnn": FastrnnEngine, "torch": TorchEngine, "onnxruntime": OnnxEngine}


def available_peers():
    """The peers whose packages import: a subset of ("torch", "onnxruntime")."""
    import importlib.util
    peers = []
    if importlib.util.find_spec("torch") is not None:
        peers.append("torch")
    if (importlib.util.find_spec("onnxruntime") is not None
            and importlib.util.find_spec("onnx") is not None):
        peers.append("onnxruntime")
    return peers
