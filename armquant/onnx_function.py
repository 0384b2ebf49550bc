"""`armquant::ARM` as an ONNX function built from standard ops (the fallback for the custom op).

Every exported model embeds this FunctionProto (domain `armquant`, name `ARM`). ONNX Runtime
runs an `armquant::ARM` node with the registered kernel when our custom-op library is loaded,
and otherwise inlines this function, so the graph also runs on a plain ONNX Runtime, in the
ONNX checker and in ONNX Runtime's quantization tools.

The body follows docs/arm-op-spec.md step by step and is bit-exact with `arm_reference` for
float32 input (tested): the sorts are TopK, which the ONNX spec makes break ties by lower
index (step 7); the float64 steps are float64 ops; Philox4x32-10 runs on int64 tensors that
hold uint32 words, with each 32x32-bit product split in 16-bit halves so no int64 product
overflows (as `armquant.arm._mulhilo32` does).

Attributes are referenced, not baked in: floats and the seed through `Constant(value_*=@attr)`,
and the three string attributes by comparing `Constant(value_string=@attr)` with their
choices. `scope` only changes the number of groups G (1, B or B*S) the elements are reshaped
into; `share` and `percentile_of` compute both branches and select one with `Where`.

Where it can differ from the kernel:
- the optional inputs `mask` and `positions` are required by the function (an export always
  wires both); a node without them needs the custom-op library;
- float16/bfloat16 outputs are produced by `CastLike` from float32, which ONNX Runtime rounds
  to nearest even as the spec asks; only float32 is tested bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "armquant"
OP_NAME = "ARM"
MIN_OPSET = 19  # standard-op opset the body needs (Equal on strings: 19; BitwiseXor: 18)

ATTRIBUTES = ("c", "p1", "k", "pmin", "pmax", "kappa", "share", "percentile_of", "scope", "seed")

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


class _Body:
    """Collects the nodes of a function body; each op call returns its output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [f"_{op_type.lower()}{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=None) -> str:
        if isinstance(value, str):
            return self.op("Constant", value=helper.make_tensor("v", TensorProto.STRING, [], [value.encode()]))
        array = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=helper.make_tensor("v", helper.np_dtype_to_tensor_dtype(array.dtype),
                                                            array.shape, array.flatten().tolist()))

    def attr(self, name: str, kind: str) -> str:
        """A scalar Constant holding the node's attribute `name` (kind: float, int, string)."""
        node = helper.make_node("Constant", [], [f"_attr_{name}{self._count}"])
        self._count += 1
        ref = helper.make_attribute_ref(f"value_{kind}", {"float": onnx.AttributeProto.FLOAT,
                                                           "int": onnx.AttributeProto.INT,
                                                           "string": onnx.AttributeProto.STRING}[kind])
        ref.ref_attr_name = name
        node.attribute.append(ref)
        self.nodes.append(node)
        return node.output[0]


def _mulhilo32(b: _Body, a: str, m: int) -> tuple[str, str]:
    """High and low words of a * m for uint32 values a (int64) and a 32-bit constant m."""
    low_part = b.op("Mul", a, b.const(m & 0xFFFF, np.int64))  # < 2**48
    high_part = b.op("Mul", a, b.const(m >> 16, np.int64))  # < 2**48
    shifted = b.op("Mul", b.op("BitwiseAnd", high_part, b.const(0xFFFF, np.int64)), b.const(1 << 16, np.int64))
    s = b.op("Add", low_part, shifted)  # < 2**49, non-negative: Div is a right shift
    hi = b.op("Add", b.op("Div", high_part, b.const(1 << 16, np.int64)), b.op("Div", s, b.const(1 << 32, np.int64)))
    lo = b.op("BitwiseAnd", s, b.const(_MASK32, np.int64))
    return hi, lo


