"""The ONNX function for armquant::ARM, run by a plain ONNX Runtime, against arm_reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from armquant.arm import PRESETS, ARMConfig, arm_reference
from armquant.onnx_function import MIN_OPSET, arm_function, arm_node


def single_node_model(config: ARMConfig, rank: int = 3, opset: int = MIN_OPSET) -> onnx.ModelProto:
    dims = ["B", "S", "I"][3 - rank:]
    graph = helper.make_graph(
        [arm_node(["X", "mask", "positions"], ["Y"], config)], "arm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims),
         helper.make_tensor_value_info("mask", TensorProto.INT64, dims[:-1]),
         helper.make_tensor_value_info("positions", TensorProto.INT64, dims[:-1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("armquant", 1)],
                              functions=[arm_function(opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run_function(config: ARMConfig, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(single_node_model(config, x.dim()).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x.numpy(), "mask": mask.numpy(), "positions": positions.numpy()})[0]


def awkward_input(seed: int, shape=(3, 7, 40)):
    """Random activations with NaN, exact zeros of both signs, ties, and a padded row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[0, 1, 3] = float("nan")
    x[1, 2, :6] = 0.0
    x[2, 0, 5] = -0.0
    x[2, 3, :8] = 0.25  # ties in |x|, broken by flat index
    x[0, 4, 1] = float("inf")
    mask = torch.ones(shape[:2], dtype=torch.int64)
    mask[1, :2] = 0  # left padding
    positions = torch.arange(shape[1])[None] + torch.tensor([[0], [2**33 + 7], [5]])  # > 32 bits in row 1
    return x, mask, positions.long()


def assert_bitwise_equal(actual: np.ndarray, expected: torch.Tensor):
    assert np.array_equal(actual.view(np.int32), expected.numpy().view(np.int32)), (
        f"{int((actual.view(np.int32) != expected.numpy().view(np.int32)).sum())} elements differ"
    )


CONFIGS = {
    **PRESETS,
    "token": ARMConfig(scope="token", seed=2**40 + 5),
    "tensor": ARMConfig(scope="tensor", seed=3),
    "fixed-signed": ARMConfig(share="fixed", c=0.4, percentile_of="signed", p1=0.0),
    "p1-100": ARMConfig(p1=100.0, pmin=0.0, pmax=1.0, k=3.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_function_is_bit_exact_with_reference(name):
    config = CONFIGS[name]
    x, mask, positions = awkward_input(0)
    expected = arm_reference(x, mask, positions, config)
    actual = run_function(config, x, mask, positions)
    assert_bitwise_equal(actual, expected)
    assert not np.array_equal(np.nan_to_num(actual), np.nan_to_num(x.numpy())), "ARM changed nothing"


@pytest.mark.parametrize("seed", range(4))
def test_function_matches_reference_on_random_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    shape = tuple(int(v) for v in torch.randint(1, 9, (3,), generator=g))
    x = torch.randn(*shape, generator=g) * 3
    mask = (torch.rand(shape[:2], generator=g) > 0.2).long()
    positions = torch.randint(0, 2**40, shape[:2], generator=g)
    config = ARMConfig(scope=["tensor", "sequence", "token"][seed % 3], seed=seed * 977)
    assert_bitwise_equal(run_function(config, x, mask, positions), arm_reference(x, mask, positions, config))


def test_function_accepts_rank_two_input():
    x, mask, positions = awkward_input(1, shape=(3, 9, 16))
    config = PRESETS["llama-3.1"]
    actual = run_function(config, x[2], mask[2], positions[2])
    assert_bitwise_equal(actual, arm_reference(x[2], mask[2], positions[2], config))


def test_fully_masked_input_passes_through():
    x = torch.randn(2, 4, 8)
    mask = torch.zeros(2, 4, dtype=torch.int64)
    actual = run_function(ARMConfig(), x, mask, torch.zeros(2, 4, dtype=torch.int64))
    assert_bitwise_equal(actual, x)


def test_function_needs_opset_19():
    with pytest.raises(ValueError, match="opset >= 19"):
        arm_function(18)


def executed_ops(model: onnx.ModelProto, options: ort.SessionOptions, feed: dict) -> set:
    """Op types ONNX Runtime actually ran, from its profile."""
    import json
    import os

    options.enable_profiling = True
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    profile = session.end_profiling()
    try:
        events = json.load(open(profile))
    finally:
        os.unlink(profile)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_registered_kernel_takes_over_the_function(tmp_path):
    """A node with both a model-local function and a registered kernel runs the kernel."""
    from armquant import onnx as aox

    library = aox.library_path(aox.LIBRARY_AUTO)
    if library is None:
        pytest.skip("the ARM custom-op library is not built")
    config = PRESETS["llama-3.1"]
    x, mask, positions = awkward_input(3, shape=(3, 16, 256))
    feed = {"X": x.numpy(), "mask": mask.numpy(), "positions": positions.numpy()}
    model = single_node_model(config)
    options = aox.session_options(aox.LIBRARY_AUTO)
    options.profile_file_prefix = str(tmp_path / "with-library")
    assert executed_ops(model, options, feed) == {"ARM"}
    options = aox.session_options(aox.LIBRARY_NONE)
    options.profile_file_prefix = str(tmp_path / "function")
    assert "ARM" not in executed_ops(model, options, feed)
    with_library = ort.InferenceSession(model.SerializeToString(), aox.session_options(aox.LIBRARY_AUTO),
                                        providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert_bitwise_equal(with_library, arm_reference(x, mask, positions, config))
