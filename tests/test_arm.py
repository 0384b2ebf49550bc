"""The reference ARM op against the specification: known answers, hand-checked steps, a second
plain implementation (tests/spec_arm.py), and the properties every implementation must show."""

import numpy as np
import pytest
import torch

from armquant.arm import ARM, ARMConfig, PRESETS, arm, arm_reference, philox4x32_10, uniform
from spec_arm import arm_spec, u_of

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that NaN == NaN and -0.0 != +0.0."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_matches_spec(x, mask=None, positions=None, **attrs):
    config = ARMConfig(**attrs)
    got = arm_reference(x, mask, positions, config)
    x3 = x if x.dim() == 3 else x[None]
    expected, _ = arm_spec(
        x3.float().numpy(), None if mask is None else mask.reshape(x3.shape[:2]).numpy(),
        None if positions is None else positions.reshape(x3.shape[:2]).numpy(), **attrs,
    )
    expected = torch.from_numpy(expected).to(x.dtype).reshape(x.shape)
    assert torch.equal(bits(got), bits(expected))
    return got


# --- Philox ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "counter,key,output",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_known_answers(counter, key, output):
    assert tuple(int(w) for w in philox4x32_10(counter, key)) == output


def test_uniform_matches_plain_philox_and_lies_in_unit_interval():
    channels = torch.tensor([0, 1, 7, 12345, 2**31])
    positions = torch.tensor([0, 3, 2**32 + 5, 17, 2**40])
    seed = 2**33 + 99
    u = uniform(channels, positions, seed)
    assert u.dtype == torch.float32
    assert ((u >= 0) & (u < 1)).all()
    expected = [u_of(int(c), int(p), seed) for c, p in zip(channels, positions)]
    assert u.tolist() == [float(e) for e in expected]


# --- Hand-checked steps ------------------------------------------------------------------------

HAND = torch.tensor([[-4.0, -1.0, 0.5, 0.25, 2.0, 3.0, -0.125, 8.0]])  # one token, I = 8
# a sorted: .125 .25 .5 1 2 3 4 8 -> r = 3, median 1; |a - 1| sorted: 0 .5 .75 .875 1 2 3 7 -> MAD .875
# kappa = c = 1: eps = .875, three values below it; p1 = 50 on signed x: h = 3.5 -> Qp = .375; Mneg = 4


def hand(**attrs):
    base = dict(c=1.0, kappa=1.0, k=1.0, pmin=0.0, pmax=1.0, p1=50.0, scope="token")
    base.update(attrs)
    return arm_reference(HAND, config=ARMConfig(**base))[0], base


def test_hand_checked_median_mad_share_and_targets():
    y, _ = hand()
    changed = (y != HAND[0]).nonzero()[:, 0].tolist()
    assert changed == [2, 3, 6]  # the three smallest |x|: 0.5, 0.25, -0.125
    assert y[2].item() == np.float32(u_of(2, 0, 0) * np.float32(0.375))
    assert y[3].item() == np.float32(u_of(3, 0, 0) * np.float32(0.375))
    assert y[6].item() == -np.float32(u_of(6, 0, 0) * np.float32(4.0))


def test_hand_checked_eps_scales_with_c():
    # c = 0.6: eps = .525 -> only .125, .25, .5 are below... and with c = .3: eps = .2625 -> two.
    y, _ = hand(c=0.3)
    assert (y != HAND[0]).nonzero()[:, 0].tolist() == [3, 6]


def test_hand_checked_share_is_clamped():
    y, _ = hand(pmax=0.25)  # 3/8 clamped to 1/4 -> n = 2
    assert (y != HAND[0]).nonzero()[:, 0].tolist() == [3, 6]
    y, _ = hand(c=0.0, pmin=0.5)  # nothing below eps = 0, but pmin = .5 -> n = 4
    assert (y != HAND[0]).nonzero()[:, 0].tolist() == [1, 2, 3, 6]


def test_hand_checked_n_rounds_half_to_even_and_is_at_least_one():
    x = torch.arange(1, 11, dtype=torch.float32)[None]  # N = 10
    y = arm_reference(x, config=ARMConfig(share="fixed", c=0.25, scope="token"))  # 2.5 -> 2
    assert (y != x).sum().item() == 2
    x4 = x[:, :4]
    y = arm_reference(x4, config=ARMConfig(share="fixed", c=0.875, scope="token"))  # 3.5 -> 4
    assert (y != x4).sum().item() == 4
    # c is a float32 attribute: float32(0.35) * 10 = 3.4999999 -> 3, not 4
    y = arm_reference(x, config=ARMConfig(share="fixed", c=0.35, scope="token"))
    assert (y != x).sum().item() == 3
    y = arm_reference(x, config=ARMConfig(share="fixed", c=0.0, scope="token"))  # 0 -> at least 1
    assert (y != x).sum().item() == 1


