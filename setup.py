"""Build entry point.

All metadata lives in pyproject.toml. This file adds the optional native extension of
csrc/ as ``fastpo.kernels._C``, built with torch.utils.cpp_extension (ninja, pybind11),
when the build environment can import torch and has a C++ compiler: that is the case
for ``pip install --no-build-isolation -e .`` in an environment that already has torch.
Under pip's default build isolation torch is not importable (pyproject.toml does not
list it as a build requirement, which would make pip download a second, CUDA-sized
torch into the isolated environment), and the package installs without the extension.

Either way, and also when compiling fails here, the install succeeds: fastpo then
JIT-builds the same sources on first use (kernels/_native.py), and if that fails too,
it warns once and uses the pure-PyTorch backend. ``FASTPO_NATIVE=0`` skips the build.
"""

import os
import shutil
import sys

from setuptools import setup

SOURCES = ["csrc/bindings.cpp", "csrc/cpu/kernels.cpp"]
CUDA_SOURCES = ["csrc/cuda/kernels.cu"]
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]


def native_extension() -> dict:
    if os.environ.get("FASTPO_NATIVE", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}  # isolated build without torch: the JIT path takes over at run time
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("fastpo: no C++ compiler; the native extension is left to the JIT build", file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the extension out instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler or ninja errors of any kind
                print(f"fastpo: building the native extension failed ({exc}); it will be JIT-built on first use",
                      file=sys.stderr)
                self.extensions = []

        def get_outputs(self):
            return [path for path in super().get_outputs() if os.path.exists(path)]

    if torch.version.cuda is not None and CUDA_HOME is not None:
        extension = CUDAExtension(
            "fastpo.kernels._C",
            SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS + ["-DFASTPO_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++17", "-DFASTPO_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension("fastpo.kernels._C", SOURCES, extra_compile_args=CXX_FLAGS,
                                 extra_link_args=["-fopenmp"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**native_extension())
