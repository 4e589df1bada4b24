"""Small files that declare huge models are refused before the memory is taken:
every loader builds its module under a parameter budget from the values the file
stores (fastrnn.io.budget_for), and the ONNX importer folds no constant over
FOLD_MAX_VALUES values. Each case would otherwise allocate gigabytes."""

import io
import json
import tracemalloc

import numpy as np
import pytest

import fastrnn
from fastrnn import _modelfile
from fastrnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastrnn.modules.module import ParameterBudgetError, charge_values, parameter_budget


def peak_mb(fn):
    """fn() under tracemalloc (NumPy reports its arrays to it): the peak, in MB, of
    memory taken during the call, whatever the process took before."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_budget_counts_every_array_and_is_per_block():
    with parameter_budget(10):
        charge_values((2, 3))
        with pytest.raises(ParameterBudgetError):
            charge_values((5,))
    charge_values((10 ** 6, 10 ** 6))        # no budget outside a block: nothing counted
    with pytest.raises(ParameterBudgetError), parameter_budget(100):
        fastrnn.LSTM(10, 10)                  # 2 x 880 values


def test_module_tree_declaring_a_huge_embedding():
    tree = {"format": "fastrnn-tree", "version": 1,
            "tree": {"class": "Sequential", "children": [
                ["0", {"class": "Embedding", "config": {"num_embeddings": 200000,
                                                        "embedding_dim": 1000}}]]}}
    buf = io.BytesIO()
    np.savez(buf, __fastrnn_tree__=np.array([json.dumps(tree)]))
    def load():
        with pytest.raises(ValueError, match="declares more parameter values than the 0 stored"):
            _modelfile.from_bytes(buf.getvalue())
    assert peak_mb(load) < 64                 # not the 0.8-1.6 GB the table would take


@pytest.mark.parametrize("children", [
    [["_parameters", {"class": "Dropout", "config": {}}]],      # a module's own attribute
    [["forward", {"class": "Dropout", "config": {}}]],
    [["a.b", {"class": "Dropout", "config": {}}]],
    [[7, {"class": "Dropout", "config": {}}]],
    [["training", {"class": "Dropout", "config": {}}]],           # an instance attribute
    [["0", {"class": "Dropout", "config": {}}], ["0", {"class": "Dropout", "config": {}}]],
    [["0"]],                                                     # not a [name, node] pair
    {"0": {"class": "Dropout"}}])
def test_module_tree_with_bad_child_names_is_a_value_error(children):
    """A container's child named like one of a module's own attributes (an audit
    found AttributeError from deep inside), or not a name at all."""
    for container in ("Sequential", "ModuleList"):
        tree = {"format": "fastrnn-tree", "version": 1,
                "tree": {"class": container, "children": children}}
        buf = io.BytesIO()
        np.savez(buf, __fastrnn_tree__=np.array([json.dumps(tree)]))
        with pytest.raises(ValueError, match="children must be|bad child name|given twice"):
            _modelfile.from_bytes(buf.getvalue())


def test_a_child_name_sequential_takes_loads(tmp_path):
    """What Sequential accepts (a name starting with '_' included) saves and loads."""
    from collections import OrderedDict
    m = fastrnn.nn.Sequential(OrderedDict(_head=fastrnn.nn.Dropout(0.1),
                                          body=fastrnn.nn.Linear(2, 3)))
    fastrnn.save(tmp_path / "s.npz", m)
    back = fastrnn.load(tmp_path / "s.npz")
    assert [k for k, _ in back.named_children()] == ["_head", "body"]


def test_checkpoint_declaring_a_huge_model(tmp_path):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, fastrnn.RNNLanguageModel(5, 2, 2, 1, "lstm", 0.0, np.float32, 0))
    ck = load_checkpoint(path)
    ck.model_config = dict(ck.model_config, hidden_size=8000, num_layers=3)
    def build():
        with pytest.raises(CheckpointError, match="declares more parameter values"):
            ck.build_model()
    assert peak_mb(build) < 64


def _onnx_model(tmp_path, nodes, inits, out_type):
    onnx = pytest.importorskip("onnx")
    from onnx import helper
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(
        "y", out_type, None)], initializer=inits)
    path = str(tmp_path / "m.onnx")
    onnx.save_model(helper.make_model(graph), path)
    return path


def _onnx_cases():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    n = 6000
    yield ("ConstantOfShape",
           [helper.make_node("ConstantOfShape", ["s"], ["y"], value=helper.make_tensor(
               "v", TensorProto.DOUBLE, [1], [1.0]))],
           [helper.make_tensor("s", TensorProto.INT64, [2], [20000, 20000])], TensorProto.DOUBLE)
    col = helper.make_tensor("a", TensorProto.DOUBLE, [n, 1], np.ones(n))
    row = helper.make_tensor("b", TensorProto.DOUBLE, [1, n], np.ones(n))
    for op in ("Add", "Mul", "MatMul"):     # (n, 1) with (1, n): n^2 values from 2n
        yield op, [helper.make_node(op, ["a", "b"], ["y"])], [col, row], TensorProto.DOUBLE
    ids = helper.make_tensor("i", TensorProto.INT64, [n], np.zeros(n, np.int64))
    yield ("Gather", [helper.make_node("Gather", ["b", "i"], ["y"], axis=0)], [row, ids],
           TensorProto.DOUBLE)
    vec = helper.make_tensor("c", TensorProto.DOUBLE, [1 << 20], np.zeros(1 << 20))
    yield ("Concat", [helper.make_node("Concat", ["c"] * 20, ["y"], axis=0)], [vec],
           TensorProto.DOUBLE)


@pytest.mark.parametrize("case", range(6))
def test_onnx_folds_no_huge_constant(tmp_path, case):
    """A model of a few KB whose constants would fold into 2^25 to 2^29 values."""
    from fastrnn import onnx as fonnx
    op, nodes, inits, out_type = list(_onnx_cases())[case]
    path = _onnx_model(tmp_path, nodes, inits, out_type)
    def load():
        with pytest.raises(ValueError, match=rf"op {op}\): a constant of shape .* at most "):
            fonnx.load(path)
    peak = peak_mb(load)
    assert peak < 64, f"{op}: {peak:.0f} MB taken before the refusal"
