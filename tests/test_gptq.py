"""GPTQ math: the Hessian, the grid, and the reason it exists (beating round-to-nearest)."""

import pytest
import torch
from conftest import tiny_model

from armquant.gptq import accumulate_hessian, gptq
from armquant.quantize import dequantize_int4, int4_groupwise, pack_int4


def _correlated_inputs(n=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, k // 8, generator=g)
    mix = torch.randn(k // 8, k, generator=g)
    return latent @ mix + 0.05 * torch.randn(n, k, generator=g)  # [n, K], strongly correlated columns


def _output_error(x, w, codes, scale, zero, g_idx=None):
    w_hat = dequantize_int4(pack_int4(codes), scale, zero, g_idx=g_idx)
    return ((x @ w.t() - x @ w_hat.t()) ** 2).mean().item()


def test_hessian_accumulation_is_the_mean_over_chunks():
    x = torch.randn(300, 16)
    h, count = torch.zeros(16, 16), 0
    for chunk in x.split(70):
        h, count = accumulate_hessian(h, count, chunk.unsqueeze(0))  # [1, n, K] like a layer input
    assert count == 300
    torch.testing.assert_close(h, 2.0 * x.t() @ x / 300, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_with_correlated_inputs(symmetric, act_order):
    x = _correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    h, _ = accumulate_hessian(torch.zeros(128, 128), 0, x)
    rtn = _output_error(x, w, *int4_groupwise(w, 32, symmetric))
    ours = _output_error(x, w, *gptq(w, h, 32, symmetric, act_order=act_order))
    assert ours < 0.5 * rtn, f"GPTQ output MSE {ours:.4g} vs RTN {rtn:.4g}"


def test_gptq_codes_lie_on_the_grid_and_shapes_match_the_layout():
    w = torch.randn(8, 64)
    h, _ = accumulate_hessian(torch.zeros(64, 64), 0, torch.randn(100, 64))
    codes, scale, zero, g_idx = gptq(w, h, 16, symmetric=False, act_order=False)
    assert g_idx is None
    codes, scale, zero, g_idx = gptq(w, h, 16, symmetric=False, act_order=True)
    assert codes.dtype == torch.uint8 and codes.shape == (8, 64) and int(codes.max()) <= 15
    assert scale.shape == zero.shape == (8, 4)
    assert torch.equal(zero, zero.round()) and float(zero.min()) >= 0 and float(zero.max()) <= 15
    # act-order: every group holds group_size columns, formed by decreasing Hessian diagonal.
    assert g_idx.dtype == torch.int32 and torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 16))
    order = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(g_idx[order].long(), torch.arange(64) // 16)


def test_act_order_groups_follow_the_hessian_not_the_storage_order():
    # Important inputs scattered over the columns: act-order gathers them into the same groups,
    # which only a per-column group index (g_idx) can express.
    x = _correlated_inputs(k=64) * torch.linspace(0.1, 3.0, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(2))]
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    h, _ = accumulate_hessian(torch.zeros(64, 64), 0, x)
    codes, scale, zero, g_idx = gptq(w, h, 16, symmetric=False, act_order=True)
    assert not torch.equal(g_idx.long(), torch.arange(64) // 16)
    w_hat = dequantize_int4(pack_int4(codes), scale, zero, g_idx=g_idx)
    consecutive = dequantize_int4(pack_int4(codes), scale, zero)  # ignoring g_idx reads other grids
    assert (w_hat - w).abs().max() < (consecutive - w).abs().max()


def test_gptq_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="hessian has shape"):
        gptq(torch.randn(4, 32), torch.eye(16), 16, True)
    with pytest.raises(ValueError, match="group_size=24 must divide in_features=32"):
        gptq(torch.randn(4, 32), torch.eye(32), 24, True)


def test_sequential_gptq_on_a_model_leaves_no_hooks_and_quantizes_every_layer():
    import armquant.models as M
    from armquant.quantize import W4A16, Int4WeightLinear, quantize, target_linears

    model = tiny_model("llama")
    M.apply_arm(model, M.ARMModelConfig.preset("llama-3.1"))
    x = torch.randint(0, 256, (2, 24))
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).logits
    hooks_before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    quantize(model, W4A16(group_size=32, method="gptq"), data=calib)
    assert all(isinstance(m, Int4WeightLinear) for m in target_linears(model).values())
    hooks_after = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules() if n in hooks_before}
    assert hooks_after == {n: hooks_before[n] for n in hooks_after}
    with torch.no_grad():
        y = model(x).logits
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean())
    assert sqnr > 15, f"SQNR {sqnr:.1f} dB"


def test_int8_gptq_beats_int8_rtn_per_channel():
    from torch import nn

    from armquant.quantize import W8A16, Int8WeightLinear, _gptq_linear

    x = _correlated_inputs()
    linear = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)))
    h, _ = accumulate_hessian(torch.zeros(128, 128), 0, x)
    rtn = Int8WeightLinear.from_linear(linear, W8A16())
    ours = _gptq_linear(linear, h, W8A16(method="gptq"))
    assert isinstance(ours, Int8WeightLinear) and ours.weight.dtype == torch.int8 and ours.scale.shape == (64,)
    with torch.no_grad():
        ref = linear(x)
        err_rtn = (rtn(x) - ref).pow(2).mean().item()
        err_gptq = (ours(x) - ref).pow(2).mean().item()
    assert err_gptq < 0.5 * err_rtn, f"GPTQ output MSE {err_gptq:.4g} vs RTN {err_rtn:.4g}"
