"""armquant: quantize, export and serve language models that carry ARM (arXiv 2510.01032)."""

from armquant.arm import ARM, ARMConfig, PRESETS, arm, arm_reference
from armquant.generate import Engine, SamplingParams
from armquant.runtime import session

__all__ = ["ARM", "ARMConfig", "PRESETS", "Engine", "SamplingParams", "arm", "arm_reference", "session"]
__version__ = "0.1.0"
