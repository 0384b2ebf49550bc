"""ONNX export of a tiny ARM Llama: parity with PyTorch, optimum loading, ORT quantization, errors.

One export per module (it takes tens of seconds); the real model is in the `slow` test below.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx
import pytest
import torch
from conftest import bundled_available, tiny_config, tiny_model

from armquant import onnx as aox
from armquant import runtime
from armquant.models import FAMILIES, ARMModelConfig, apply_arm, arm_enabled, set_arm_seed

TOLERANCE = 1e-4  # relative, float32


def arm_model(family: str = "llama"):
    model = tiny_model(family)
    return apply_arm(model, ARMModelConfig.preset(FAMILIES[family]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = arm_model()
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    aox.export(model, out)
    return model, out


def has_library() -> bool:
    return runtime.custom_op_library(runtime.LIBRARY_AUTO) is not None


def test_export_writes_one_arm_node_per_site_and_the_function(exported):
    model, out = exported
    proto = onnx.load(str(out / aox.MODEL_FILE))
    nodes = aox.arm_nodes(proto)
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    config = model.arm_config.arm
    assert attrs["share"] == config.share.encode() and attrs["scope"] == config.scope.encode()
    assert attrs["seed"] == config.seed and attrs["c"] == pytest.approx(config.c)
    producers = {o: n for n in proto.graph.node for o in n.output}
    # mask and positions are wired from the graph inputs, not constants.
    for name, graph_input in zip(nodes[0].input[1:], ("attention_mask", "position_ids")):
        seen, frontier = set(), [name]
        while frontier:
            current = frontier.pop()
            seen.add(current)
            if current in producers:
                frontier += [i for i in producers[current].input if i and i not in seen]
        assert graph_input in seen, f"ARM input {name} does not depend on {graph_input}"
    assert [(f.domain, f.name) for f in proto.functions] == [("armquant", "ARM")]
    assert ("armquant", 1) in [(o.domain, o.version) for o in proto.opset_import]
    onnx.checker.check_model(str(out / aox.MODEL_FILE), full_check=True)
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in proto.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    for name in ("config.json", "generation_config.json", "arm_config.json", aox.INFO_FILE):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("library", [
    "none",
    pytest.param("auto", marks=pytest.mark.skipif(not has_library(), reason="the ARM custom-op library is not built")),
])
def test_ort_logits_match_pytorch(exported, library):
    model, out = exported
    results = aox.parity(model, out, library=library, prompt_len=8, decode_steps=3)
    assert set(results) == {"prefill", "decode_with_past", "batch_padded"}
    for case, error in results.items():
        assert error <= TOLERANCE, f"{case}: relative error {error:.2e} > {TOLERANCE}"


def test_parity_is_not_vacuous_arm_changes_logits(exported):
    model, out = exported
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), arm_enabled(model, False):
        plain = model(ids).logits.numpy()
    ort_logits = aox.ort_logits_fn(out, library="none")(ids).numpy()
    assert np.abs(ort_logits - plain).max() / np.abs(plain).max() > 100 * TOLERANCE


def test_session_seed_and_arm_off_follow_pytorch(exported):
    model, out = exported
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), arm_enabled(model, False):
        plain = model(ids).logits
    off = aox.ort_logits_fn(out, library="none", arm=False)(ids)
    assert (off - plain).abs().max() / plain.abs().max() <= TOLERANCE
    set_arm_seed(model, 7)
    try:
        with torch.no_grad():
            seeded = model(ids).logits
    finally:
        set_arm_seed(model, 0)
    ort_seeded = aox.ort_logits_fn(out, library="none", seed=7)(ids)
    assert (ort_seeded - seeded).abs().max() / seeded.abs().max() <= TOLERANCE
    assert not torch.equal(ort_seeded, aox.ort_logits_fn(out, library="none")(ids))


def test_library_and_function_agree(exported):
    if not has_library():
        pytest.skip("the ARM custom-op library is not built: only the function fallback can run")
    _, out = exported
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with_library = aox.ort_logits_fn(out, library="auto")(ids)
    with_function = aox.ort_logits_fn(out, library="none")(ids)
    assert torch.equal(with_library, with_function)


def test_ort_perplexity_matches_pytorch(exported):
    model, out = exported
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(3))
    logits_fn = aox.ort_logits_fn(out, library="none")

    def nll(logits, ids):
        return torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum").item()

    with torch.no_grad():
        torch_nll = sum(nll(model(w[None]).logits, w[None]) for w in windows)
    ort_nll = sum(nll(logits_fn(w[None]), w[None]) for w in windows)
    assert ort_nll == pytest.approx(torch_nll, rel=1e-3 / 32)  # perplexity within 0.1%


def test_ort_evaluate_reports_like_evaluate(exported):
    from armquant.evaluate import evaluate

    model, out = exported
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    ort_report = aox.ort_evaluate(out, windows, seeds=(0, 1), library="none", progress=False)
    try:
        torch_report = evaluate(model, windows, seeds=(0, 1), progress=False)
    finally:
        set_arm_seed(model, 0)  # evaluate leaves the last seed set; the export has seed 0
    assert [(r["arm"], r["seed"]) for r in ort_report["rows"]] == [(r["arm"], r["seed"]) for r in torch_report["rows"]]
    for ort_row, torch_row in zip(ort_report["rows"], torch_report["rows"]):
        assert ort_row["perplexity"] == pytest.approx(torch_row["perplexity"], rel=1e-3)
    assert ort_report["rows"][1]["perplexity"] != ort_report["rows"][2]["perplexity"]  # seeds differ


def test_optimum_loads_and_generates_like_pytorch(exported):
    from optimum.onnxruntime import ORTModelForCausalLM

    model, out = exported
    ort_model = ORTModelForCausalLM.from_pretrained(out, session_options=runtime.session_options("none"),
                                                    provider="CPUExecutionProvider")
    assert ort_model.use_cache
    ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = ort_model.generate(**kwargs)
    assert generated.shape == (2, 11)
    assert torch.equal(generated, model.generate(**kwargs))


@pytest.mark.parametrize("scheme,block_size,op", [("int4", 32, "MatMulNBits"), ("int4", 128, "MatMulNBits"),
                                                   ("int8", 128, "MatMulNBits"), ("int8-dynamic", 128, "MatMulInteger")])
def test_ort_quantization_keeps_arm(exported, tmp_path, scheme, block_size, op):
    model, out = exported
    quantized = aox.quantize_onnx(out, tmp_path / scheme, scheme, block_size=block_size)
    proto = onnx.load(str(quantized / aox.MODEL_FILE))
    assert len(aox.arm_nodes(proto)) == 1
    assert [(f.domain, f.name) for f in proto.functions] == [("armquant", "ARM")]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count(op) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    if op == "MatMulNBits":
        attrs = {a.name: a.i for n in proto.graph.node if n.op_type == op for a in n.attribute}
        assert attrs["block_size"] == block_size and attrs["accuracy_level"] == 4
        assert attrs["bits"] == aox.SCHEMES[scheme]
    onnx.checker.check_model(proto, full_check=True)
    info = json.loads((quantized / aox.INFO_FILE).read_text())
    assert info["quantization"]["scheme"] == scheme
    # Still close to float32 (4-bit weights in a random tiny model: loose bound).
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    q_logits = aox.ort_logits_fn(quantized, library="none")(ids)
    f_logits = aox.ort_logits_fn(out, library="none")(ids)
    assert torch.isfinite(q_logits).all()
    assert (q_logits - f_logits).abs().max() / f_logits.abs().max() < 0.5
    assert not torch.equal(q_logits, f_logits)


def ort_error_against_pytorch(model, out) -> float:
    """max |ONNX Runtime logits - PyTorch logits| / max |PyTorch logits| on a fixed batch."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expect = model(ids).logits
    logits = aox.ort_logits_fn(out, library="none")(ids)
    return float((logits - expect).abs().max() / expect.abs().max())


