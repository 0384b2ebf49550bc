"""Calibration: streaming statistics against numpy, the ARM off/on pairing, the report, bad input."""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pytest
import torch

from conftest import bundled_available, tiny_model

import armquant
from armquant.calibrate import (
    PERCENTILES, CalibrationReport, HistogramSpec, TensorStats, _merge_moments, calibrate, load_artifacts, observe,
)
from armquant.models import ARMModelConfig, apply_arm, save

SPEC = HistogramSpec()
RES = SPEC.relative_resolution  # 0.46%: one histogram bin


def numpy_sqnr(batches, qmax, per_token):
    signal = noise = 0.0
    for x in batches:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        absmax = np.abs(x).max(axis=-1, keepdims=True) if per_token else np.abs(x).max()
        scale = np.maximum(absmax / qmax, np.finfo(np.float32).tiny)
        q = np.clip(np.round(x / scale), -qmax, qmax) * scale
        signal += (x**2).sum()
        noise += ((x - q) ** 2).sum()
    return 10 * math.log10(signal / noise)


def batches_of_known_data(seed=0):
    """Three batches of different shapes and scales: a heavy-tailed mix like real activations."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_t(3, size=(2, 300, 48)).astype(np.float32) * 0.5,
        (rng.standard_normal((1, 500, 48)) * 2 + 0.3).astype(np.float32),
        rng.laplace(0, 0.1, size=(700, 48)).astype(np.float32),
    ]


def test_statistics_match_numpy():
    batches = batches_of_known_data()
    stats = TensorStats(48)
    for b in batches:
        stats.update(torch.from_numpy(b))
    allv = np.concatenate([b.reshape(-1) for b in batches]).astype(np.float64)
    absmax = np.abs(allv).max()
    s = stats.summary(near_zero=0.05)
    assert s["count"] == allv.size and s["nonfinite"] == 0
    assert s["min"] == allv.min() and s["max"] == allv.max() and s["absmax"] == absmax
    assert s["mean"] == pytest.approx(allv.mean(), rel=1e-6, abs=1e-7)
    assert s["std"] == pytest.approx(allv.std(), rel=1e-6)
    kurtosis = ((allv - allv.mean()) ** 4).mean() / allv.var() ** 2
    assert s["kurtosis"] == pytest.approx(kurtosis, rel=1e-4)
    assert s["crest"] == pytest.approx(absmax / allv.std(), rel=1e-6)
    # Percentiles of |x| come from the histogram: within one bin (relative 0.46%) of numpy's.
    for name, q in PERCENTILES.items():
        exact = np.percentile(np.abs(allv), q)
        assert abs(s[name] / exact - 1) <= RES, (name, s[name], exact)
    # The near-zero share interpolates inside one bin: bracketed by the exact shares one bin away.
    a = np.abs(allv)
    assert (a < 0.05 / (1 + RES)).mean() <= s["near_zero"] <= (a < 0.05 * (1 + RES)).mean()
    np.testing.assert_array_equal(stats.channel_absmax.numpy(), np.max([np.abs(b.reshape(-1, 48)).max(0) for b in batches], axis=0))
    for fmt, qmax in (("int8", 127), ("int4", 7)):
        for g in ("tensor", "token"):
            assert s["sqnr_db"][f"{fmt}_{g}"] == pytest.approx(numpy_sqnr(batches, qmax, g == "token"), abs=0.01)


def test_moments_merge_equals_one_pass():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1000) ** 3 + 5

    def moments(v):
        d = v - v.mean()
        return (v.size, v.mean(), (d**2).sum(), (d**3).sum(), (d**4).sum())

    merged = moments(x[:10])
    for part in np.split(x[10:], [300, 310, 900]):
        merged = _merge_moments(merged, moments(part))
    np.testing.assert_allclose(merged, moments(x), rtol=1e-10)


def test_histogram_bins_hold_their_values():
    x = torch.tensor([0.0, -0.0, 1e-12, -1e-12, 1e-9, 0.5, -0.5, 3.0, -7.25, 123.0, 1e7, -1e7])
    bins = SPEC.bin_of(x)
    edges = SPEC.magnitude_edges()
    center = SPEC.bins_per_side
    for value, b in zip(x.tolist(), bins.tolist()):
        k = abs(b - center)  # 0: zero bin; k >= 1: magnitude bin k - 1, edges[k] .. edges[k + 1]
        assert (b > center) == (value > 0 and k > 0) and (b < center) == (value < 0 and k > 0)
        if abs(value) < edges[1]:
            assert k == 0
        elif abs(value) < edges[-1]:
            assert edges[k] <= abs(value) * (1 + 1e-6) and abs(value) < edges[k + 1] * (1 + 1e-6)
        else:
            assert k == SPEC.bins_per_side  # beyond the range: the outermost bin


def test_nonfinite_values_are_counted_not_fatal():
    x = torch.randn(64, 16)
    bad = x.clone()
    bad[3, 4], bad[10, 0], bad[20, 7] = float("inf"), float("nan"), float("-inf")
    clean = TensorStats(16)
    clean.update(torch.where(torch.isfinite(bad), bad, torch.zeros(())).reshape(-1, 16)[torch.isfinite(bad).all(1)])
    stats = TensorStats(16)
    stats.update(bad)
    s = stats.summary(0.01)
    assert s["nonfinite"] == 3 and s["count"] == bad.numel() - 3
    finite = bad[torch.isfinite(bad)].double().numpy()
    assert s["mean"] == pytest.approx(finite.mean(), abs=1e-6) and s["max"] == finite.max()
    assert all(math.isfinite(v) for v in s["sqnr_db"].values())


def arm_model(layers=(0,), seed=0):
    model = tiny_model("llama", seed=seed)
    apply_arm(model, ARMModelConfig.preset("llama-3.1", layers=layers))
    return model


def windows(n=3, length=64, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def test_before_after_pairing():
    model = arm_model(layers=(1,))
    report = calibrate(model, windows(), progress=False)
    assert report.data["sides"] == ["off", "on"]
    # Before the ARM layer nothing differs; the ARM layer's input is the same with ARM on or off.
    for site in ("attn_in", "o_in", "mlp_in", "act_out", "down_in"):
        assert report.stats(0, site, "off") == report.stats(0, site, "on")
    for key in ("attn_in", "mlp_in", "act_out"):
        assert report.stats(1, key, "off") == report.stats(1, key, "on")
    # With ARM off, ARM is the identity: its output statistics are its input's.
    assert report.stats(1, "arm_out", "off") == report.stats(1, "act_out", "off")
    # With ARM on, it moves near-zero values outward, and its extremes do not grow.
    on, off = report.stats(1, "arm_out", "on"), report.stats(1, "arm_out", "off")
    assert on["near_zero"] < off["near_zero"]
    assert on["absmax"] <= off["absmax"]
    assert report.stats(1, "down_in", "on") != report.stats(1, "down_in", "off")
    assert [r["where"] for r in report.summary][0] == "layer 1"


def test_same_seed_same_report_and_hooks_removed():
    model = arm_model()
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    a = calibrate(model, windows(), seed=7, progress=False)
    b = calibrate(model, windows(), seed=7, progress=False)
    strip = lambda d: {k: v for k, v in d.items() if k not in ("elapsed_s", "environment")}  # noqa: E731
    assert json.dumps(strip(a.data), default=str) == json.dumps(strip(b.data), default=str)
    assert a.data["arm"]["config"]["0"]["seed"] == 7  # the report records the seed it ran with
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks_before
    assert all(site.arm.config.seed == 0 for site in armquant.models.arm_sites(model).values())  # seed restored


def test_hooks_removed_when_the_pass_fails():
    model = arm_model()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def record(layer, site, x):
        raise RuntimeError("observer failed")

    with pytest.raises(RuntimeError, match="observer failed"):
        with observe(model, record), torch.no_grad():
            model(windows(1))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_report_reloads_and_draws(tmp_path):
    from armquant.plots import plot_histograms, plot_layers

    report = calibrate(arm_model(), windows(), progress=False)
    path = report.save(tmp_path / "report.json")
    loaded = CalibrationReport.load(path)
    assert loaded.data["layers"][0]["sites"]["arm_out"]["on"]["near_zero"] == pytest.approx(report.stats(0, "arm_out", "on")["near_zero"])
    assert loaded.table() == report.table()
    for plot, name in ((plot_histograms, "h.png"), (plot_layers, "l.png")):
        out = plot(loaded.data, tmp_path / name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "l.png", "report.json"]  # no temp files left
    with pytest.raises(ValueError, match="schema"):
        (tmp_path / "other.json").write_text("{}")
        CalibrationReport.load(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="armquant calibrate"):
        CalibrationReport.load(tmp_path / "missing.json")


def test_artifacts_round_trip(tmp_path):
    model = arm_model()
    report = calibrate(model, windows(), progress=False)
    report.save_artifacts(tmp_path)
    tensors, meta = load_artifacts(tmp_path)
    assert meta["side"] == "on" and meta["arm"]["layers"] == [0] and meta["data"]["windows"] == 3
    for i, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                key = f"model.layers.{i}.{name}"
                assert tensors[f"{key}.input_channel_absmax"].shape == (module.in_features,)
                absmax = tensors[f"{key}.input_absmax"].item()
                assert absmax == pytest.approx(tensors[f"{key}.input_channel_absmax"].max().item())
                assert tensors[f"{key}.input_scale_int8"].item() == pytest.approx(absmax / 127)
    down = report.stats(0, "down_in", "on")["absmax"]
    assert tensors["model.layers.0.mlp.down_proj.input_absmax"].item() == pytest.approx(down)


def test_model_without_arm_reports_only_the_off_side():
    report = calibrate(tiny_model("llama"), windows(), progress=False)
    assert report.data["sides"] == ["off"] and report.data["arm"] is None
    assert "no ARM" in report.data["note"] and report.summary == []
    assert "only" in report.table()
    assert all(set(sides) == {"off"} for e in report.data["layers"] for sides in e["sites"].values())


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(string.printable)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_bad_input_messages(tmp_path):
    model = arm_model()
    with pytest.raises(ValueError, match="no windows"):
        calibrate(model, torch.zeros(0, 64, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        calibrate(model, windows(), max_windows=0, progress=False)
    with pytest.raises(ValueError, match="shape"):
        calibrate(model, torch.zeros(64), progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibrate(model, ["too short"], tokenizer=char_tokenizer(), window=512, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibrate(model, [], tokenizer=char_tokenizer(), progress=False)
    with pytest.raises(ValueError, match="tokenizer="):
        calibrate(model, ["some text"], progress=False)
    with pytest.raises(FileNotFoundError, match="data source"):
        calibrate(model, str(tmp_path / "nowhere.txt"), tokenizer=char_tokenizer(), progress=False)


def test_nonfinite_activations_in_a_model_are_reported():
    model = arm_model()
    up = model.model.layers[1].mlp.up_proj
    handle = up.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([5]), float("inf")))
    try:
        report = calibrate(model, windows(2), progress=False)
    finally:
        handle.remove()
    bad = report.stats(1, "down_in", "off")
    assert bad["nonfinite"] > 0 and math.isfinite(bad["std"])
    assert report.stats(0, "down_in", "off")["nonfinite"] == 0


def test_cli_writes_everything_or_nothing(tmp_path, capsys):
    from armquant.cli import main

    model = arm_model()
    ckpt = tmp_path / "ckpt"
    save(model, char_tokenizer(), ckpt)
    text = tmp_path / "text.txt"
    text.write_text("".join(string.ascii_letters[(7 * i) % 52] for i in range(3000)))
    args = ["calibrate", str(ckpt), "--data", str(text), "--window", "64", "--max-windows", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "layer 0, arm_out" in out and "sqnr_int8_tensor" in out
    names = {p.name for p in ckpt.iterdir()}
    assert {"calibration_report.json", "calibration.safetensors", "calibration.json",
            "calibration_histograms.png", "calibration_layers.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    saved = CalibrationReport.load(ckpt / "calibration_report.json").data
    assert saved["data"]["windows"] == 4 and saved["environment"]["git_revision"]
    # A second run refuses to replace the outputs unless asked.
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    # A wrong path and a dataset too short for one window: a clear error and no report.
    assert main(["calibrate", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")]) == 1
    assert "config.json" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("abc")
    assert main(["calibrate", str(ckpt), "--data", str(short), "--out", str(tmp_path / "o2")]) == 1
    assert "fewer than one window" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
@pytest.mark.skipif(not bundled_available(), reason="the bundled SmolLM2-135M is not installed")
def test_bundled_model_arm_layer_statistics():
    model, tokenizer = armquant.models.load("smollm2-135m")
    report = calibrate(model, "sotu:calibration", tokenizer=tokenizer, window=128, max_windows=2, progress=False)
    off, on = report.stats(0, "arm_out", "off"), report.stats(0, "arm_out", "on")
    assert on["near_zero"] < off["near_zero"]
    assert on["absmax"] <= off["absmax"]
    assert len(report.data["layers"]) == 30


def test_calibrate_runs_under_an_accelerate_device_map():
    from armquant.calibrate import _dispatch

    model = _dispatch(arm_model(), "auto")  # CPU only here: everything maps to "cpu"
    report = calibrate(model, windows(1), progress=False)
    assert report.data["sides"] == ["off", "on"] and len(report.data["layers"]) == 2
