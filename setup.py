"""Build script for memmgr.

The native extension ``memmgr._pinned`` (csrc/: pinned host buffers, copy kernels, same-address device memory
through the driver entry points of the static cudart) is built whenever a CUDA toolkit is found (``nvcc`` on PATH or
CUDA_HOME), including with a CPU-only torch: it links cudart statically and needs no torch CUDA headers, so CI can
build and load it on machines without a GPU. Its copy kernels (csrc/*.cu, no torch headers) are compiled by nvcc
alone into objects linked into the extension, for the architectures in MEMMGR_CUDA_ARCHS (default "80;90": A100,
H100/H200, plus compute_90 PTX that newer GPUs compile at load). Set MEMMGR_BUILD_EXT=0 to skip it,
MEMMGR_BUILD_EXT=1 to fail if it cannot be built. Without the extension the pure-Python path runs (exact-size buffers pinned through
torch.cuda.cudart().cudaHostRegister) and ``memmgr.backend_info()`` and ``memmgr doctor`` say so, with the command
that builds it later, from a checkout, once a CUDA toolkit is there (torch must be importable, hence no build
isolation):

    MEMMGR_BUILD_EXT=1 python3 -m pip install --no-build-isolation -e .

Metadata, dependencies and the supported megatron-core range (the ``megatron`` extra: >=0.12,<0.20) are declared in
pyproject.toml; this file only adds the extension.
"""
import importlib.util
import os
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_SOURCES = ["csrc/copy_kernels.cu"]


def _toolkit_module():
    """memmgr/_toolkit.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("memmgr_toolkit", os.path.join(HERE, "memmgr", "_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TOOLKIT = _toolkit_module()
BUILD_LATER = _TOOLKIT.BUILD_COMMAND
find_cuda_home = _TOOLKIT.find_cuda_toolkit


def extension_modules():
    wanted = os.environ.get("MEMMGR_BUILD_EXT", "auto")
    if wanted == "0":
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if wanted == "1":
            raise RuntimeError("MEMMGR_BUILD_EXT=1 but no CUDA toolkit (nvcc, CUDA_HOME) was found")
        print("memmgr: no CUDA toolkit found; installing the pure-Python path only (no copy kernel). To build the "
              f"extension later, with nvcc on PATH or CUDA_HOME set, run from this checkout: {BUILD_LATER}")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if wanted == "1":
            raise
        print("memmgr: torch is not importable at build time (use pip --no-build-isolation); pure-Python path only. "
              f"To build the extension: {BUILD_LATER}")
        return [], {}
    class BuildWithKernels(BuildExtension):
        """Compiles the .cu sources with nvcc first and links their objects into the extension."""

        def build_extensions(self):
            nvcc = os.path.join(cuda_home, "bin", "nvcc")
            archs = [a.strip() for a in os.environ.get("MEMMGR_CUDA_ARCHS", "80;90").split(";") if a.strip()]
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            os.makedirs(self.build_temp, exist_ok=True)
            for ext in self.extensions:
                for source in CUDA_SOURCES:
                    obj = os.path.join(self.build_temp, os.path.basename(source) + ".o")
                    cmd = [nvcc, "-c", os.path.join(HERE, source), "-o", obj, "-O3", "-std=c++17", "-Xcompiler",
                           "-fPIC", "-I" + os.path.join(HERE, "csrc"), *gencode]
                    print(" ".join(cmd))
                    subprocess.check_call(cmd)
                    ext.extra_objects.append(obj)
                    ext.depends.append(source)
            super().build_extensions()

    lib_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
    ext = CppExtension(
        name="memmgr._pinned",
        sources=["csrc/pinned_host.cpp", "csrc/vmm.cpp"],
        include_dirs=[os.path.join(cuda_home, "include")],
        library_dirs=lib_dirs,
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O3"],
    )
    return [ext], {"build_ext": BuildWithKernels.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
