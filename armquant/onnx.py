"""Export ARM models to ONNX with a KV cache, run them in ONNX Runtime, quantize them there.

An export is a folder that `optimum.onnxruntime.ORTModelForCausalLM` loads as it is:

    model.onnx              the decoder with past; each ARM site is one `armquant::ARM` node
    config.json, generation_config.json, tokenizer files, arm_config.json
    armquant.json           what was exported, and how

A W4A16 checkpoint (RTN or GPTQ, act-order included) exports its own 4-bit codes as ONNX
Runtime's MatMulNBits; other checkpoints export in float32, for `quantize_onnx` to quantize.

The graph has optimum's I/O names: `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key/value` -> `logits`, `present.{i}.key/value`, with past and present
shaped [batch, kv_heads, length, head_dim]. Every model embeds the ONNX function for
`armquant::ARM` (armquant/onnx_function.py), one function whose body reads the node's
attributes, so every ARM site stays an `armquant::ARM` node whatever its settings. ONNX Runtime
runs such a node with the registered kernel when our custom-op library is loaded (checked in
its profile: one `ARM` kernel, no function ops) and otherwise inlines the function, so the graph
also runs on a plain ONNX Runtime, in the ONNX checker and in ONNX Runtime's quantization tools.

The exporter is torch.export + `torch.onnx.export(dynamo=True)`. `torch.ops.armquant.arm`
maps to the ARM node through `custom_translation_table`; the node is declared with an OpSchema
handed to onnxscript (not registered globally) rather than as an onnxscript function, because
the exporter's version pass inlines every function it finds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import torch
from torch import nn

from armquant import runtime
from armquant._io import atomic_dir, write_json
from armquant.onnx_function import ATTRIBUTES, DOMAIN, MIN_OPSET, OP_NAME, arm_function

__all__ = ["export", "export_arm_config", "ort_logits_fn", "ort_evaluate", "quantize_onnx", "parity", "MODEL_FILE"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
INFO_FILE = "armquant.json"

_ARM_DEFAULTS = dict(c=0.13, p1=99.5, k=1.0, pmin=0.02, pmax=0.25, kappa=1.4826, share="mad",
                     percentile_of="signed", scope="sequence", seed=0)


# --- The ARM node for the exporter --------------------------------------------------------


def _arm_schema():
    from onnx import helper
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        OP_NAME, DOMAIN, 1,
        inputs=[param("X", "T"), param("mask", "M", param_option=optional),
                param("positions", "tensor(int64)", param_option=optional)],
        outputs=[param("Y", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("M", ["tensor(bool)", "tensor(int64)", "tensor(int32)"], "attention mask"),
        ],
        attributes=[OpSchema.Attribute(name, helper.make_attribute(name, _ARM_DEFAULTS[name])) for name in ATTRIBUTES],
    )


def _arm_translation():
    """custom_translation_table entry: torch.ops.armquant.arm -> one armquant::ARM node."""
    from onnxscript.values import Op, Opset

    arm_op = Op(Opset(DOMAIN, 1), OP_NAME, _arm_schema())

    def translate(x, mask, positions, c, p1, k, pmin, pmax, kappa, share, percentile_of, scope, seed):
        return arm_op(x, mask, positions, c=c, p1=p1, k=k, pmin=pmin, pmax=pmax, kappa=kappa, share=share,
                      percentile_of=percentile_of, scope=scope, seed=seed)

    return {torch.ops.armquant.arm.default: translate}


# --- The decoder with a flat KV cache -----------------------------------------------------


class DecoderWithPast(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present), flat tensors.

    past/present alternate key, value per layer, each [batch, kv_heads, length, head_dim].
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def _kv_shape(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def _check_exportable(model: nn.Module) -> None:
    from armquant.models import FAMILIES

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"cannot export model type {model_type!r}: armquant exports the decoder-only families "
            f"{sorted(FAMILIES)} (a Llama-style gated MLP that carries ARM)"
        )
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("export a float32 model (load it with dtype=torch.float32); ONNX Runtime "
                         "quantization then makes the smaller variants")


@contextlib.contextmanager
def _float_weights(model: nn.Module):
    """Yields the W4A16 linears of `model` by name while they are swapped, in place, for
    nn.Linear holding their dequantized weights (a copy of the model would lose the hooks that
    feed ARM its mask). The exporter traces the float linears; `_int4_as_matmul_nbits` then puts
    the checkpoint's own codes back into the graph. Other quantized linears cannot be exported."""
    from armquant.quantize import Int4WeightLinear, QuantizedLinear

    int4 = {name: m for name, m in model.named_modules() if isinstance(m, Int4WeightLinear)}
    other = sorted({m.kind for m in model.modules() if isinstance(m, QuantizedLinear) and not isinstance(m, Int4WeightLinear)})
    if other:
        raise ValueError(f"cannot export {', '.join(other)} layers: export a float32 or W4A16 (w4a16-*) checkpoint, "
                         "or quantize the float32 export with `armquant ort-quantize`")
    for name, m in int4.items():
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight.data = m.dequantized_weight(torch.float32)
        if m.bias is not None:
            linear.bias.data = m.bias.float()
        model.set_submodule(name, linear)
    try:
        yield int4
    finally:
        for name, m in int4.items():
            model.set_submodule(name, m)


