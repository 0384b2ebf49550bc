"""armquant: quantize, export and serve language models that carry ARM (arXiv 2510.01032)."""

from armquant._native import ort_library_path
from armquant.arm import ARM, ARMConfig, PRESETS, arm, arm_reference

__all__ = ["ARM", "ARMConfig", "PRESETS", "arm", "arm_reference", "ort_library_path"]
__version__ = "0.1.0"
