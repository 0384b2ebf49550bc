"""armquant: quantize, export and serve language models that carry ARM (arXiv 2510.01032)."""

from armquant.arm import ARM, ARMConfig, PRESETS, arm, arm_reference
from armquant.calibrate import calibrate

__all__ = ["ARM", "ARMConfig", "PRESETS", "arm", "arm_reference", "calibrate"]
__version__ = "0.1.0"