def _philox_word0(b: _Body, c0: str, c1: str, c2: str, c3: str, k0: str, k1: str) -> str:
    """First output word of Philox4x32-10 for int64 tensors holding uint32 words."""
    mask = b.const(_MASK32, np.int64)
    for round_ in range(10):
        if round_:
            k0 = b.op("BitwiseAnd", b.op("Add", k0, b.const(_PHILOX_W[0], np.int64)), mask)
            k1 = b.op("BitwiseAnd", b.op("Add", k1, b.const(_PHILOX_W[1], np.int64)), mask)
        hi0, lo0 = _mulhilo32(b, c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(b, c2, _PHILOX_M[1])
        c0, c1, c2, c3 = (
            b.op("BitwiseXor", b.op("BitwiseXor", hi1, c1), k0),
            lo1,
            b.op("BitwiseXor", b.op("BitwiseXor", hi0, c3), k1),
            lo0,
        )
    return c0


def arm_function(opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The FunctionProto `armquant.ARM(X, mask, positions) -> Y` with the spec's attributes.

    `opset`: the standard-op opset of the model it goes into (ONNX Runtime wants a function's
    opset imports to agree with its model's); at least MIN_OPSET.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"the ARM function needs standard opset >= {MIN_OPSET}; got {opset}: export with a newer opset")
    b = _Body()
    i64, f32, f64 = np.int64, np.float32, np.float64
    zero, one = b.const([0], i64), b.const([1], i64)

    # Shapes: X is [B, S, I] or [S, I]; work on X3 = [B, S, I].
    shape = b.op("Shape", "X")
    n_total = b.op("Size", "X")
    size_i = b.op("Shape", "X", start=-1)  # [I]
    size_s = b.op("Shape", "X", start=-2, end=-1)  # [S]
    size_b = b.op("Div", b.op("Reshape", n_total, one), b.op("Mul", size_s, size_i))  # [B]
    shape_bs1 = b.op("Concat", size_b, size_s, one, axis=0)

    xf = b.op("Cast", "X", to=TensorProto.FLOAT)  # widening is exact
    token_valid = b.op("Reshape", b.op("Cast", "mask", to=TensorProto.BOOL), shape_bs1)
    finite = b.op("Not", b.op("Or", b.op("IsNaN", xf), b.op("IsInf", xf)))
    valid = b.op("Reshape", b.op("And", finite, token_valid), b.op("Concat", size_b, size_s, size_i, axis=0))

    # Groups by scope: G = 1 ("tensor"), B ("sequence") or B*S ("token").
    scope = b.attr("scope", "string")
    groups = b.op("Where", b.op("Equal", scope, b.const("tensor")), one,
                  b.op("Where", b.op("Equal", scope, b.const("sequence")), size_b, b.op("Mul", size_b, size_s)))
    group_shape = b.op("Concat", groups, b.const([-1], i64), axis=0)
    xg = b.op("Reshape", xf, group_shape)  # [G, L], flat index order kept
    vg = b.op("Reshape", valid, group_shape)
    length = b.op("Shape", xg, start=1)  # [L]
    inf = b.const(np.inf, f32)

    n_valid = b.op("ReduceSum", b.op("Cast", vg, to=TensorProto.INT64), one, keepdims=1)  # N: [G, 1]
    rank = b.op("Max", b.op("Div", b.op("Sub", n_valid, b.const(1, i64)), b.const(2, i64)), b.const(0, i64))

    a = b.op("Where", vg, b.op("Abs", xg), inf)  # invalid -> +inf: sorts last
    a_sorted, order = b.op("TopK", a, length, axis=1, largest=0, sorted=1, outputs=2)  # ties: lower index first
    median = b.op("GatherElements", a_sorted, rank, axis=1)  # [G, 1]
    deviation = b.op("Where", vg, b.op("Abs", b.op("Sub", a, median)), inf)
    deviation_sorted, _ = b.op("TopK", deviation, length, axis=1, largest=0, sorted=1, outputs=2)
    mad = b.op("GatherElements", deviation_sorted, rank, axis=1)
    eps = b.op("Mul", b.op("Mul", b.attr("kappa", "float"), mad), b.attr("c", "float"))  # float32 products

    # Share of elements moved, in float64.
    n64 = b.op("Cast", n_valid, to=TensorProto.DOUBLE)
    near_zero = b.op("Cast", b.op("ReduceSum", b.op("Cast", b.op("Less", a, eps), to=TensorProto.INT64), one, keepdims=1),
                     to=TensorProto.DOUBLE)
    as_f64 = lambda name: b.op("Cast", b.attr(name, "float"), to=TensorProto.DOUBLE)  # noqa: E731
    frac_mad = b.op("Min", b.op("Max", b.op("Div", b.op("Mul", as_f64("k"), near_zero), n64), as_f64("pmin")), as_f64("pmax"))
    frac_fixed = b.op("Min", b.op("Max", as_f64("c"), b.const(0.0, f64)), b.const(1.0, f64))
    frac = b.op("Where", b.op("Equal", b.attr("share", "string"), b.const("mad")), frac_mad, frac_fixed)
    n_moved = b.op("Max", b.op("Cast", b.op("Round", b.op("Mul", frac, n64)), to=TensorProto.INT64), b.const(1, i64))
    n_moved = b.op("Where", b.op("Greater", n_valid, b.const(0, i64)), b.op("Min", n_moved, n_valid), b.const(0, i64))

    # Selection: the first n in (a, flat index) order, scattered back to flat positions.
    arange_l = b.op("Unsqueeze", b.op("Range", b.const(0, i64), b.op("Squeeze", length, zero), b.const(1, i64)), zero)
    selected_sorted = b.op("Less", arange_l, n_moved)  # [G, L]
    unselected = b.op("Expand", b.const(False, np.bool_), b.op("Shape", xg))
    selected = b.op("ScatterElements", unselected, order, selected_sorted, axis=1)

    # Qp: the p1-th percentile by linear interpolation, in float64, rounded to float32.
    signed_sorted, _ = b.op("TopK", b.op("Where", vg, xg, inf), length, axis=1, largest=0, sorted=1, outputs=2)
    pool = b.op("Where", b.op("Equal", b.attr("percentile_of", "string"), b.const("abs")), a_sorted, signed_sorted)
    h = b.op("Div", b.op("Mul", b.op("Sub", n64, b.const(1.0, f64)), as_f64("p1")), b.const(100.0, f64))
    lo = b.op("Floor", h)
    lo_index = b.op("Max", b.op("Cast", lo, to=TensorProto.INT64), b.const(0, i64))
    last = b.op("Max", b.op("Sub", n_valid, b.const(1, i64)), b.const(0, i64))
    hi_index = b.op("Min", b.op("Add", lo_index, b.const(1, i64)), last)
    v_lo = b.op("Cast", b.op("GatherElements", pool, lo_index, axis=1), to=TensorProto.DOUBLE)
    v_hi = b.op("Cast", b.op("GatherElements", pool, hi_index, axis=1), to=TensorProto.DOUBLE)
    q_p = b.op("Cast", b.op("Add", v_lo, b.op("Mul", b.op("Sub", h, lo), b.op("Sub", v_hi, v_lo))), to=TensorProto.FLOAT)
    m_neg = b.op("Abs", b.op("ReduceMin", b.op("Where", vg, xg, inf), one, keepdims=1))

    positive = b.op("GreaterOrEqual", xg, b.const(0.0, f32))  # -0.0 counts as positive
    scale = b.op("Where", positive, q_p, m_neg)  # [G, L]
    sign = b.op("Where", positive, b.const(1.0, f32), b.const(-1.0, f32))

    # Draw u only for the selected elements (at most pmax of them).
    flat = b.op("Reshape", b.op("NonZero", b.op("Reshape", selected, b.const([-1], i64))), b.const([-1], i64))  # [K]
    token = b.op("Div", flat, size_i)
    channel = b.op("Mod", flat, size_i)
    position = b.op("Gather", b.op("Reshape", b.op("Cast", "positions", to=TensorProto.INT64), b.const([-1], i64)), token)
    mask32 = b.const(_MASK32, i64)
    # 64-bit two's complement words: floor division by 2**32 is an arithmetic right shift.
    pos_lo = b.op("BitwiseAnd", position, mask32)
    pos_hi = b.op("BitwiseAnd", b.op("Div", b.op("Sub", position, pos_lo), b.const(1 << 32, i64)), mask32)
    seed = b.attr("seed", "int")
    key0 = b.op("BitwiseAnd", seed, mask32)
    key1 = b.op("Div", seed, b.const(1 << 32, i64))  # seed in [0, 2**63)
    word = _philox_word0(b, channel, pos_lo, pos_hi, b.const(0, i64), key0, key1)
    u = b.op("Mul", b.op("Cast", b.op("Div", word, b.const(256, i64)), to=TensorProto.FLOAT), b.const(2.0**-24, f32))

    flat_scale = b.op("Gather", b.op("Reshape", scale, b.const([-1], i64)), flat)
    flat_sign = b.op("Gather", b.op("Reshape", sign, b.const([-1], i64)), flat)
    moved = b.op("CastLike", b.op("Mul", flat_sign, b.op("Mul", u, flat_scale)), "X")
    y_flat = b.op("ScatterElements", b.op("Reshape", "X", b.const([-1], i64)), flat, moved, axis=0)
    b.nodes.append(helper.make_node("Reshape", [y_flat, shape], ["Y"]))

    function = helper.make_function(
        DOMAIN, OP_NAME, ["X", "mask", "positions"], ["Y"], b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=[],
    )
    defaults = dict(c=0.13, p1=99.5, k=1.0, pmin=0.02, pmax=0.25, kappa=1.4826, share="mad",
                    percentile_of="signed", scope="sequence", seed=0)
    function.attribute_proto.extend(helper.make_attribute(name, defaults[name]) for name in ATTRIBUTES)
    return function


def arm_node(inputs: list[str], outputs: list[str], config, name: str = "") -> onnx.NodeProto:
    """An `armquant::ARM` node carrying `config`'s attributes (an armquant.arm.ARMConfig)."""
    return helper.make_node(OP_NAME, inputs, outputs, name=name or None, domain=DOMAIN, **config.to_dict())
