"""Build libarmquant_ort.so from export/ with cmake. Imports nothing heavy (no torch):
setup.py loads this file on its own, inside pip's isolated build environment."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

LIBRARY_NAME = "libarmquant_ort.so"
EXPORT_DIR = Path(__file__).resolve().parent.parent / "export"  # present in a source checkout
PACKAGE_LIB_DIR = Path(__file__).resolve().parent / "lib"


def build(destination: Path = PACKAGE_LIB_DIR, source_dir: Path = EXPORT_DIR, build_dir: Optional[Path] = None,
          cuda: str = "AUTO", jobs: Optional[int] = None) -> Path:
    """Configure and build `export/` with cmake; copy the library into `destination`.

    cuda: "AUTO" builds the CUDA kernel when nvcc is found, "ON" requires it, "OFF" skips it.
    Raises RuntimeError, with cmake's output, when a tool is missing or the build fails.
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError(
            "cmake was not found on PATH; install cmake >= 3.18 (e.g. `apt-get install cmake` or "
            "`pip install cmake`) to build the native ARM kernels"
        )
    if not (source_dir / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{source_dir} holds no CMakeLists.txt; build from a source checkout of armquant")
    build_dir = build_dir or source_dir / "build"
    jobs = jobs or os.cpu_count() or 1
    for command in (
        [cmake, "-S", str(source_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", f"-DARMQ_CUDA={cuda}"],
        [cmake, "--build", str(build_dir), "-j", str(jobs)],
    ):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        if "No CUDA compiler or CUDA sources" in result.stderr:
            logger.warning("no CUDA compiler (nvcc) or CUDA sources: the library carries the CPU kernel only")
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / LIBRARY_NAME
    # Copy then rename: a process that has the old library mapped keeps a valid file.
    fd, tmp = tempfile.mkstemp(dir=destination, suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(build_dir / LIBRARY_NAME, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
