"""armquant: quantize, export and serve language models that carry ARM (arXiv 2510.01032).

The public names are imported on first use, so `import armquant` stays light (the op alone
needs only torch and numpy).
"""

import importlib

from armquant.arm import ARM, ARMConfig, PRESETS, arm, arm_reference

# Functions named like their modules are bound eagerly, so the function wins over the submodule.
from armquant.calibrate import calibrate
from armquant.evaluate import evaluate, perplexity
from armquant.quantize import quantize

__version__ = "0.1.0"

_LAZY = {
    "load": "armquant.models",
    "save": "armquant.models",
    "convert": "armquant.models",
    "ARMModelConfig": "armquant.models",
    "session": "armquant.runtime",
    "export": "armquant.onnx",
    "Engine": "armquant.generate",
    "SamplingParams": "armquant.generate",
    "ort_library_path": "armquant._native",  # the ONNX Runtime custom-op library (op ARM)
    "W8A16": "armquant.quantize",
    "W4A16": "armquant.quantize",
    "W8A8": "armquant.quantize",
    "BnB": "armquant.quantize",
}

__all__ = ["ARM", "ARMConfig", "PRESETS", "arm", "arm_reference", "calibrate", "evaluate", "perplexity", "quantize", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'armquant' has no attribute {name!r}")
