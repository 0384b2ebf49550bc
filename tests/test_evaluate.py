"""Perplexity arithmetic and the ARM off/on report."""

import math

import pytest
import torch

from armquant.evaluate import evaluate, format_table, perplexity
from armquant.models import ARMModelConfig, apply_arm
from conftest import tiny_model


def test_uniform_logits_give_vocabulary_size():
    windows = torch.randint(0, 50, (3, 9))
    result = perplexity(lambda ids: torch.zeros(1, ids.shape[1], 50), windows, progress=False)
    assert result["tokens"] == 3 * 8
    assert result["perplexity"] == pytest.approx(50.0, rel=1e-6)


def test_matches_model_loss():
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (2, 16))
    result = perplexity(model, windows, progress=False)
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)


def test_report_has_arm_off_and_each_seed():
    model = apply_arm(tiny_model("qwen2"), ARMModelConfig())
    windows = torch.randint(0, 256, (2, 32))
    report = evaluate(model, windows, seeds=(0, 1, 2), progress=False)
    assert [(r["arm"], r["seed"]) for r in report["rows"]] == [(False, None), (True, 0), (True, 1), (True, 2)]
    on = [r["perplexity"] for r in report["rows"] if r["arm"]]
    assert report["summary"]["arm_on_mean"] == pytest.approx(sum(on) / 3)
    assert len(set(on)) == 3  # seeds draw different values
    assert "mean ± std (3 seeds)" in format_table(report)


def test_model_without_arm_reports_only_the_off_side():
    report = evaluate(tiny_model("llama"), torch.randint(0, 256, (1, 16)), progress=False)
    assert [r["arm"] for r in report["rows"]] == [False] and "arm_on_mean" not in report["summary"]