def _copy(message):
    twin = type(message)()
    twin.CopyFrom(message)
    return twin


def _int4_as_matmul_nbits(proto: onnx.ModelProto, int4: dict, accuracy_level: int = 4) -> int:
    """Replace each MatMul whose weight is a W4A16 linear's dequantized weight with MatMulNBits on
    that linear's codes, scales and zero points (exactly its weights). Act-order linears get a
    Gather that puts the input columns in group order first. Returns how many were replaced."""
    from onnx import helper, numpy_helper

    from armquant.quantize import pack_int4, unpack_int4

    def fingerprint(w: np.ndarray):  # a digest, not the bytes: a large model's weights would not fit twice
        return w.shape, hashlib.blake2b(np.ascontiguousarray(w).tobytes(), digest_size=16).digest()

    by_weight = {fingerprint(m.dequantized_weight(torch.float32).t().numpy()): m for m in int4.values()}
    initializers = {t.name: t for t in proto.graph.initializer}
    nodes, replaced, used = [], 0, set()
    for node in proto.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        m = None
        if weight is not None:
            m = by_weight.get(fingerprint(numpy_helper.to_array(weight)))
        if m is None:
            nodes.append(_copy(node))  # the graph's own messages are cleared with it below
            continue
        codes = unpack_int4(m.qweight)  # [N, Kp]
        g, k, a = m.group_size, m.in_features, node.input[0]
        if m.g_idx is not None:
            # Input columns in group order, so that each group is a block of g columns. GPTQ may
            # put the padding columns anywhere: those read one zero column appended to the input.
            order = torch.argsort(m.g_idx.long(), stable=True)
            codes = codes[:, order]
            if bool((order[:k] >= k).any()):
                padded = f"{node.name}.padded_input"
                proto.graph.initializer.extend([numpy_helper.from_array(np.array([0, 1], np.int64), f"{node.name}.pads"),
                                                numpy_helper.from_array(np.array([-1], np.int64), f"{node.name}.pad_axis")])
                nodes.append(helper.make_node("Pad", [a, f"{node.name}.pads", "", f"{node.name}.pad_axis"], [padded],
                                              name=f"{node.name}_pad"))
                a, k = padded, codes.shape[1]
            gathered = f"{node.name}.permuted_input"
            proto.graph.initializer.append(numpy_helper.from_array(order[:k].clamp(max=m.in_features).numpy().astype(np.int64),
                                                                   f"{node.name}.order"))
            nodes.append(helper.make_node("Gather", [a, f"{node.name}.order"], [gathered], name=f"{node.name}_gather", axis=-1))
            a = gathered
        groups = m.scale.shape[1]
        packed = pack_int4(codes).reshape(m.out_features, groups, g // 2)  # MatMulNBits' nibble order too
        zero = pack_int4(m.zero if groups % 2 == 0 else torch.nn.functional.pad(m.zero, (0, 1)))
        prefix = node.name
        proto.graph.initializer.extend([
            numpy_helper.from_array(packed.numpy(), f"{prefix}.qweight"),
            numpy_helper.from_array(m.scale.float().reshape(-1).numpy(), f"{prefix}.scales"),
            numpy_helper.from_array(zero.reshape(-1).numpy(), f"{prefix}.zero_points"),
        ])
        nodes.append(helper.make_node(
            "MatMulNBits", [a, f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.zero_points"], list(node.output),
            name=f"{node.name}_nbits", domain="com.microsoft", K=k, N=m.out_features, bits=4, block_size=g,
            accuracy_level=accuracy_level))
        used.add(node.input[1])
        replaced += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    still_read = {name for n in proto.graph.node for name in n.input}
    kept = [_copy(t) for t in proto.graph.initializer if t.name not in used or t.name in still_read]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced


def _to_onnx(model: nn.Module) -> onnx.ModelProto:
    """Trace the decoder with past and return the ModelProto with the ARM function embedded."""
    config = model.config
    kv_heads, head_dim = _kv_shape(config)
    batch, seq, past_len = 2, 3, 4  # > 1 each, so torch.export keeps them symbolic
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = tuple(torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * config.num_hidden_layers))
    token_dims = {0: "batch_size", 1: "sequence_length"}
    dynamic_shapes = {
        "input_ids": token_dims,
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": token_dims,
        "past": tuple({0: "batch_size", 2: "past_sequence_length"} for _ in past),
    }
    inputs, outputs = io_names(config.num_hidden_layers)
    with torch.no_grad():
        program = torch.onnx.export(
            DecoderWithPast(model).eval(), (input_ids, attention_mask, position_ids, *past),
            dynamo=True, dynamic_shapes=dynamic_shapes, input_names=inputs, output_names=outputs,
            custom_translation_table=_arm_translation(), verbose=False,
        )
    proto = program.model_proto
    return embed_arm_function(proto)


def embed_arm_function(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Add the `armquant.ARM` function and the armquant opset import to `proto` (in place)."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < MIN_OPSET:
        raise ValueError(f"the graph uses standard opset {opset}; the ARM function needs >= {MIN_OPSET}")
    kept = [f for f in proto.functions if (f.domain, f.name) != (DOMAIN, OP_NAME)]
    del proto.functions[:]
    proto.functions.extend(kept + [arm_function(opset)])
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return proto


def arm_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME]


def _save_proto(proto: onnx.ModelProto, folder: Path) -> None:
    # One file below the 2 GiB protobuf limit; beyond it, weights go to model.onnx_data.
    large = proto.ByteSize() > 1_800_000_000
    onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=large,
                    all_tensors_to_one_file=True, location=MODEL_FILE + "_data")


