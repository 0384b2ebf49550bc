"""Builds the native ARM kernels (export/) into armquant/lib/ during `pip install`.

The metadata lives in pyproject.toml; this file only adds the cmake step. Without cmake or a
C++ compiler the install still succeeds, with a warning, and armquant uses the PyTorch
reference of the ARM op. The build needs no torch, so pip's isolated build stays small.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_builder():
    # armquant/__init__ imports torch; load the builder module on its own.
    spec = importlib.util.spec_from_file_location("_armquant_build", ROOT / "armquant" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildNative(build_ext):
    """cmake instead of distutils' compiler; the Extension below is only a marker."""

    def run(self):
        builder = _load_builder()
        if self.editable_mode or self.inplace:
            destination = ROOT / "armquant" / "lib"
        else:
            destination = Path(self.build_lib) / "armquant" / "lib"
        try:
            self._built = builder.build(destination=destination, source_dir=ROOT / "export")
            print(f"armquant: built {self._built}")
        except RuntimeError as error:
            self._built = None
            print(
                "WARNING: armquant: the native ARM kernels were not built; armquant will use the "
                f"PyTorch reference of the ARM op and has no ONNX Runtime custom-op library.\n{error}",
                file=sys.stderr,
            )

    def get_outputs(self):
        built = getattr(self, "_built", None)
        return [str(built)] if built else []

    def get_output_mapping(self):
        return {}


setup(
    ext_modules=[Extension("armquant.lib.libarmquant_ort", sources=[])],
    cmdclass={"build_ext": BuildNative},
)