def test_hand_checked_ties_break_by_flat_index():
    x = torch.tensor([[3.0, 1.0, -1.0, 1.0, 1.0, 2.0]])
    y = arm_reference(x, config=ARMConfig(share="fixed", c=0.5, scope="token"))  # n = 3 of four |x| = 1
    assert (y != x).nonzero()[:, 1].tolist() == [1, 2, 3]


def test_hand_checked_percentile_interpolates_like_numpy():
    x = torch.tensor([[-3.0, 1.0, 2.0, 4.0, 10.0]])
    for p1, percentile_of in [(99.5, "signed"), (90.0, "abs"), (0.0, "signed"), (100.0, "abs"), (37.0, "signed")]:
        config = ARMConfig(share="fixed", c=0.2, p1=p1, percentile_of=percentile_of, scope="token")
        y = arm_reference(x, config=config)  # n = 1: the element 1.0, index 1
        pool = np.abs(x[0].numpy()) if percentile_of == "abs" else x[0].numpy()
        qp = np.float32(np.percentile(pool.astype(np.float64), p1))
        assert y[0, 1].item() == np.float32(u_of(1, 0, 0) * qp)


def test_zeros_of_both_signs_count_as_positive():
    x = torch.tensor([[-0.0, 0.0, -5.0, 5.0]])
    y = arm_reference(x, config=ARMConfig(share="fixed", c=0.5, p1=100.0, scope="token"))
    assert y[0, 0].item() >= 0 and y[0, 1].item() >= 0
    assert y[0, 0].item() == np.float32(u_of(0, 0, 0) * np.float32(5.0))


def test_negative_only_input_uses_signed_percentile():
    x = -torch.arange(1, 9, dtype=torch.float32)[None]
    assert_matches_spec(x[None], share="fixed", c=0.5, p1=90.0)


# --- Against the plain implementation ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["tensor", "sequence", "token"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_matches_plain_spec_implementation(dtype, scope, preset):
    g = torch.Generator().manual_seed(hash((str(dtype), scope, preset)) % 2**31)
    x = (torch.randn(2, 5, 24, generator=g) * torch.rand(2, 5, 1, generator=g) * 3).to(dtype)
    x[0, 1, :4] = 0.0
    x[1, 2, 3] = -0.0
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[1, :2] = 0
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]) + 2**32 - 2
    attrs = {**PRESETS[preset].to_dict(), "scope": scope, "seed": 7}
    assert_matches_spec(x, mask, positions, **attrs)


def test_nonfinite_values_pass_through_and_are_left_out_of_statistics():
    x = torch.randn(1, 3, 16)
    x[0, 0, 0], x[0, 1, 5], x[0, 2, 9] = float("nan"), float("inf"), float("-inf")
    y = assert_matches_spec(x, share="fixed", c=0.5)
    assert torch.isnan(y[0, 0, 0]) and y[0, 1, 5] == float("inf") and y[0, 2, 9] == float("-inf")


def test_masked_tokens_pass_through_and_empty_groups_change_nothing():
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    y = arm_reference(x, mask, config=ARMConfig(share="fixed", c=0.5))
    assert torch.equal(bits(y[0]), bits(x[0]))  # an empty group
    assert torch.equal(bits(y[1, 2]), bits(x[1, 2]))  # a masked token
    assert (y[1] != x[1]).sum() == round(0.5 * 24)
    all_nan = torch.full((1, 2, 4), float("nan"))
    assert torch.equal(bits(arm_reference(all_nan)), bits(all_nan))


def test_single_valid_element_and_all_equal_values():
    assert_matches_spec(torch.tensor([[[2.5]]]))
    assert_matches_spec(torch.full((1, 3, 7), 0.75), share="fixed", c=0.3, scope="tensor")


# --- Properties --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_and_bounded(dtype):
    x = torch.randn(2, 16, 64).to(dtype)
    config = PRESETS["llama-3.1"]
    y1, y2 = arm_reference(x, config=config), arm_reference(x, config=config)
    assert torch.equal(bits(y1), bits(y2))
    for b in range(2):
        changed = y1[b] != x[b]
        n_max = round(config.pmax * x[b].numel())
        assert 0 < changed.sum() <= n_max
        xs = x[b].float().flatten().sort().values
        h = (xs.numel() - 1) * config.p1 / 100
        bound = max(abs(float(np.percentile(xs.double().numpy(), config.p1))), abs(xs.min().item()))
        assert y1[b][changed].float().abs().max() <= bound * (1 + 1e-2) + 1e-6, h


