"""Quantization schemes: integer grids, modules, checkpoints and bad input."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import armquant
import armquant.models as M
from armquant.quantize import (
    NAMED, BnB, Int4WeightLinear, Int8DynamicLinear, Int8WeightLinear, W4A16, W8A8, W8A16, dequantize_int4,
    fake_quantize, group_qparams, int4_groupwise, int8_per_channel, load_quantized, pack_int4, quantize,
    save_quantized, scheme_from_dict, target_linears, unpack_int4,
)
from armquant.smoothquant import smooth, smoothing_scales


def sqnr_db(ref, approx):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean()))


def arm_model(family="llama", seed=0):
    model = tiny_model(family, seed)
    M.apply_arm(model, M.ARMModelConfig.preset(M.FAMILIES[family]))
    return model


def tiny_schemes():
    """Every named scheme, with INT4 groups that divide the tiny model's width of 64."""
    return {
        name: dataclasses.replace(s, group_size=32) if isinstance(s, W4A16) else s for name, s in NAMED.items()
    }


CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))
TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(8))


# --- Grids --------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, half_cols, seed):
    codes = torch.randint(0, 16, (rows, 2 * half_cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (rows, half_cols) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_rejects_odd_widths_and_out_of_range_codes():
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))


def test_int8_per_channel_error_is_at_most_half_a_step():
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    codes, scale = int8_per_channel(w)
    err = (codes.float() * scale.unsqueeze(1) - w).abs()
    assert torch.all(err <= scale.unsqueeze(1) / 2 * (1 + 1e-5) + 1e-7)
    assert sqnr_db(w, codes.float() * scale.unsqueeze(1)) > 38


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groupwise_error_bound(symmetric, group_size):
    w = torch.randn(32, 256) + (0.0 if symmetric else 0.3)
    codes, scale, zero = int4_groupwise(w, group_size, symmetric)
    w_hat = dequantize_int4(pack_int4(codes), scale, zero)
    step = scale.repeat_interleave(group_size, dim=1)
    # Half a step inside the grid; at its ends (the symmetric grid's top code, or the range an
    # asymmetric zero point rounded off by up to half a step) a value can fall up to one step away.
    bound = step * (1 + 1e-4) + 1e-6
    assert torch.all((w_hat - w).abs() <= bound)
    assert sqnr_db(w, w_hat) > 17


def test_group_qparams_scales_are_float16_values():
    scale, _ = group_qparams(torch.randn(10, 32), 4, symmetric=False)
    assert torch.equal(scale, scale.half().float())


# --- Modules ------------------------------------------------------------------------------------


def test_int8_weight_linear_matches_its_dequantized_weight():
    linear = nn.Linear(64, 96)
    m = Int8WeightLinear.from_linear(linear, W8A16())
    x = torch.randn(3, 5, 64)
    ref = nn.functional.linear(x, m.weight.float() * m.scale.unsqueeze(1), linear.bias)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    assert sqnr_db(linear(x), m(x)) > 35


def test_int8_dynamic_linear_integer_path_matches_its_simulation():
    linear = nn.Linear(64, 96, bias=False)
    m = Int8DynamicLinear.from_linear(linear, W8A8())
    x = torch.randn(7, 64)
    xs = x.abs().amax(dim=1, keepdim=True) / 127
    xq = torch.round(x / xs).clamp(-127, 127)
    sim = (xq * xs) @ (m.weight.float() * m.scale.unsqueeze(1)).t()
    torch.testing.assert_close(m(x), sim, rtol=1e-4, atol=1e-4)
    assert sqnr_db(linear(x), m(x)) > 30


@pytest.mark.parametrize("name", list(NAMED))
def test_each_scheme_on_a_tiny_model(name):
    scheme = tiny_schemes()[name]
    model = arm_model()
    with torch.no_grad():
        ref = model(TOKENS).logits
        armquant.quantize(model, scheme, CALIB)
        y = model(TOKENS).logits
    floor = {"w8a16": 30, "w8a8": 25, "llm-int8": 25}.get(name.split("-static")[0].split("-sq")[0], 12)
    assert sqnr_db(ref, y) > floor
    assert not any(type(m) is nn.Linear for m in target_linears(model).values())
    assert model.model.layers[0].mlp.act_fn.arm.enabled  # ARM stays, in floating point


def test_bitsandbytes_on_cpu_uses_its_layouts():
    for kind, floor in (("int8", 30), ("nf4", 15), ("fp4", 13)):
        linear = nn.Linear(64, 128)
        model = nn.Sequential()
        from armquant.quantize import BnB4bitLinear, BnBInt8Linear

        cls = BnBInt8Linear if kind == "int8" else BnB4bitLinear
        m = cls.from_linear(linear, BnB(kind))
        x = torch.randn(9, 64)
        assert sqnr_db(linear(x).detach(), m(x)) > floor, kind
        assert m(x).device.type == "cpu"


