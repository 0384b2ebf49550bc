"""armquant: quantize, export and serve language models that carry ARM (arXiv 2510.01032)."""

from armquant.arm import ARM, ARMConfig, PRESETS, arm, arm_reference
from armquant import quantize  # the module is callable: armquant.quantize(model, scheme)
from armquant.quantize import BnB, W4A16, W8A8, W8A16

__all__ = ["ARM", "ARMConfig", "PRESETS", "arm", "arm_reference", "quantize", "W8A16", "W4A16", "W8A8", "BnB"]
__version__ = "0.1.0"