def test_seed_and_positions_change_the_draws():
    x = torch.randn(1, 8, 32)
    base = arm_reference(x)
    assert not torch.equal(base, arm_reference(x, config=ARMConfig(seed=1)))
    assert not torch.equal(base, arm_reference(x, positions=torch.arange(8)[None] + 100))
    assert torch.equal(base, arm_reference(x, positions=torch.arange(8)[None]))


@pytest.mark.parametrize("scope", ["sequence", "token"])
def test_batch_invariance_with_padding(scope):
    torch.manual_seed(0)
    row = torch.randn(1, 6, 32)
    other = torch.randn(1, 9, 32) * 10
    config = ARMConfig(scope=scope)
    alone = arm_reference(row, config=config)
    # left-pad the row to 9 tokens inside a batch with another row; positions as generate gives them
    padded = torch.cat([torch.randn(1, 3, 32) * 100, row], dim=1)
    x = torch.cat([padded, other])
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5], list(range(9))])
    y = arm_reference(x, mask, positions, config)
    assert torch.equal(bits(y[0, 3:]), bits(alone[0]))


def test_rank2_input_means_batch_of_one():
    x = torch.randn(5, 16)
    assert torch.equal(arm_reference(x), arm_reference(x[None])[0])
    assert torch.equal(arm_reference(x, torch.ones(5, dtype=torch.bool)), arm_reference(x))


def test_op_equals_reference_and_module_can_be_disabled():
    x = torch.randn(2, 4, 16)
    config = PRESETS["gemma-3"]
    assert torch.equal(arm(x, config=config), arm_reference(x, config=config))
    module = ARM(config)
    assert torch.equal(module(x), arm_reference(x, config=config))
    module.enabled = False
    assert module(x) is x


def test_op_traces_as_one_node_in_torch_export():
    class M(torch.nn.Module):
        def forward(self, x, mask, positions):
            return arm(torch.nn.functional.silu(x), mask, positions, PRESETS["llama-3.1"]) * 2

    ex = torch.export.export(M(), (torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.int64), torch.arange(4)[None].repeat(2, 1)))
    targets = [n.target for n in ex.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.armquant.arm.default) == 1


# --- Errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "attrs,match",
    [
        (dict(p1=150.0), r"p1=150.0 must lie in \[0, 100\]"),
        (dict(pmin=0.5, pmax=0.2), "pmin=0.5, pmax=0.2 must satisfy"),
        (dict(scope="batch"), "scope='batch' must be one of"),
        (dict(share="median"), "share='median' must be one of"),
        (dict(percentile_of="magnitude"), "percentile_of='magnitude' must be one of"),
        (dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*63\)"),
        (dict(c=float("nan")), "c=nan must be a finite number"),
    ],
)
def test_bad_attributes(attrs, match):
    with pytest.raises(ValueError, match=match):
        ARMConfig(**attrs)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"shape \[B, S, I\] or \[S, I\]; got \[4\]"):
        arm_reference(torch.randn(4))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16; got torch.int64"):
        arm_reference(torch.ones(1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 3\] to match X \[2, 3, 4\]; got \[3, 2\]"):
        arm_reference(torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool or int64"):
        arm_reference(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(TypeError, match="positions must be int64"):
        arm_reference(torch.randn(2, 3, 4), None, torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown ARM attributes"):
        ARMConfig.from_dict({"c": 0.1, "width": 3})


# --- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the reference's CUDA path is checked on a GPU machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_on_cuda_matches_cpu_and_runs_in_a_cuda_graph(dtype, monkeypatch):
    monkeypatch.setenv("ARMQUANT_ARM_BACKEND", "reference")
    x = torch.randn(2, 64, 256).to(dtype)
    x[0, 3, 5] = float("nan")
    mask = torch.ones(2, 64, dtype=torch.int64)
    mask[1, :10] = 0
    positions = torch.arange(64)[None].repeat(2, 1) + 3
    for preset in PRESETS.values():
        expected = arm_reference(x, mask, positions, preset)
        got = arm_reference(x.cuda(), mask.cuda(), positions.cuda(), preset)
        assert torch.equal(bits(got.cpu()), bits(expected))
    static_x, static_mask, static_pos = x.cuda(), mask.cuda(), positions.cuda()
    config = PRESETS["llama-3.1"]
    arm_reference(static_x, static_mask, static_pos, config)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = arm_reference(static_x, static_mask, static_pos, config)
    fresh = torch.randn(2, 64, 256).to(dtype)
    static_x.copy_(fresh.cuda())
    graph.replay()
    assert torch.equal(bits(static_y.cpu()), bits(arm_reference(fresh, mask, positions, config)))