def test_fake_quantize_equals_the_packed_module_for_rtn():
    model = arm_model()
    sim = arm_model()
    scheme = W4A16(group_size=32)
    quantize(model, scheme)
    fake_quantize(sim, scheme)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, sim(TOKENS).logits, rtol=1e-4, atol=1e-4)


# --- SmoothQuant --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_smoothing_leaves_the_float_model_unchanged(family):
    from armquant.quantize import _apply_smoothquant, observe_input_absmax

    model = arm_model(family)
    with torch.no_grad():
        ref = model(TOKENS).logits
        stats = observe_input_absmax(model, CALIB)
        _apply_smoothquant(model, stats, 0.5)
        torch.testing.assert_close(model(TOKENS).logits, ref, rtol=1e-4, atol=1e-4)


def test_smoothquant_helps_per_tensor_int8_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :3] *= 60  # outlier channels, as in LLM activations
    w = torch.randn(32, 64, generator=g) * 0.1
    ref = x @ w.t()

    def w8a8_per_tensor(x, w):
        xs = x.abs().max() / 127
        codes, scale = int8_per_channel(w)
        return (torch.round(x / xs).clamp(-127, 127) * xs) @ (codes.float() * scale.unsqueeze(1)).t()

    s = smoothing_scales(x.abs().amax(0), [w], 0.5)
    ones = torch.ones(64)
    norm, (w_s,) = smooth(s, ones, [w])
    smoothed = w8a8_per_tensor(x * norm, w_s)
    assert sqnr_db(ref, smoothed) > sqnr_db(ref, w8a8_per_tensor(x, w)) + 6


# --- Checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NAMED))
def test_save_load_round_trip(tmp_path, name):
    model = arm_model()
    quantize(model, tiny_schemes()[name], CALIB)
    path = save_quantized(model, None, tmp_path / "q")
    config = json.loads((path / "quantization_config.json").read_text())
    assert scheme_from_dict(config["scheme"]) == model.quantization_scheme
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    loaded, tokenizer = M.load(path)  # models.load delegates to load_quantized
    assert loaded.quantization_scheme == model.quantization_scheme
    assert sorted(M.arm_sites(loaded)) == sorted(M.arm_sites(model))
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


def test_int4_checkpoint_is_at_most_0_3x_fp16_for_linear_weights(tmp_path):
    from safetensors import safe_open

    model = arm_model()
    quantize(model, W4A16(group_size=32, symmetric=False))
    path = save_quantized(model, None, tmp_path / "q")
    linear_bytes = fp16_bytes = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name, kind in json.loads((path / "quantization_config.json").read_text())["modules"].items():
            keys = [k for k in f.keys() if k.startswith(name + ".")]
            linear_bytes += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
            m = model.get_submodule(name)
            fp16_bytes += m.in_features * m.out_features * 2
            assert f.get_tensor(name + ".qweight").dtype == torch.uint8
    assert linear_bytes <= 0.3 * fp16_bytes


def test_load_applies_arm_overrides(tmp_path):
    model = arm_model()
    quantize(model, W8A16())
    path = save_quantized(model, None, tmp_path / "q")
    loaded, _ = load_quantized(path, arm="none")
    assert not M.arm_sites(loaded)
    loaded, _ = load_quantized(path, layers=[0, 1])
    assert sorted(M.arm_sites(loaded)) == [0, 1]


# --- Bad input ----------------------------------------------------------------------------------


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown scheme 'w3a16'"):
        quantize(arm_model(), "w3a16")
    with pytest.raises(TypeError, match="unknown quantization scheme"):
        quantize(arm_model(), {"bits": 4})
    with pytest.raises(ValueError, match="unknown quantization scheme 'w2'"):
        scheme_from_dict({"scheme": "w2", "version": 1})


def test_invalid_configs():
    with pytest.raises(ValueError, match="method='gptx'|method="):
        W4A16(method="gptx")
    with pytest.raises(ValueError, match="act_order=True only applies"):
        W4A16(act_order=True)
    assert W4A16().act_order is False and W4A16(method="gptq").act_order is True
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        W8A8(smoothquant_alpha=1.5)
    with pytest.raises(ValueError, match="kind='int4'"):
        BnB("int4")
    assert scheme_from_dict(W4A16(64, True, "gptq", True).to_dict()) == W4A16(64, True, "gptq", True)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_group_size_that_does_not_divide_the_layer_is_padded(tmp_path, method):
    # Documented choice: pad with zero columns (SmolLM2's width 576 with groups of 128 needs it).
    model = arm_model()
    with torch.no_grad():
        ref = model(TOKENS).logits
    quantize(model, W4A16(group_size=48, method=method), CALIB)  # widths 64 and 128 -> 96 and 144
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.qweight.shape == (64, 48) and q_proj.scale.shape == (64, 2)
    assert q_proj.dequantized_weight().shape == (64, 64)
    with torch.no_grad():
        assert sqnr_db(ref, model(TOKENS).logits) > 12
        path = save_quantized(model, None, tmp_path / "q")
        assert torch.equal(M.load(path)[0](TOKENS).logits, model(TOKENS).logits)


