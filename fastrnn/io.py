"""Saving and loading modules, and converting to and from torch.nn.

File layout (`fastrnn.save`): an uncompressed NumPy `.npz` archive with

    "__fastrnn__"   (1,) unicode string array: a JSON object
                    {"format": "fastrnn", "version": 1,
                     "class": "LSTM", "config": {constructor arguments},
                     "training": false}   (the mode it was saved in; absent: true)
    "<param name>"  one array per parameter, named as in `state_dict()`
                    (e.g. "weight_ih_l0", "bias_hh_l1_reverse"), in the
                    module's dtype

`fastrnn.load` first checks the zip structure and every member's CRC-32 (so
flipped bits in the weights are caught too), then reads it with
`np.load(allow_pickle=False)`, so a file can never run code. It rebuilds the
module from the class name (looked up in a fixed registry, never imported by
name) and its config, then loads the arrays with name, shape and dtype checks.
Anything wrong (not an archive, bad CRC, no header, bad JSON, unknown class,
bad config, missing/unexpected/mis-shaped/mis-typed arrays) raises ValueError
saying what.

`from_torch` / `to_torch` import torch only when called.
"""

import contextlib
import inspect
import json
import os
import zipfile

import numpy as np

from fastrnn._atomic import replacing
from fastrnn.modules.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.modules.module import (Module, ParameterBudgetError, parameter_budget,
                                    weights_to_be_loaded)
from fastrnn.modules.rnn import GRU, LSTM, RNN

__all__ = ["save", "load", "load_weights", "register", "from_torch", "to_torch"]

FORMAT, VERSION = "fastrnn", 1
HEADER_KEY = "__fastrnn__"

# class name -> class; load() only ever builds these (never imports by name)
_REGISTRY = {cls.__name__: cls for cls in (RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell)}


def register(cls):
    """Make another Module subclass saveable. It needs `config()` returning its
    constructor arguments as JSON-friendly values. Usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TypeError(f"register: expected a Module subclass, got {cls!r}")
    if not callable(getattr(cls, "config", None)):
        raise TypeError(f"register: {cls.__name__} needs a config() method")
    _REGISTRY[cls.__name__] = cls
    return cls


def save(path, module):
    """Write `module` (class, config and parameters) to `path` (exactly that name).
    A path ending in .safetensors writes a safetensors file (fastrnn.safetensors_io)."""
    if os.fspath(path).endswith(".safetensors"):
        from fastrnn import safetensors_io
        return safetensors_io.save(path, module)
    name = type(module).__name__
    if _REGISTRY.get(name) is not type(module):
        return _save_tree(path, module)
    header = dict(format=FORMAT, version=VERSION, **{"class": name},
                  config=module.config(), training=bool(module.training))
    try:
        text = json.dumps(header)
    except TypeError as e:
        raise ValueError(f"save: {name}.config() is not JSON-serialisable: {e}") from e
    arrays = {HEADER_KEY: np.array([text])}          # (1,) unicode
    for key, value in module.state_dict().items():
        arrays[key] = value
    with replacing(path) as tmp:                      # never leave a half-written file
        with open(tmp, "wb") as f:                    # a file object: numpy keeps the name
            np.savez(f, **arrays)


def _save_tree(path, module):
    """A composite (Sequential, ModuleList, RNNLanguageModel, Recurrent, Linear,
    Embedding, dropouts, nested with the registered classes) as a module-tree archive
    (fastrnn._modelfile): what fastrnn.onnx.load and from_keras return beyond one
    stack could not be saved (found by an audit)."""
    from fastrnn import _modelfile
    try:   # a class it cannot describe: ValueError naming it, before any file is made
        _modelfile.save_model(path, module)
    except (ValueError, TypeError) as e:
        raise ValueError(f"save: {type(module).__name__} is not a saveable class: {e}") from None


def budget_for(stored):
    """The parameter_budget for building a module whose file stores `stored` values:
    the parameters and their gradients (2 values each) of a module up to twice as
    large, plus 2^20: memory in proportion to the file, and room for a file that
    lacks a parameter or two to reach the exact check of its names and shapes."""
    return 4 * stored + (1 << 20)


def built_to_be_loaded(cls):
    """The context to construct `cls` in when a strict load of every parameter follows:
    weights_to_be_loaded for fastrnn's own classes (no init drawn only to be
    overwritten), nothing for a registered one (it may read its initial weights)."""
    own = cls.__module__.split(".")[0] == "fastrnn"
    return weights_to_be_loaded() if own else contextlib.nullcontext()


def _fail(path, why):
    return ValueError(f"fastrnn.load({path!r}): {why}")


def load(path):
    """Rebuild the module saved at `path` by `save`. Raises ValueError for
    anything that is not a valid fastrnn file; FileNotFoundError if missing."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from fastrnn import safetensors_io
        return safetensors_io.load(path)
    if "__fastrnn_tree__.npy" in _check_zip(path):   # a composite written by _save_tree
        from fastrnn import _modelfile
        with open(path, "rb") as f:
            return _modelfile.from_bytes(f.read(), what=repr(path), keep_mode=True)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as e:  # any failure to parse the file means a corrupted file
        raise _fail(path, f"corrupted archive ({type(e).__name__}: {e})") from e
    module = _build(path, arrays.pop(HEADER_KEY, None), arrays)
    _load_arrays(path, module, arrays)
    return module


