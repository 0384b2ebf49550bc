"""The ONNX Runtime custom op ARM (domain armquant) against the reference, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from armquant import _native
from armquant.arm import PRESETS, ARMConfig, arm_reference

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

try:
    LIBRARY = _native.ort_library_path()
except FileNotFoundError as error:
    pytest.skip(f"custom-op library not built: {error}", allow_module_level=True)

ELEM = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def session(x_type=TensorProto.FLOAT, mask_type=None, positions=False, x_dims=("B", "S", "I"), token_dims=("B", "S"),
            intra_op_threads=0, **attributes):
    """A one-node model Y = ARM(X[, mask][, positions]) with our library registered."""
    inputs = [helper.make_tensor_value_info("X", x_type, list(x_dims) if x_dims is not None else None)]
    names = ["X"]
    if mask_type is not None:
        inputs.append(helper.make_tensor_value_info("mask", mask_type, list(token_dims)))
        names.append("mask")
    elif positions:
        names.append("")  # optional input left out
    if positions:
        inputs.append(helper.make_tensor_value_info("positions", TensorProto.INT64, list(token_dims)))
        names.append("positions")
    node = helper.make_node("ARM", names, ["Y"], domain="armquant", **attributes)
    graph = helper.make_graph([node], "arm", inputs, [helper.make_tensor_value_info("Y", x_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("armquant", 1)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(LIBRARY)
    options.log_severity_level = 4  # the tests read the errors themselves
    options.intra_op_num_threads = intra_op_threads  # 0: ONNX Runtime's default
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def to_numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: ONNX Runtime takes its bits as uint16 through OrtValue.
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def run(sess, x, mask=None, positions=None) -> torch.Tensor:
    feeds = {}
    if x.dtype == torch.bfloat16:
        feeds["X"] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(to_numpy(x), TensorProto.BFLOAT16)
    else:
        feeds["X"] = x.numpy()
    if mask is not None:
        feeds["mask"] = mask.numpy()
    if positions is not None:
        feeds["positions"] = positions.numpy()
    values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    if x.dtype != torch.bfloat16:
        return torch.from_numpy(sess.run_with_ort_values(None, values)[0].numpy().copy())
    # numpy has no bfloat16: bind an output buffer of raw 16-bit words.
    binding = sess.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    out = np.empty(tuple(x.shape), np.uint16)
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out, TensorProto.BFLOAT16))
    sess.run_with_iobinding(binding)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)


def attributes(config: ARMConfig) -> dict:
    return {name: value for name, value in config.to_dict().items()}


def assert_same_bits(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])), (
        f"{(actual.view(BITS[actual.dtype]) != expected.view(BITS[expected.dtype])).sum().item()} elements differ")


@pytest.mark.parametrize("dtype", list(ELEM), ids=str)
@pytest.mark.parametrize("scope", ("tensor", "sequence", "token"))
def test_parity_through_onnx_runtime(dtype, scope):
    gen = torch.Generator().manual_seed(11)
    for config in (ARMConfig(scope=scope), PRESETS["gemma-3"].replace(scope=scope, seed=2**35 + 1)):
        x = torch.randn(3, 7, 45, generator=gen)
        x[0, 0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0, float("-inf")])
        x[1] = torch.round(x[1] * 2) / 2  # ties
        x = x.to(dtype)
        mask = torch.rand(3, 7, generator=gen) < 0.7
        mask[2] = False  # an empty row
        positions = torch.randint(0, 2**40, (3, 7), generator=gen)

        sess = session(ELEM[dtype], **attributes(config))
        assert_same_bits(run(sess, x), arm_reference(x, config=config))
        sess = session(ELEM[dtype], TensorProto.BOOL, positions=True, **attributes(config))
        assert_same_bits(run(sess, x, mask, positions), arm_reference(x, mask, positions, config))
        sess = session(ELEM[dtype], TensorProto.INT64, **attributes(config))
        assert_same_bits(run(sess, x, mask.long()), arm_reference(x, mask.long(), None, config))
        sess = session(ELEM[dtype], positions=True, **attributes(config))
        assert_same_bits(run(sess, x, None, positions), arm_reference(x, None, positions, config))


def test_defaults_are_the_spec_defaults():
    x = torch.randn(2, 9, 130)
    assert_same_bits(run(session(), x), arm_reference(x))


def test_rank_two_input_and_large_group():
    x = torch.randn(3, 50_000)  # 150000 elements in one group: the radix-select path
    sess = session(x_dims=("S", "I"), token_dims=("S",), mask_type=TensorProto.INT64, positions=True)
    mask, positions = torch.tensor([1, 0, 1]), torch.tensor([5, 6, 7])
    assert_same_bits(run(sess, x, mask, positions), arm_reference(x, mask, positions))


@pytest.mark.parametrize("intra_op_threads", (1, 2, 3))
def test_large_groups_on_the_sessions_thread_pool(intra_op_threads):
    # The kernel's threads come from the session's intra-op pool, however many it has; a
    # float32 or float16 group this large takes the sampled path, the bfloat16 one the
    # histogram path.
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(1, 8, 131_072, generator=gen)
    mask = torch.ones(1, 8, dtype=torch.int64)
    mask[0, 3] = 0
    for dtype in (torch.float32, torch.float16):
        sess = session(ELEM[dtype], mask_type=TensorProto.INT64, intra_op_threads=intra_op_threads)
        assert_same_bits(run(sess, x.to(dtype), mask), arm_reference(x.to(dtype), mask))
    x = x[:, :4].to(torch.bfloat16)
    sess = session(ELEM[torch.bfloat16], intra_op_threads=intra_op_threads, **attributes(PRESETS["llama-3.1"]))
    assert_same_bits(run(sess, x), arm_reference(x, config=PRESETS["llama-3.1"]))


# --- bad inputs: an ONNX Runtime error naming the problem, never a crash -------------------


@pytest.mark.parametrize(
    "attrs, message",
    [
        (dict(p1=150.0), r"p1=150 must lie in \[0, 100\]"),
        (dict(scope="row"), "scope='row' must be 'tensor', 'sequence' or 'token'"),
        (dict(share="median"), "share='median' must be 'mad' or 'fixed'"),
        (dict(percentile_of="both"), "percentile_of='both' must be 'signed' or 'abs'"),
        (dict(pmin=0.5, pmax=0.25), "pmin=0.5, pmax=0.25 must satisfy 0 <= pmin <= pmax <= 1"),
        (dict(c=-1.0), "must be >= 0"),
        (dict(c="wide"), "c must be a float attribute"),
        (dict(scope=3), "scope must be a string attribute"),
        (dict(seed=-5), r"seed=-5 must lie in \[0, 2\*\*63\)"),
        (dict(seed=1.5), "seed must be an int attribute"),
        (dict(kappa=float("inf")), "kappa must be a finite number"),
    ],
)
def test_bad_attributes(attrs, message):
    with pytest.raises(Exception, match=message):
        session(**attrs)


def test_wrong_rank():
    sess = session(x_dims=None)  # rank left open so that the op itself sees the input
    with pytest.raises(Exception, match=r"X must have shape \[B, S, I\] or \[S, I\]; got \[4\]"):
        run(sess, torch.randn(4))


def test_wrong_dtype():
    sess = session(TensorProto.DOUBLE)
    with pytest.raises(Exception, match="X must be float32, float16 or bfloat16; got float64"):
        sess.run(None, {"X": np.zeros((1, 2, 3))})


def test_wrong_mask_shape_and_type():
    sess = session(mask_type=TensorProto.BOOL, token_dims=("B2", "S2"))
    with pytest.raises(Exception, match=r"mask must have shape \[2, 3\] to match X \[2, 3, 4\]; got \[3, 2\]"):
        run(sess, torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))
    sess = session(mask_type=TensorProto.FLOAT)
    with pytest.raises(Exception, match="mask must be bool or int64"):
        sess.run(None, {"X": np.zeros((2, 3, 4), np.float32), "mask": np.ones((2, 3), np.float32)})


def test_wrong_positions_shape():
    sess = session(positions=True, token_dims=("B2", "S2"))
    with pytest.raises(Exception, match=r"positions must have shape \[1, 3\]"):
        run(sess, torch.randn(1, 3, 4), None, torch.zeros(1, 4, dtype=torch.int64))


def test_session_still_works_after_an_error():
    sess = session(mask_type=TensorProto.BOOL, token_dims=("B2", "S2"))
    with pytest.raises(Exception):
        run(sess, torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    assert_same_bits(run(sess, x, mask), arm_reference(x, mask))


@pytest.mark.gpu
def test_cuda_execution_provider_matches_reference():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider")
    if not _native.has_cuda():
        pytest.skip("libarmquant_ort.so was built without the CUDA kernel")
    options = ort.SessionOptions()
    options.register_custom_ops_library(LIBRARY)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", "I"]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])]
    node = helper.make_node("ARM", ["X", "mask"], ["Y"], domain="armquant", scope="sequence", seed=3)
    graph = helper.make_graph([node], "arm", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("armquant", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    x = torch.randn(2, 6, 3000)
    mask = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1]])
    y = torch.from_numpy(sess.run(None, {"X": x.numpy(), "mask": mask.numpy()})[0])
    assert_same_bits(y, arm_reference(x, mask, None, ARMConfig(seed=3)))


def test_public_library_path():
    import armquant

    assert armquant.ort_library_path() == LIBRARY
