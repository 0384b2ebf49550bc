"""The comparison table on a tiny model: every scheme, ARM off and on, written in three forms."""

import importlib
import json
import statistics

import torch
from conftest import tiny_model

import armquant.models as M
from armquant.compare import compare, format_markdown, plot


def test_comparison_table_on_a_tiny_model(tmp_path, monkeypatch):
    Q = importlib.import_module("armquant.quantize")  # the module; armquant.quantize is the verb

    # The tiny model is 64 wide: INT4 groups of 32 instead of 128.
    monkeypatch.setitem(Q.NAMED, "w4a16-g32-rtn", Q.W4A16(group_size=32, method="rtn"))
    monkeypatch.setitem(Q.NAMED, "w4a16-g32-gptq", Q.W4A16(group_size=32, method="gptq"))

    def load():
        model = tiny_model("llama")
        M.apply_arm(model, M.ARMModelConfig.preset("llama-3.1"))
        return model

    schemes = ["fp32", "w8a16", "w8a8", "w8a8-sq", "w4a16-g32-rtn", "w4a16-g32-gptq", "nf4"]
    g = torch.Generator().manual_seed(0)
    result = compare(load, schemes, torch.randint(0, 256, (2, 32), generator=g),
                     torch.randint(0, 256, (3, 32), generator=g), seeds=(0, 1, 2), progress=False)
    rows = {r["scheme"]: r for r in result["rows"]}
    assert list(rows) == schemes
    for name, r in rows.items():
        assert [e["arm"] for e in r["evaluations"]] == [False, True, True, True]
        assert [e["seed"] for e in r["evaluations"]] == [None, 0, 1, 2]
        ons = [e["perplexity"] for e in r["evaluations"][1:]]
        assert abs(r["ppl_arm_on_mean"] - statistics.fmean(ons)) < 1e-9
        assert abs(r["ppl_arm_on_std"] - statistics.stdev(ons)) < 1e-9
        assert r["quantize_seconds"] >= 0 and r["model_bytes"] > 0
    assert rows["fp32"]["delta_arm_off_pct"] == 0.0 and rows["fp32"]["config"] is None
    assert rows["fp32"]["linear_bytes_vs_fp16"] == 2.0
    assert rows["w8a16"]["linear_bytes_vs_fp16"] < 0.55
    assert rows["w4a16-g32-rtn"]["linear_bytes_vs_fp16"] < 0.3
    assert rows["nf4"]["model_bytes"] < rows["w8a16"]["model_bytes"] < rows["fp32"]["model_bytes"]

    table = format_markdown(result)
    assert table.count("\n") == 2 + len(schemes)
    assert "ppl ARM on (mean ± std, 3 seeds)" in table
    plot(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result)  # the record is plain JSON


def test_compare_rejects_unknown_schemes_before_any_work():
    import pytest

    calls = []
    with pytest.raises(ValueError, match="unknown scheme 'w3'"):
        compare(lambda: calls.append(1), ["fp32", "w3"], torch.zeros(1, 4, dtype=torch.long), None)
    assert calls == []