def _attribute(attribute: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attribute)
    return value.decode() if isinstance(value, bytes) else value


def _versions() -> dict:
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
           accuracy_level: int = 4) -> Path:
    """Export an ARM model (armquant.models.load) to `out_dir` as an ONNX decoder with past.

    A float32 model exports as is. A W4A16 checkpoint (`armquant quantize --scheme w4a16-*`, RTN
    or GPTQ) exports its own codes as MatMulNBits nodes, with `accuracy_level` as in
    `quantize_onnx` (0: float32 compute, the same logits as PyTorch's to about 1e-6).

    Writes model.onnx, the HF config/generation config/tokenizer and arm_config.json atomically:
    `out_dir` appears complete or not at all. An existing `out_dir` is refused unless `overwrite`.
    """
    from armquant.models import ARM_CONFIG_FILE, arm_sites

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output directory or pass overwrite=True (--overwrite)")
    model = model.eval()
    start = time.perf_counter()
    with _float_weights(model) as int4:
        _check_exportable(model)
        proto = _to_onnx(model)
    if int4 and _int4_as_matmul_nbits(proto, int4, accuracy_level) != len(int4):
        raise RuntimeError(f"found {len(int4)} W4A16 linears but not all of their MatMuls in the exported graph")
    sites = arm_sites(model)
    found = len(arm_nodes(proto))
    enabled = sum(1 for s in sites.values() if s.arm.enabled)
    if found != enabled:
        raise RuntimeError(f"the exported graph has {found} ARM nodes but the model has {enabled} enabled ARM sites")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _save_proto(proto, tmp)
        config = model.config
        config.use_cache = True
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        arm_config = getattr(model, "arm_config", None)
        if arm_config is not None:
            (tmp / ARM_CONFIG_FILE).write_text(json.dumps(arm_config.to_dict(), indent=2) + "\n")
        write_json(tmp / INFO_FILE, {
            "format": "decoder-with-past",
            "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "arm_nodes": [{"name": n.name, **{a.name: _attribute(a) for a in n.attribute}} for n in arm_nodes(proto)],
            "quantization": {"scheme": "w4a16 (the checkpoint's codes)", "matmul_nbits": len(int4),
                             "group_sizes": sorted({m.group_size for m in int4.values()}),
                             "act_order": any(m.g_idx is not None for m in int4.values())} if int4 else None,
            "versions": _versions(),
        })
    log.info("exported %s in %.1f s (%d ARM nodes)", out_dir, time.perf_counter() - start, found)
    return out_dir