@pytest.mark.parametrize("scheme", ["rtn-g32", "rtn-g128", "gptq-g16", "gptq-g128"])  # g128 pads the 64-wide layers
def test_export_of_a_w4a16_checkpoint_carries_its_codes(exported, tmp_path, scheme):
    from armquant.quantize import W4A16, quantize

    model = arm_model()
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    method, group = scheme.split("-g")
    quantize(model, W4A16(group_size=int(group), method=method, symmetric=method == "rtn"), calibration)
    out = aox.export(model, tmp_path / scheme, accuracy_level=0)
    proto = onnx.load(str(out / aox.MODEL_FILE))
    ops = [n.op_type for n in proto.graph.node]
    float_ops = [n.op_type for n in onnx.load(str(exported[1] / aox.MODEL_FILE)).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 and ops.count("MatMul") == float_ops.count("MatMul") - 2 * 7
    assert ops.count("Gather") == float_ops.count("Gather") + (2 * 7 if method == "gptq" else 0)  # act-order
    info = json.loads((out / aox.INFO_FILE).read_text())["quantization"]
    assert info["matmul_nbits"] == 2 * 7 and info["act_order"] == (method == "gptq")
    assert ort_error_against_pytorch(model, out) < 1e-5  # the same weights, float32 compute
    assert [type(m).__name__ for m in model.modules()].count("Int4WeightLinear") == 2 * 7  # swapped back
    with pytest.raises(ValueError, match="quantized already"):
        aox.quantize_onnx(out, tmp_path / "twice")


def test_export_of_act_order_with_padding_columns_among_the_groups(tmp_path):
    """48-wide layers in groups of 32 carry 16 padding columns; GPTQ may give them any group."""
    from transformers import AutoModelForCausalLM

    from armquant.quantize import W4A16, Int4WeightLinear, quantize

    config = tiny_config("llama")
    config.hidden_size, config.head_dim = 48, 12
    torch.manual_seed(0)
    model = apply_arm(AutoModelForCausalLM.from_config(config).eval(), ARMModelConfig.preset("llama-3.1"))
    quantize(model, W4A16(group_size=32, method="gptq"), torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)))
    for m in model.modules():
        if isinstance(m, Int4WeightLinear) and m.in_features == 48:  # a real column and a padding one swap groups
            real = int((m.g_idx[:48] != m.g_idx[48]).nonzero()[0])
            m.g_idx[real], m.g_idx[48] = m.g_idx[48].clone(), m.g_idx[real].clone()
    out = aox.export(model, tmp_path / "out", accuracy_level=0)
    assert [n.op_type for n in onnx.load(str(out / aox.MODEL_FILE)).graph.node].count("Pad") == 2 * 6
    assert ort_error_against_pytorch(model, out) < 1e-5


