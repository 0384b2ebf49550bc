"""ONNX Runtime sessions for exported armquant models, with the ARM custom-op library registered.

An export holds `model.onnx` whose `armquant::ARM` nodes run in our custom-op library when it is
built (`armquant._native.ort_library_path()`); without it ONNX Runtime uses the ONNX function
embedded in the graph, so the plain session still runs the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import onnxruntime as ort

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def custom_op_library() -> Optional[str]:
    """Path of the ARM custom-op library for ONNX Runtime, or None when it is not built."""
    from armquant import _native

    path = _native.library_path()
    return str(path) if path else None


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    """Session options with the ARM library registered when it is available."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    library = custom_op_library()
    if library is not None:
        options.register_custom_ops_library(library)
        logger.info("registered ARM custom-op library %s", library)
    else:
        logger.info("ARM custom-op library not built; ARM nodes use their embedded ONNX function")
    return options


def session(
    model_dir: str | Path, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None
) -> ort.InferenceSession:
    """An ONNX Runtime session over `model_dir/model.onnx` (an armquant or optimum export)."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MODEL_FILE} in {model_dir}; pass the directory written by `armquant export` "
            "(or an optimum text-generation-with-past export)"
        )
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
