"""Build driver: setuptools packages the Python code, CMake builds the native module `sfgrpo._C`.

The native module is optional at import time (pure-Python paths work without it), but a
failing native build is reported loudly. Set SFGRPO_REQUIRE_NATIVE=1 to turn it into an error.

Environment knobs:
  SFGRPO_CUDA_ARCHS     CMake CUDA_ARCHITECTURES list (default "80-real;86-real;89-real;90",
                        i.e. SASS for sm_80..sm_90 plus sm_90 PTX that newer GPUs JIT).
  SFGRPO_DISABLE_CUDA=1 build only the CPU part even when nvcc is present.
  SFGRPO_REQUIRE_NATIVE=1  fail the install if the native module cannot be built.
  SFGRPO_BUILD_TYPE     CMake build type (default Release).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        for ext in self.extensions:
            # a module left by an earlier build must not ship in place of one that failed to build
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            try:
                self.build_cmake(ext)
            except (OSError, subprocess.CalledProcessError) as err:
                if os.environ.get("SFGRPO_REQUIRE_NATIVE") == "1":
                    raise
                warnings.warn(
                    f"sfgrpo: the native module {ext.name} was NOT built ({err}). "
                    "Pure-Python ops still work; native advantage ops will raise a clear error.",
                    stacklevel=1,
                )

    def build_cmake(self, ext: Extension):
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fresh build directory every time: a cached CMakeCache.txt remembers the previous
        # isolated build environment's ninja/cmake paths and breaks the next `pip install .`.
        build_dir = Path(self.build_temp).resolve() / "cmake-build"
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        config = os.environ.get("SFGRPO_BUILD_TYPE", "Release")
        args = [
            cmake,
            "-S", str(ROOT),
            "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DSFGRPO_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            "-DPYBIND11_FINDPYTHON=ON",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSFGRPO_CUDA_ARCHS={os.environ.get('SFGRPO_CUDA_ARCHS', '80-real;86-real;89-real;90')}",
            f"-DSFGRPO_DISABLE_CUDA={'ON' if os.environ.get('SFGRPO_DISABLE_CUDA') == '1' else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(args, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", str(build_dir), "--config", config, "-j", jobs], check=True)


setup(
    packages=[
        *find_packages(include=["sfgrpo", "sfgrpo.*"]),
        "sfgrpo.kernels",
        *[f"sfgrpo.kernels.{p}" for p in find_packages(where="kernels")],
    ],
    # Triton kernels live in kernels/ at the top of the repository but install as sfgrpo.kernels.
    package_dir={"sfgrpo": "sfgrpo", "sfgrpo.kernels": "kernels"},
    # the built-in digits backbone and classifier reward ship in the wheel, so `sfgrpo demo` is offline
    package_data={"sfgrpo": ["py.typed"], "sfgrpo.assets": ["*.safetensors", "*.json"]},
    ext_modules=[CMakeExtension("sfgrpo._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