def test_export_refuses_other_quantized_layers(tmp_path):
    from armquant.quantize import quantize

    model = quantize(arm_model(), "w8a16")
    with pytest.raises(ValueError, match="cannot export int8_weight layers"):
        aox.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def zero_points(proto) -> list[bool]:
    """For each MatMulNBits node: whether it carries zero points (its fourth input)."""
    return [len(n.input) >= 4 and bool(n.input[3]) for n in proto.graph.node if n.op_type == "MatMulNBits"]


def test_ort_quantization_float_lm_head_and_zero_points(exported, tmp_path):
    model, out = exported
    quantized = aox.quantize_onnx(out, tmp_path / "int4", "int4", block_size=32, symmetric=False, float_lm_head=True)
    proto = onnx.load(str(quantized / aox.MODEL_FILE))
    assert zero_points(proto) == [True] * (2 * 7)  # the head stays a float MatMul
    head = aox.lm_head_node(proto)
    assert head.op_type == "MatMul"
    info = json.loads((quantized / aox.INFO_FILE).read_text())["quantization"]
    assert info["symmetric"] is False and info["float_lm_head"] is True
    symmetric = aox.quantize_onnx(out, tmp_path / "int4-sym", "int4")  # the defaults: symmetric, head quantized
    assert zero_points(onnx.load(str(symmetric / aox.MODEL_FILE))) == [False] * (2 * 7 + 1)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    q_logits = aox.ort_logits_fn(quantized, library="none")(ids)
    f_logits = aox.ort_logits_fn(out, library="none")(ids)
    assert (q_logits - f_logits).abs().max() / f_logits.abs().max() < 0.5
    assert not torch.equal(q_logits, f_logits)


