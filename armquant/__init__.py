"""armquant: quantize, export and serve language models that carry ARM (arXiv 2510.01032)."""

from armquant.arm import ARM, ARMConfig, PRESETS, arm, arm_reference

__all__ = ["ARM", "ARMConfig", "PRESETS", "arm", "arm_reference", "ort_library_path"]
__version__ = "0.1.0"


def ort_library_path() -> str:
    """Path of libarmquant_ort.so, the ONNX Runtime custom-op library (op ARM, domain armquant).

    Use it as `SessionOptions.register_custom_ops_library(armquant.ort_library_path())`.
    Raises FileNotFoundError, saying how to build it, when it is not built.
    """
    from armquant import _native  # loaded on use: `python -m armquant._native` stays clean

    return _native.ort_library_path()
