"""A module as bytes, and back: what `fastrnn.dask` ships to its workers.

Two layouts, both NumPy ``.npz`` archives read with ``allow_pickle=False``
(so bytes from anywhere can never run code):

* a module `fastrnn.save` knows (RNN, LSTM, GRU, the cells, anything added
  with `fastrnn.io.register`): exactly the bytes of `fastrnn.save`, read back
  with `fastrnn.load`;
* a composite (`Sequential`, `ModuleList`, `RNNLanguageModel`, `Recurrent`,
  `Linear`, `Embedding`, `Dropout`, `LockedDropout`, and any nesting of these
  with the above): the same kind of archive with a ``"__fastrnn_tree__"`` JSON
  header describing the module tree (class and constructor arguments of every
  leaf, names of every child, the training mode) and one array per entry of
  ``state_dict()``. `fastrnn.save` writes this layout for a composite, and
  `fastrnn.load` reads it back in the mode it was saved in.

A fastrnn language-model checkpoint (``fastrnn train --save``) is accepted
by `load_model` too (its model is rebuilt).

No dask here: `fastrnn.dask` imports this, never the other way round.
"""

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections import OrderedDict

import numpy as np

from fastrnn import io as fio
from fastrnn._atomic import replacing
from fastrnn.lm import RNNLanguageModel
from fastrnn.modules.module import Module, ParameterBudgetError, parameter_budget
from fastrnn.nn import Dropout, Embedding, Linear, LockedDropout, ModuleList, Sequential
from fastrnn.wrappers import Recurrent

__all__ = ["to_bytes", "from_bytes", "save_model", "load_model", "digest"]

TREE_KEY = "__fastrnn_tree__"
TREE_FORMAT, TREE_VERSION = "fastrnn-tree", 1

# leaves that fastrnn.save does not (yet) register: class -> (name, config getter)
_LEAVES = {
    "RNNLanguageModel": (RNNLanguageModel, lambda m: m.config()),
    "Linear": (Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                      bias=m.bias is not None, dtype=m.weight.dtype.name)),
    "Embedding": (Embedding, lambda m: dict(num_embeddings=m.num_embeddings,
                                            embedding_dim=m.embedding_dim,
                                            padding_idx=m.padding_idx,
                                            dtype=m.weight.dtype.name)),
    "Dropout": (Dropout, lambda m: dict(p=m.p)),
    "LockedDropout": (LockedDropout, lambda m: dict(p=m.p)),
}
# a wrapper: its one child ("rnn") and its own settings
_RECURRENT_CONFIG = ("return_sequences", "return_state", "go_backwards")
_CONTAINERS = {"Sequential": Sequential, "ModuleList": ModuleList}


def digest(data):
    """SHA-256 hex digest of bytes (the cache key on the workers)."""
    return hashlib.sha256(data).hexdigest()


def _saveable(module):
    return fio._REGISTRY.get(type(module).__name__) is type(module)


def to_bytes(module):
    """The module (class, configuration, parameters, training mode) as bytes."""
    if not isinstance(module, Module):
        raise TypeError(f"expected a fastrnn Module, got {type(module).__name__}")
    if _saveable(module):
        with tempfile.TemporaryDirectory(prefix="fastrnn-") as d:
            path = os.path.join(d, "model.npz")
            fio.save(path, module)
            with open(path, "rb") as f:
                return f.read()
    tree = _describe(module, "")
    arrays = {TREE_KEY: np.array([json.dumps(dict(format=TREE_FORMAT, version=TREE_VERSION,
                                                  tree=tree,
                                                  training=bool(module.training)))])}
    arrays.update(module.state_dict())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _describe(module, where):
    name = type(module).__name__
    if _saveable(module):
        return {"class": name, "config": module.config()}
    if name in _LEAVES and type(module) is _LEAVES[name][0]:
        return {"class": name, "config": _LEAVES[name][1](module)}
    if name in _CONTAINERS and type(module) is _CONTAINERS[name]:
        return {"class": name,
                "children": [[k, _describe(m, f"{where}.{k}" if where else k)]
                             for k, m in module.named_children()]}
    if type(module) is Recurrent:
        return {"class": name, "config": {k: getattr(module, k) for k in _RECURRENT_CONFIG},
                "children": [["rnn", _describe(module.rnn, f"{where}.rnn" if where else "rnn")]]}
    known = sorted(set(fio._REGISTRY) | set(_LEAVES) | set(_CONTAINERS) | {"Recurrent"})
    at = f" (at {where!r})" if where else ""
    raise ValueError(f"cannot serialise {name}{at}: known classes are {', '.join(known)}; "
                     f"register a class with a config() method with fastrnn.io.register")


