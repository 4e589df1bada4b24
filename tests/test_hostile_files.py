"""Small files that declare huge models are refused before the memory is taken:
every loader builds its module under a parameter budget from the values the file
stores (fastrnn.io.budget_for), and the ONNX importer folds no constant over
FOLD_MAX_VALUES values. Each case would otherwise allocate gigabytes."""

import io
import json
import resource

import numpy as np
import pytest

import fastrnn
from fastrnn import _modelfile
from fastrnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastrnn.modules.module import ParameterBudgetError, charge_values, parameter_budget


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    before = peak_rss_mb()
    with pytest.raises(ValueError, match="declares more parameter values than the 0 stored"):
        _modelfile.from_bytes(buf.getvalue())
    assert peak_rss_mb() - before < 200       # not the 0.8-1.6 GB the table would take


def test_checkpoint_declaring_a_huge_model(tmp_path):
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, fastrnn.RNNLanguageModel(5, 2, 2, 1, "lstm", 0.0, np.float32, 0))
    ck = load_checkpoint(path)
    ck.model_config = dict(ck.model_config, hidden_size=8000, num_layers=3)
    before = peak_rss_mb()
    with pytest.raises(CheckpointError, match="declares more parameter values"):
        ck.build_model()
    assert peak_rss_mb() - before < 200


def test_onnx_constant_of_a_huge_shape(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from fastrnn import onnx as fonnx
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [20000, 20000])
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"],
                            value=helper.make_tensor("v", TensorProto.DOUBLE, [1], [1.0]))
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info(
        "y", TensorProto.DOUBLE, None)], initializer=[shape])
    path = str(tmp_path / "m.onnx")
    onnx.save_model(helper.make_model(graph), path)
    before = peak_rss_mb()
    with pytest.raises(ValueError, match=r"a constant of shape \[20000, 20000\]"):
        fonnx.load(path)
    assert peak_rss_mb() - before < 200