def load_weights(path):
    """Name -> array of every tensor in `path` (safetensors, or a fastrnn .npz), for
    `module.load_state_dict(...)`; reads torch's `safetensors.torch.save_file` files."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from fastrnn import safetensors_io
        return safetensors_io.load_weights(path)
    _check_zip(path)
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files if k != HEADER_KEY}


def _check_zip(path):
    """Is `path` a readable zip whose members all pass their CRC-32 check? Returns
    its member names."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member: catches flipped bits in the data too
            names = zf.namelist()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise _fail(path, "a single .npy array, not a fastrnn .npz archive") from e
        raise _fail(path, f"not a NumPy .npz archive ({e})") from e
    except Exception as e:  # unsupported/encrypted/garbled zip structures
        raise _fail(path, f"corrupted archive ({type(e).__name__}: {e})") from e
    if bad is not None:
        raise _fail(path, f"corrupted archive: member {bad!r} fails its CRC-32 check")
    problem = members_problem(names)
    if problem:
        raise _fail(path, problem)
    return names


def members_problem(names):
    """What is wrong with the member names of a fastrnn .npz archive, or None: each
    member a .npy array (np.load hands other members over as raw bytes), each name
    once (np.load would silently take the last of several)."""
    seen = set()
    for name in names:
        if not name.endswith(".npy"):
            return f"member {name!r} is not a .npy array"
        if name in seen:
            return f"member {name!r} appears more than once"
        seen.add(name)
    return None