# --- ONNX Runtime sessions ----------------------------------------------------------------


class DecoderSession:
    """Feeds an exported decoder: prefill and decode with numpy past tensors."""

    def __init__(self, sess):
        self.sess = sess
        names = [i.name for i in sess.get_inputs()]
        self.num_layers = sum(1 for n in names if n.endswith(".key"))
        past = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key")
        self.kv_heads, self.head_dim = past.shape[1], past.shape[3]
        self.output_names = [o.name for o in sess.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.num_layers)]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past=None):
        """-> (logits [B, S, V], present list)."""
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        for i in range(self.num_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outputs = self.sess.run(self.output_names, feed)
        return outputs[0], outputs[1:]


def positions_from_mask(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """position_ids for the last `seq_len` tokens, counting only unmasked ones (as `generate`)."""
    return np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None)[:, -seq_len:]


def ort_logits_fn(model_dir: str | os.PathLike, library: Optional[str] = runtime.LIBRARY_AUTO, threads: Optional[int] = None,
                  seed: Optional[int] = None, arm: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable input_ids [B, L] -> logits [B, L, V] (float32 torch) running the ONNX export.

    `armquant.evaluate.perplexity(ort_logits_fn(dir), windows)` is perplexity through ONNX Runtime;
    `seed` and `arm` as in `session`.
    """
    decoder = DecoderSession(runtime.session(model_dir, library=library, threads=threads, seed=seed, arm=arm))

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids)
        out, _ = decoder.run(ids, mask, positions_from_mask(mask, ids.shape[1]))
        return torch.from_numpy(out)

    return logits


def ort_evaluate(model_dir: str | os.PathLike, windows: torch.Tensor, seeds=(0, 1, 2), arm_off: bool = True,
                 library: Optional[str] = runtime.LIBRARY_AUTO, threads: Optional[int] = None, progress: bool = True) -> dict:
    """`armquant.evaluate.evaluate` through ONNX Runtime: the same report (ARM off, each seed)."""
    from armquant.evaluate import arm_report, perplexity

    proto = onnx.load(str(runtime.model_file(model_dir)), load_external_data=False)

    def run(arm: bool, seed):
        logits = ort_logits_fn(model_dir, library=library, threads=threads, seed=seed, arm=arm)
        return perplexity(logits, windows, progress, desc=f"ORT, ARM on, seed {seed}" if arm else "ORT, ARM off")

    report = arm_report(run, bool(arm_nodes(proto)), seeds, arm_off, windows)
    report.update(backend="onnxruntime", library=runtime.custom_op_library(library))
    return report


def export_arm_config(model_dir: str | os.PathLike) -> dict:
    """The ARM attributes of an export, per decoder layer, as `armquant info` shows them."""
    path = Path(model_dir) / "arm_config.json"
    if not path.is_file():
        return {}
    from armquant.models import ARMModelConfig

    config = ARMModelConfig.from_dict(json.loads(path.read_text()))
    return {i: config.for_layer(i).to_dict() for i in config.layers}


# --- ONNX Runtime quantization ------------------------------------------------------------

# Weight-only MatMulNBits (bits per weight), or ONNX Runtime's dynamic INT8: per-tensor int8
# activations, which LLM activation outliers make lossy (+74% perplexity on SmolLM2, RESULTS.md).
SCHEMES = {"int4": 4, "int8": 8, "int8-dynamic": None}


def untie_transposed_weights(proto: onnx.ModelProto) -> int:
    """Give each MatMul whose weight is `Transpose(initializer)` its own transposed initializer.

    A tied LM head exports as MatMul(h, Transpose(embedding)), which ONNX Runtime's quantizers
    skip because the weight is not a constant; on SmolLM2 that head is a fifth of all weights
    and would stay float32 in an INT4 model. The embedding's Gather keeps the original table.
    Returns how many MatMuls were rewritten.
    """
    from onnx import numpy_helper

    initializers = {t.name: t for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten, unused = 0, []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] in initializers:
            continue
        transpose = producer.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            continue
        name = transpose.input[0] + ".T"
        if name not in initializers:
            weight = numpy_helper.to_array(initializers[transpose.input[0]])
            initializers[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            proto.graph.initializer.append(initializers[name])
        consumers[node.input[1]] -= 1
        if consumers[node.input[1]] == 0:
            unused.append(transpose)
        node.input[1] = name
        rewritten += 1
    for transpose in unused:
        proto.graph.node.remove(transpose)
    return rewritten


def lm_head_node(proto: onnx.ModelProto) -> Optional[onnx.NodeProto]:
    """The MatMul (or Gemm) that computes the `logits` output, through any nodes after it."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    node = producer.get("logits")
    while node is not None and node.op_type not in ("MatMul", "Gemm"):
        node = producer.get(node.input[0]) if node.input else None
    return node


def quantize_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, scheme: str = "int4",
                  block_size: int = 32, accuracy_level: int = 4, overwrite: bool = False,
                  source_name: Optional[str] = None, symmetric: bool = True, float_lm_head: bool = False) -> Path:
    """Quantize an export with ONNX Runtime's tools; the ARM nodes and their function survive.

    int4, int8: weight-only MatMulNBits (blocks of `block_size` weights, `symmetric` or with a
    zero point each; `accuracy_level` 4 = int8 activations per block inside the kernel, the fast
    CPU path). int8-dynamic: ONNX Runtime's dynamic quantization of MatMul (MatMulInteger; its
    weights are always symmetric). The LM head is quantized too unless `float_lm_head`: a tied
    head then keeps reading the embedding table, so the float head adds no bytes, but decode is
    slower.
    """
    import shutil

    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} must be one of {list(SCHEMES)}")
    bits = SCHEMES[scheme]
    if bits and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size={block_size} must be a power of two >= 16 (MatMulNBits), e.g. 32 or 128")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    source = runtime.model_file(model_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output directory or pass overwrite=True (--overwrite)")
    info = json.loads((model_dir / INFO_FILE).read_text()) if (model_dir / INFO_FILE).is_file() else {}
    if info.get("quantization"):
        raise ValueError(f"{model_dir} is quantized already ({info['quantization']['scheme']}); quantize a float32 export")
    before = onnx.load(str(source), load_external_data=False)
    n_arm = len(arm_nodes(before))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for item in model_dir.iterdir():
            if item.name not in (MODEL_FILE, MODEL_FILE + "_data", INFO_FILE) and item.is_file():
                shutil.copy2(item, tmp / item.name)
        proto = onnx.load(str(source))
        exclude = []
        if float_lm_head:
            head = lm_head_node(proto)
            if head is None:
                raise ValueError(f"no MatMul computes `logits` in {source}; float_lm_head needs an `armquant export` graph")
            exclude.append(head.name)
        else:
            untie_transposed_weights(proto)
        if bits:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                             accuracy_level=accuracy_level, nodes_to_exclude=exclude)
            quantizer.process()
            proto = quantizer.model.model
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            staged_in, staged_out = tmp / ("staged-in-" + MODEL_FILE), tmp / ("staged-" + MODEL_FILE)
            onnx.save_model(proto, str(staged_in), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=staged_in.name + "_data")
            quantize_dynamic(str(staged_in), str(staged_out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
            proto = onnx.load(str(staged_out))
            for staged in tmp.glob("staged-*"):
                staged.unlink()
        embed_arm_function(proto)  # re-embed: the tools may drop or rewrite model-local functions
        if len(arm_nodes(proto)) != n_arm:
            raise RuntimeError(f"quantization changed the ARM nodes: {n_arm} before, {len(arm_nodes(proto))} after")
        _save_proto(proto, tmp)
        info["quantization"] = {"scheme": scheme, "source": source_name or str(model_dir), "float_lm_head": float_lm_head,
                                **({"block_size": block_size, "accuracy_level": accuracy_level, "symmetric": symmetric}
                                   if bits else {})}
        write_json(tmp / INFO_FILE, info)
    return out_dir


# --- Parity: ONNX Runtime against PyTorch -------------------------------------------------


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the error relative to the logits' scale."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def parity(model: nn.Module, model_dir: str | os.PathLike, library: Optional[str] = runtime.LIBRARY_AUTO,
           prompt_len: int = 8, decode_steps: int = 4, seed: int = 0) -> dict:
    """Compare ONNX Runtime's logits with PyTorch's, with ARM as configured in `model`.

    Cases: prefill; decode with past (one token at a time on ORT's own present); batch 2 with
    left padding. Returns {case: max relative error}; padded positions are left out.
    """
    decoder = DecoderSession(runtime.session(model_dir, library=library))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt_len + decode_steps), generator=g)
    results = {}
    # PyTorch runs the same steps with its own KV cache: ARM's statistics cover the tokens of
    # each call, so a decode step must see exactly one new token on both sides.
    reference = DecoderWithPast(model).eval()
    kv_heads, head_dim = _kv_shape(model.config)
    torch_past = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * reference.num_layers)]
    mask = np.ones((1, prompt_len), np.int64)
    positions = positions_from_mask(mask, prompt_len)
    with torch.no_grad():
        expect, *torch_past = reference(ids[:, :prompt_len], torch.from_numpy(mask), torch.from_numpy(positions), *torch_past)
    logits, present = decoder.run(ids[:, :prompt_len].numpy(), mask, positions)
    results["prefill"] = _relative_error(logits, expect.numpy())
    errors = []
    for step in range(decode_steps):
        t = prompt_len + step
        mask = np.ones((1, t + 1), np.int64)
        positions = positions_from_mask(mask, 1)
        logits, present = decoder.run(ids[:, t:t + 1].numpy(), mask, positions, present)
        with torch.no_grad():
            expect, *torch_past = reference(ids[:, t:t + 1], torch.from_numpy(mask), torch.from_numpy(positions), *torch_past)
        errors.append(_relative_error(logits, expect.numpy()))
    results["decode_with_past"] = max(errors)
    # Batch 2: row 0 full, row 1 left-padded by 3 tokens; PyTorch runs the same padded batch.
    pad = 3
    batch_ids = torch.randint(0, vocab, (2, prompt_len), generator=g)
    batch_mask = torch.ones(2, prompt_len, dtype=torch.long)
    batch_mask[1, :pad] = 0
    with torch.no_grad():
        expect = model(batch_ids, attention_mask=batch_mask).logits.numpy()
    mask = batch_mask.numpy()
    logits, _ = decoder.run(batch_ids.numpy(), mask, positions_from_mask(mask, prompt_len))
    keep = mask.astype(bool)
    results["batch_padded"] = _relative_error(logits[keep], expect[keep])
    return results