def test_padding_does_not_change_the_partial_group():
    w = torch.randn(8, 72)
    codes, scale, zero = int4_groupwise(w, 32, symmetric=False)
    assert codes.shape == (8, 96) and scale.shape == (8, 3)
    assert torch.all(codes[:, 72:] == zero[:, 2:].to(torch.uint8))  # padding codes are exactly 0.0
    tail_codes, tail_scale, tail_zero = int4_groupwise(w[:, 64:], 8, symmetric=False)
    torch.testing.assert_close(scale[:, 2:], tail_scale)
    w_hat = dequantize_int4(pack_int4(codes), scale, zero, in_features=72)
    assert w_hat.shape == (8, 72) and sqnr_db(w, w_hat) > 17


def test_calibration_data_is_required_where_needed():
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        quantize(arm_model(), W4A16(group_size=32, method="gptq"))
    with pytest.raises(ValueError, match="SmoothQuant needs calibration data"):
        quantize(arm_model(), W8A8(smoothquant_alpha=0.5))


def test_quantizing_twice_is_refused(tmp_path):
    model = quantize(arm_model(), W8A16())
    with pytest.raises(ValueError, match="already quantized .*w8a16"):
        quantize(model, W4A16(group_size=32))
    save_quantized(model, None, tmp_path / "q")
    loaded, _ = M.load(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(loaded, W8A16())


def test_corrupt_and_truncated_checkpoints(tmp_path):
    path = save_quantized(quantize(arm_model(), W8A16()), None, tmp_path / "q")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        M.load(path)
    weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        M.load(path)
    # Without the recorded checksum, safetensors' own check still names the file.
    config = json.loads((path / "quantization_config.json").read_text())
    config["weights"].pop("sha256")
    (path / "quantization_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        M.load(path)
    (path / "quantization_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        M.load(path)


def test_failed_or_refused_save_leaves_nothing_half_written(tmp_path):
    model = quantize(arm_model(), W8A16())

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, BrokenTokenizer(), tmp_path / "q")
    assert os.listdir(tmp_path) == []
    save_quantized(model, None, tmp_path / "q")
    before = sorted(os.listdir(tmp_path / "q"))
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(model, None, tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == ["q"] and sorted(os.listdir(tmp_path / "q")) == before
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(arm_model(), None, tmp_path / "f")


def test_command_line_scheme_options():
    from armquant.cli import build_parser
    from armquant.quantize import _scheme_from_args

    parse = lambda *a: build_parser().parse_args(["quantize", "m", "out", *a])  # noqa: E731
    assert _scheme_from_args(parse("--scheme", "w4a16-g128-rtn", "--group-size", "64", "--symmetric")) == W4A16(64, True)
    assert _scheme_from_args(parse("--scheme", "w4a16-g128-gptq")) == W4A16(method="gptq", act_order=True)
    assert _scheme_from_args(parse("--scheme", "w4a16-g128-gptq", "--no-act-order")) == W4A16(method="gptq", act_order=False)
    assert _scheme_from_args(parse("--scheme", "w4a16-g128-gptq", "--method", "rtn")) == W4A16(method="rtn")
    assert _scheme_from_args(parse("--scheme", "w4a16-g128-rtn", "--method", "gptq")).act_order is True
    assert _scheme_from_args(parse("--scheme", "w8a8", "--smoothquant-alpha", "0.8")) == W8A8(smoothquant_alpha=0.8)
    with pytest.raises(ValueError, match="scheme w8a16 takes no --group-size"):
        _scheme_from_args(parse("--scheme", "w8a16", "--group-size", "64"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 16, 17, 300])
def test_quantized_modules_on_cuda_match_cpu(rows):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536)
    x = torch.randn(rows, 576)
    for module in (
        Int8WeightLinear.from_linear(linear, W8A16()),
        Int4WeightLinear.from_linear(linear, W4A16(group_size=64)),
        Int8DynamicLinear.from_linear(linear, W8A8()),
    ):
        cpu = module(x)
        gpu = module.to("cuda")(x.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3, msg=type(module).__name__)
        assert sqnr_db(linear(x).detach(), gpu) > 15


def test_int8_matmul_is_exact_integer_arithmetic():
    from armquant.quantize import _int8_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 2500), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (40, 2500), dtype=torch.int8, generator=g)
    b[0] = 127
    a[0] = 127  # the largest possible dot product: 2500 * 127**2 > 2**24
    assert torch.equal(_int8_matmul(a, b), torch._int_mm(a, b.t()))