def tied_head_graph(folder):
    """embedding Gather + LM head MatMul(h, Transpose(embedding)): how a tied head exports."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
         helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "embed_t"], ["logits"])],
        "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", 64])],
        [numpy_helper.from_array(table, "embed")],
    )
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(folder / aox.MODEL_FILE))
    return table


@pytest.mark.parametrize("scheme,op", [("int4", "MatMulNBits"), ("int8", "MatMulNBits"), ("int8-dynamic", "MatMulInteger")])
def test_ort_quantization_covers_a_tied_lm_head(tmp_path, scheme, op):
    import onnxruntime as ort

    table = tied_head_graph(tmp_path / "fp32")
    quantized = aox.quantize_onnx(tmp_path / "fp32", tmp_path / scheme, scheme, block_size=32)
    proto = onnx.load(str(quantized / aox.MODEL_FILE))
    assert [n.op_type for n in proto.graph.node].count(op) == 1
    assert "Transpose" not in [n.op_type for n in proto.graph.node]
    ids = np.array([[3, 17, 60]], np.int64)
    logits = ort.InferenceSession(str(quantized / aox.MODEL_FILE)).run(None, {"input_ids": ids})[0]
    expect = table[ids] @ table.T
    assert np.abs(logits - expect).max() / np.abs(expect).max() < 0.1
    assert not np.array_equal(logits, expect)


@pytest.mark.parametrize("scheme", ["int4", "int8-dynamic"])
def test_ort_quantization_float_lm_head_keeps_a_tied_head_exact(tmp_path, scheme):
    import onnxruntime as ort

    table = tied_head_graph(tmp_path / "fp32")
    quantized = aox.quantize_onnx(tmp_path / "fp32", tmp_path / scheme, scheme, block_size=32, float_lm_head=True)
    proto = onnx.load(str(quantized / aox.MODEL_FILE))
    assert sorted(n.op_type for n in proto.graph.node) == ["Gather", "MatMul", "Transpose"]  # still tied: no copy
    assert len(proto.graph.initializer) == 1
    ids = np.array([[3, 17, 60]], np.int64)
    logits = ort.InferenceSession(str(quantized / aox.MODEL_FILE)).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(logits, table[ids] @ table.T, rtol=1e-5, atol=1e-5)


# --- Bad input ----------------------------------------------------------------------------


def test_ort_quantize_cli_passes_its_options(tmp_path):
    from armquant.cli import main

    tied_head_graph(tmp_path / "fp32")
    assert main(["ort-quantize", str(tmp_path / "fp32"), str(tmp_path / "q"), "--scheme", "int8", "--asymmetric",
                 "--float-lm-head", "--block-size", "16"]) == 0
    info = json.loads((tmp_path / "q" / aox.INFO_FILE).read_text())["quantization"]
    assert (info["scheme"], info["block_size"], info["symmetric"], info["float_lm_head"]) == ("int8", 16, False, True)


def test_float_lm_head_needs_a_logits_matmul(tmp_path):
    tied_head_graph(tmp_path / "fp32")
    proto = onnx.load(str(tmp_path / "fp32" / aox.MODEL_FILE))
    proto.graph.node[-1].output[0] = proto.graph.output[0].name = "scores"
    onnx.save(proto, str(tmp_path / "fp32" / aox.MODEL_FILE))
    with pytest.raises(ValueError, match="no MatMul computes `logits`"):
        aox.quantize_onnx(tmp_path / "fp32", tmp_path / "q", "int4", float_lm_head=True)
    assert not (tmp_path / "q").exists()


def test_export_refuses_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="cannot export model type 'gpt2'"):
        aox.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_existing_directory(exported, tmp_path):
    model, _ = exported
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        aox.export(model, tmp_path / "out")


def test_failed_export_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    model, out = exported
    proto = onnx.load(str(out / aox.MODEL_FILE))
    monkeypatch.setattr(aox, "_to_onnx", lambda m: proto)

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(aox, "_save_proto", disk_full)
    with pytest.raises(OSError, match="No space"):
        aox.export(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_missing_library_path_is_a_clear_error(exported, tmp_path):
    _, out = exported
    with pytest.raises(FileNotFoundError, match="no ARM custom-op library at .*library='none'"):
        runtime.session(out, library=str(tmp_path / "libarmquant_ort.so"))


def test_folders_without_a_model_are_named(tmp_path):
    # A checkpoint folder passed where an export belongs: each entry point names the folder.
    message = f"no model.onnx in {tmp_path}; pass the directory written by `armquant export`"
    for call in (lambda: runtime.session(tmp_path), lambda: aox.ort_evaluate(tmp_path, torch.zeros(1, 4, dtype=torch.long)),
                 lambda: aox.quantize_onnx(tmp_path, tmp_path / "out")):
        with pytest.raises(FileNotFoundError, match=re.escape(message)):
            call()


def test_cli_export_refuses_existing_directory_before_loading(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    aox.add_cli(parser.add_subparsers())
    (tmp_path / "out").mkdir()
    args = parser.parse_args(["export", "no-such-model", str(tmp_path / "out")])
    with pytest.raises(FileExistsError, match="--overwrite"):
        args.handler(args)


# --- The bundled model ----------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_parity_and_perplexity(tmp_path, corpus_dir):
    if not bundled_available():
        pytest.skip("the bundled SmolLM2-135M is not installed")
    from armquant import models

    model, tokenizer = models.load("smollm2-135m")
    out = aox.export(model, tmp_path / "smollm2", tokenizer)
    results = aox.parity(model, out, library="auto", prompt_len=32, decode_steps=4)
    for case, error in results.items():
        assert error <= TOLERANCE, f"{case}: relative error {error:.2e}"
    from armquant.data import load_texts, token_windows
    from armquant.evaluate import perplexity

    windows = token_windows(tokenizer, load_texts("sotu", split="evaluation"), 512, max_windows=4)
    torch_ppl = perplexity(model, windows, progress=False)["perplexity"]
    ort_ppl = perplexity(aox.ort_logits_fn(out), windows, progress=False)["perplexity"]
    assert ort_ppl == pytest.approx(torch_ppl, rel=1e-3)


def test_eval_cli_ort_backend_matches_torch_backend(tmp_path):
    from armquant.cli import main
    from tiny_onnx import SENTENCES, tiny_model_dir

    text = tmp_path / "text.txt"
    text.write_text(" ".join(SENTENCES * 30))
    common = ["--data", str(text), "--window", "16", "--max-windows", "3", "--seeds", "0", "1"]
    export_dir = tiny_model_dir()
    assert main(["eval", str(export_dir), "--backend", "ort", *common, "--json", str(tmp_path / "ort.json")]) == 0
    assert main(["eval", f"{export_dir}-torch", *common, "--json", str(tmp_path / "torch.json")]) == 0
    ort_report, torch_report = (json.loads((tmp_path / f"{b}.json").read_text()) for b in ("ort", "torch"))
    assert ort_report["arm"] == {str(k): v for k, v in torch_report["arm"].items()} != {}
    for ort_row, torch_row in zip(ort_report["rows"], torch_report["rows"], strict=True):
        assert (ort_row["arm"], ort_row["seed"]) == (torch_row["arm"], torch_row["seed"])
        assert ort_row["perplexity"] == pytest.approx(torch_row["perplexity"], rel=1e-3)