# --- CLI ------------------------------------------------------------------------------------


def _cmd_export(args) -> int:
    from armquant.models import load_from_args

    if Path(args.out_dir).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out_dir} already exists; choose another output directory or pass --overwrite")
    model, tokenizer = load_from_args(args)
    if args.quantize:
        import tempfile

        with tempfile.TemporaryDirectory(dir=Path(args.out_dir).resolve().parent) as staging:
            fp32 = export(model, Path(staging) / "fp32", tokenizer)
            quantize_onnx(fp32, args.out_dir, args.quantize, args.block_size, args.accuracy_level, args.overwrite,
                          source_name=args.model, symmetric=not args.asymmetric, float_lm_head=args.float_lm_head)
    else:
        export(model, args.out_dir, tokenizer, overwrite=args.overwrite, accuracy_level=args.accuracy_level)
    print(f"wrote {args.out_dir}")
    return 0


def _cmd_ort_quantize(args) -> int:
    out = quantize_onnx(args.model_dir, args.out_dir, args.scheme, args.block_size, args.accuracy_level, args.overwrite,
                        symmetric=not args.asymmetric, float_lm_head=args.float_lm_head)
    print(f"wrote {out}")
    return 0


def _cmd_parity(args) -> int:
    from armquant.models import load_from_args

    model, _ = load_from_args(args)
    results = parity(model, args.onnx_dir, library=args.library, prompt_len=args.prompt_len)
    worst = max(results.values())
    for case, error in results.items():
        print(f"{case:<18} max relative error {error:.3e}  {'ok' if error <= args.tolerance else 'FAIL'}")
    return 0 if worst <= args.tolerance else 1


