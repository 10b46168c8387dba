"""Where the CUDA toolkit is and how to build the native extension with it. Free of torch and of the memmgr package,
so that setup.py loads this file by path at install time and the runtime reports the same toolkit."""
from __future__ import annotations

import os
import shutil

# How to get the extension after an install without a CUDA toolkit: run from a memmgr checkout, with nvcc on PATH or
# CUDA_HOME set (setup.py builds it; MEMMGR_BUILD_EXT=1 makes a failed build an error instead of a silent skip).
BUILD_COMMAND = "MEMMGR_BUILD_EXT=1 python3 -m pip install --no-build-isolation -e ."


def find_cuda_toolkit() -> str | None:
    """The CUDA toolkit the extension is built with (CUDA_HOME, CUDA_PATH, the one holding ``nvcc`` on PATH,
    /usr/local/cuda: the first with ``include/cuda_runtime_api.h``), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None