def _build(node):
    if not isinstance(node, dict) or "class" not in node:
        raise ValueError(f"bad tree node {node!r}")
    name = node["class"]
    if name == "Recurrent":
        children = node.get("children")
        config = node.get("config") or {}
        if (not isinstance(children, list) or len(children) != 1 or children[0][0] != "rnn"
                or not isinstance(config, dict) or set(config) - set(_RECURRENT_CONFIG)
                or not all(isinstance(v, bool) for v in config.values())):
            raise ValueError(f"bad Recurrent node {node!r}")
        return Recurrent(_build(children[0][1]), **config)
    if "children" in node:
        cls = _CONTAINERS.get(name)
        if cls is None:
            raise ValueError(f"unknown container class {name!r}")
        spec = node["children"]
        if not isinstance(spec, list) or not all(
                isinstance(c, (list, tuple)) and len(c) == 2 for c in spec):
            raise ValueError(f"{name}: children must be a list of [name, node] pairs")
        probe = cls()
        for k, _ in spec:
            # a module's own attributes (_parameters, training, forward, ...) are not
            # child names; Sequential's own rule (_check_name), for both containers
            if (not isinstance(k, str) or not k or "." in k or hasattr(probe, k)):
                raise ValueError(f"{name}: bad child name {k!r}")
        if len({k for k, _ in spec}) != len(spec):
            raise ValueError(f"{name}: a child name given twice")
        children = OrderedDict((k, _build(child)) for k, child in spec)
        if cls is Sequential:
            return Sequential(children)
        m = ModuleList()
        for k, child in children.items():
            setattr(m, k, child)
        return m
    cls = fio._REGISTRY.get(name) or (_LEAVES[name][0] if name in _LEAVES else None)
    if cls is None:
        raise ValueError(f"unknown class {name!r}")
    config = node.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{name}: config must be an object, got {type(config).__name__}")
    wrong = fio._config_type_errors(cls, config)
    if wrong:
        raise ValueError(f"{name} config: " + "; ".join(wrong))
    with fio.built_to_be_loaded(cls):        # (from_bytes loads every parameter after)
        return cls(**config)


def from_bytes(data, what="model bytes", keep_mode=False):
    """Rebuild a module from `to_bytes` output: in eval mode (what scoring runs), or
    with keep_mode in the mode it was saved in (fastrnn.load). ValueError if invalid."""
    data = bytes(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            bad = zf.testzip()
    except zipfile.BadZipFile as e:
        raise ValueError(f"{what}: not a fastrnn model archive ({e})") from None
    if bad is not None:
        raise ValueError(f"{what}: corrupted archive: member {bad!r} fails its CRC-32 check")
    problem = fio.members_problem(names)
    if problem:
        raise ValueError(f"{what}: {problem}")
    if TREE_KEY + ".npy" not in names:
        if "meta.npy" in names:        # a language-model checkpoint
            return _from_checkpoint(data, what)
        with tempfile.TemporaryDirectory(prefix="fastrnn-") as d:
            path = os.path.join(d, "model.npz")
            with open(path, "wb") as f:
                f.write(data)
            try:
                m = fio.load(path)
                return m if keep_mode else m.eval()
            except ValueError as e:
                raise ValueError(str(e).replace(repr(path), what)) from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop(TREE_KEY).reshape(-1)[0]))
    except Exception as e:
        raise ValueError(f"{what}: corrupted model archive ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != TREE_FORMAT:
        raise ValueError(f"{what}: not a fastrnn model tree")
    if meta.get("version") != TREE_VERSION:
        raise ValueError(f"{what}: unsupported model tree version {meta.get('version')!r}")
    stored = sum(a.size for a in arrays.values())
    try:
        with parameter_budget(fio.budget_for(stored)):
            module = _build(meta.get("tree"))
    except ParameterBudgetError:
        raise ValueError(f"{what}: the model tree declares more parameter values than the "
                         f"{stored} stored") from None
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as e:
        raise ValueError(f"{what}: invalid model tree ({type(e).__name__}: {e})") from None
    own = dict(module.named_parameters(remove_duplicate=False))
    wrong = [f"{k}: expected {p.dtype}, got {arrays[k].dtype}"
             for k, p in own.items() if k in arrays and arrays[k].dtype != p.dtype]
    if wrong:
        raise ValueError(f"{what}: wrong dtypes: " + "; ".join(wrong))
    try:
        module.load_state_dict(arrays)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    training = meta.get("training", False)
    if not keep_mode or not isinstance(training, bool):
        training = False
    return module.train(training)


def _from_checkpoint(data, what):
    from fastrnn.checkpoint import CheckpointError, load_checkpoint
    with tempfile.TemporaryDirectory(prefix="fastrnn-") as d:
        path = os.path.join(d, "checkpoint.npz")
        with open(path, "wb") as f:
            f.write(data)
        try:
            return load_checkpoint(path).build_model().eval()
        except CheckpointError as e:
            raise ValueError(str(e).replace(path, what)) from None


def save_model(path, module):
    """Write `to_bytes(module)` to `path` (via a temporary name, then renamed)."""
    data = to_bytes(module)
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def load_model(path):
    """Read a model written by `save_model`, `fastrnn.save` or `fastrnn train --save`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return from_bytes(data, what=path)