def _add_library_argument(parser) -> None:
    parser.add_argument(
        "--library", default=runtime.LIBRARY_AUTO, metavar="auto|none|PATH",
        help="ARM custom-op library for ONNX Runtime: auto (the built one, if any), none (the ONNX "
        "function fallback), or a path",
    )


def _add_quantize_arguments(parser) -> None:
    parser.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size (default 32; 128 is smaller, and coarser)")
    parser.add_argument("--accuracy-level", type=int, default=4,
                        help="MatMulNBits accuracy level (default 4: int8 compute, fastest on CPU)")
    parser.add_argument("--asymmetric", action="store_true", help="MatMulNBits with a zero point per block (default: symmetric)")
    parser.add_argument("--float-lm-head", action="store_true",
                        help="keep the LM head in float32: better perplexity, slower decode (a tied head adds no bytes)")


def add_cli(subparsers) -> None:
    from armquant.models import add_arm_arguments

    p = subparsers.add_parser(
        "export", help="export a model to ONNX (decoder with KV cache, ARM as armquant::ARM)",
        description="Export an ARM model to an ONNX decoder with past that ONNX Runtime and optimum's "
        "ORTModelForCausalLM load; optionally quantize it with ONNX Runtime. A W4A16 checkpoint "
        "(RTN or GPTQ) exports its own codes as MatMulNBits.",
    )
    p.add_argument("model", help="bundled name, .gguf file or checkpoint folder")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--quantize", choices=list(SCHEMES),
                   help="also quantize with ONNX Runtime: int4 or int8 (weight-only MatMulNBits), int8-dynamic (MatMulInteger)")
    _add_quantize_arguments(p)
    add_arm_arguments(p)
    p.set_defaults(handler=_cmd_export)

    p = subparsers.add_parser("ort-quantize", help="quantize an ONNX export with ONNX Runtime (int4 or int8)")
    p.add_argument("model_dir", help="folder written by `armquant export`")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--scheme", choices=list(SCHEMES), default="int4",
                   help="int4 or int8: weight-only MatMulNBits; int8-dynamic: MatMulInteger with per-tensor int8 activations")
    _add_quantize_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.set_defaults(handler=_cmd_ort_quantize)

    p = subparsers.add_parser("parity", help="compare ONNX Runtime logits with PyTorch's for an export",
                              description="Run prefill, decode with past and a padded batch through both the "
                              "PyTorch model and its ONNX export; print the max relative logit error.")
    p.add_argument("model", help="the PyTorch model: bundled name, .gguf file or checkpoint folder")
    p.add_argument("onnx_dir", help="folder written by `armquant export` from that model")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error allowed (default 1e-4)")
    p.add_argument("--prompt-len", type=int, default=16)
    _add_library_argument(p)
    add_arm_arguments(p)
    p.set_defaults(handler=_cmd_parity)
