"""A tiny random Llama exported to ONNX with a KV cache, with a tiny tokenizer and chat template.

It has the I/O contract of an armquant export (optimum names, past [batch, kv_heads, past_len,
head_dim]), so the runtime, engine and server are tested without the real model.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny model for tests",
    "a river runs through the old town and under the bridge",
    "numbers one two three four five six seven eight nine ten",
    "user assistant system said asked answered",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(out: Path, seed: int = 0) -> Path:
    """Save a seeded tiny LlamaForCausalLM + tokenizer and export it with optimum to `out`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from optimum.exporters.onnx import main_export

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    src = out.parent / (out.name + "-torch")
    model.save_pretrained(src)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(src)
    tokenizer.save_pretrained(src)
    main_export(str(src), output=str(out), task="text-generation-with-past", no_post_process=True)
    return out


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    """One export per test process, removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="armquant-tiny-onnx-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_model_dir(root / "tiny")


class SlowSession:
    """An ONNX Runtime session that waits `delay` seconds before each run, so a request stays in
    flight long enough for a test to act on it (cancel, disconnect, fill the queue)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def run(self, *args, **kwargs):
        import time

        time.sleep(self.delay)
        return self.inner.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)