def _build(path, header, arrays):
    """Header array -> a freshly constructed module (parameters not yet loaded)."""
    if header is None:
        raise _fail(path, f"no {HEADER_KEY!r} header; not written by fastrnn.save")
    if header.dtype.kind != "U" or header.size != 1:
        raise _fail(path, f"header must be one unicode string, got dtype {header.dtype} "
                          f"shape {header.shape}")
    try:
        meta = json.loads(str(header.reshape(-1)[0]))
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "header is not a fastrnn header")
    if meta.get("version") != VERSION:
        raise _fail(path, f"unsupported format version {meta.get('version')!r} "
                          f"(this fastrnn reads {VERSION})")
    cls = _REGISTRY.get(meta.get("class"))
    if cls is None:
        raise _fail(path, f"unknown class {meta.get('class')!r}; known: "
                          f"{', '.join(sorted(_REGISTRY))}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise _fail(path, "header has no config object")
    wrong = _config_type_errors(cls, config)
    if wrong:
        raise _fail(path, f"invalid {cls.__name__} config: " + "; ".join(wrong))
    # Sizes in an honest file never exceed the number of stored values; a
    # corrupted one must not make us allocate absurd amounts of memory.
    stored = sum(a.size for a in arrays.values())
    for k, v in config.items():
        if isinstance(v, int) and not isinstance(v, bool) and k != "seed" and v > max(stored, 1):
            raise _fail(path, f"config {k}={v} is inconsistent with the {stored} stored values")
    training = meta.get("training", True)   # files before session 25: a new module's mode
    if not isinstance(training, bool):
        raise _fail(path, f"header 'training' must be true or false, got {training!r}")
    try:
        with parameter_budget(budget_for(stored)), built_to_be_loaded(cls):
            return cls(**config).train(training)   # the mode it was saved in
    except ParameterBudgetError:
        raise _fail(path, f"config {config} declares more parameter values than the "
                          f"{stored} stored") from None
    except (TypeError, ValueError, MemoryError, OverflowError) as e:
        raise _fail(path, f"invalid {cls.__name__} config {config} ({e})") from e


def _config_type_errors(cls, config):
    """Config values whose JSON type differs from their constructor default's: a
    constructor takes bool("false") as True, so a file must say true or false."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):   # pragma: no cover - no signature to compare with
        return []
    wrong = []
    for k, v in config.items():
        p = params.get(k)
        if p is None or p.default is inspect.Parameter.empty or p.default is None:
            continue
        if isinstance(p.default, bool) and not isinstance(v, bool):
            wrong.append(f"{k} must be true or false, got {v!r}")
        elif (type(p.default) is int and (isinstance(v, bool) or not isinstance(v, int))):
            wrong.append(f"{k} must be an integer, got {v!r}")
    return wrong


def _load_arrays(path, module, arrays):
    """Strict parameter load: exact names, shapes and dtypes (no silent cast)."""
    own = dict(module.named_parameters(remove_duplicate=False))
    wrong_dtype = [f"{k}: expected {p.dtype}, got {arrays[k].dtype}"
                   for k, p in own.items() if k in arrays and arrays[k].dtype != p.dtype]
    if wrong_dtype:
        raise _fail(path, "wrong dtypes: " + "; ".join(wrong_dtype))
    try:
        module.load_state_dict(arrays)
    except ValueError as e:
        raise _fail(path, str(e)) from e


# -- torch conversion (torch imported lazily) --------------------------------
def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("fastrnn.from_torch/to_torch need PyTorch, which is not "
                          "installed (pip install torch)") from e
    return torch


_NP_DTYPE = {"torch.float32": "float32", "torch.float64": "float64"}


def from_torch(module):
    """A fastrnn copy (same config, weights and train/eval mode) of a torch.nn
    RNN, LSTM, GRU, RNNCell, LSTMCell or GRUCell."""
    torch = _torch()
    nn = torch.nn
    params = list(module.parameters()) if isinstance(module, nn.Module) else []
    if not params:
        raise TypeError(f"from_torch: expected a torch.nn RNN/LSTM/GRU or cell, "
                        f"got {type(module).__name__}")
    dtype = _NP_DTYPE.get(str(params[0].dtype))
    if dtype is None:
        raise ValueError(f"from_torch: parameters must be float32 or float64, "
                         f"got {params[0].dtype}")
    if isinstance(module, (nn.RNN, nn.LSTM, nn.GRU)):
        kw = dict(num_layers=module.num_layers, bias=module.bias,
                  batch_first=module.batch_first, dropout=module.dropout,
                  bidirectional=module.bidirectional, dtype=dtype)
        if isinstance(module, nn.LSTM):
            ours = LSTM(module.input_size, module.hidden_size, proj_size=module.proj_size, **kw)
        elif isinstance(module, nn.GRU):
            ours = GRU(module.input_size, module.hidden_size, **kw)
        else:
            ours = RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity,
                       **kw)
    elif isinstance(module, nn.RNNCell):
        ours = RNNCell(module.input_size, module.hidden_size, bias=module.bias,
                       nonlinearity=module.nonlinearity, dtype=dtype)
    elif isinstance(module, nn.LSTMCell):
        ours = LSTMCell(module.input_size, module.hidden_size, bias=module.bias, dtype=dtype)
    elif isinstance(module, nn.GRUCell):
        ours = GRUCell(module.input_size, module.hidden_size, bias=module.bias, dtype=dtype)
    else:
        raise TypeError(f"from_torch: expected a torch.nn RNN/LSTM/GRU or cell, "
                        f"got {type(module).__name__}")
    ours.load_state_dict(module.state_dict())
    return ours.train(module.training)


def to_torch(module):
    """A torch.nn copy (same config, weights and train/eval mode) of a fastrnn
    RNN, LSTM, GRU or cell. merge_mode='sum' and nonlinearity='identity' have
    no torch equivalent and raise ValueError."""
    torch = _torch()
    nn = torch.nn
    if getattr(module, "merge_mode", "concat") != "concat":
        raise ValueError("to_torch: torch.nn has no merge_mode='sum'")
    if not getattr(module, "reset_after", True):
        raise ValueError("to_torch: torch.nn's GRU has no reset_after=False (its reset gate "
                         "applies after the recurrent product)")
    if getattr(module, "nonlinearity", "tanh") not in ("tanh", "relu"):
        raise ValueError(f"to_torch: torch.nn has no nonlinearity={module.nonlinearity!r}")
    dtype = {np.float32: torch.float32, np.float64: torch.float64}[module.dtype.type]
    if isinstance(module, (RNN, LSTM, GRU)):
        kw = dict(num_layers=module.num_layers, bias=module.bias,
                  batch_first=module.batch_first, dropout=module.dropout,
                  bidirectional=module.bidirectional, dtype=dtype)
        if isinstance(module, LSTM):
            theirs = nn.LSTM(module.input_size, module.hidden_size, proj_size=module.proj_size,
                             **kw)
        elif isinstance(module, GRU):
            theirs = nn.GRU(module.input_size, module.hidden_size, **kw)
        else:
            theirs = nn.RNN(module.input_size, module.hidden_size,
                            nonlinearity=module.nonlinearity, **kw)
    elif isinstance(module, RNNCell):
        theirs = nn.RNNCell(module.input_size, module.hidden_size, bias=module.bias,
                            nonlinearity=module.nonlinearity, dtype=dtype)
    elif isinstance(module, LSTMCell):
        theirs = nn.LSTMCell(module.input_size, module.hidden_size, bias=module.bias, dtype=dtype)
    elif isinstance(module, GRUCell):
        theirs = nn.GRUCell(module.input_size, module.hidden_size, bias=module.bias, dtype=dtype)
    else:
        raise TypeError(f"to_torch: expected a fastrnn RNN/LSTM/GRU or cell, "
                        f"got {type(module).__name__}")
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in module.state_dict().items()})
    return theirs.train(module.training)
