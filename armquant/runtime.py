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


LIBRARY_AUTO = "auto"  # our custom-op library when built, else ARM's embedded ONNX function
LIBRARY_NONE = "none"  # force the ONNX function


def custom_op_library(library: Optional[str] = LIBRARY_AUTO) -> Optional[str]:
    """Resolve `library` ("auto", "none", or a path) to the custom-op library to register, or None."""
    if library in (None, LIBRARY_NONE):
        return None
    if library == LIBRARY_AUTO:
        from armquant import _native

        path = _native.library_path()
        return str(path) if path else None
    if not Path(library).is_file():
        raise FileNotFoundError(
            f"no ARM custom-op library at {library}; build it (pip install -e .), pass its path, "
            f"or use library='{LIBRARY_NONE}' to run ARM through the ONNX function"
        )
    return str(library)


def session_options(library: Optional[str] = LIBRARY_AUTO, threads: Optional[int] = None) -> ort.SessionOptions:
    """Session options with the ARM library registered when there is one."""
    options = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be an integer >= 1 (or None: ONNX Runtime's choice)")
        options.intra_op_num_threads = threads
    path = custom_op_library(library)
    if path is not None:
        options.register_custom_ops_library(path)
        logger.info("registered ARM custom-op library %s", path)
    else:
        logger.info("no ARM custom-op library: ARM nodes run their embedded ONNX function")
    return options


def model_file(model_dir: str | Path) -> Path:
    """model_dir/model.onnx, or a FileNotFoundError that says what folder to pass."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MODEL_FILE} in {model_dir}; pass the directory written by `armquant export` "
            "(or an optimum text-generation-with-past export)"
        )
    return path


def session(
    model_dir: str | Path, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
    library: Optional[str] = LIBRARY_AUTO, seed: Optional[int] = None, arm: bool = True,
) -> ort.InferenceSession:
    """An ONNX Runtime session over `model_dir/model.onnx` (an armquant or optimum export).

    library: "auto", "none" or a path (see custom_op_library). seed: run every ARM node with this
    seed instead of the exported one. arm=False: ARM nodes become Identity (ARM on/off comparisons).
    """
    path = model_file(model_dir)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    options = session_options(library, threads)
    if seed is None and arm:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        if (node.domain, node.op_type) != ("armquant", "ARM"):
            continue
        if not arm:
            del node.input[1:], node.attribute[:]
            node.op_type, node.domain = "Identity", ""
        else:
            del node.attribute[[a.name for a in node.attribute].index("seed")]
            node.attribute.append(onnx.helper.make_attribute("seed", int(seed)))
    return ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=providers)
