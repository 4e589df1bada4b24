"""Build fastrnn's Cython kernels.

OpenMP is optional: when the compiler cannot build an OpenMP program the
kernels are built single-threaded with a warning, unless FASTRNN_REQUIRE_OPENMP=1,
which turns that into an error. No -march flags: the kernels are compiled for
AVX-512, AVX2+FMA and baseline x86-64 from one source (GCC `target` attributes,
src/isa.h) and dispatch at run time, so a wheel built here runs on any x86-64
machine. Builds with GCC 11 or newer (run-time dispatch); clang should build the
baseline kernels only (its syntax check passes; a clang build was not run). Release builds carry no debug information (-g0: the extensions
shrink about fivefold).
FASTRNN_DEBUG=1 builds with bounds checks and without optimisation;
FASTRNN_DISABLE_OPENMP=1 builds as if OpenMP were missing.
FASTRNN_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
(-O1, frame pointers kept, UB reports fatal); run such a build with libasan
preloaded, see .ci/sanitize.
"""
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = ["_recurrent", "_dense", "_adam", "_openmp",
           "_quantized",  # _quantized: int8/bf16/packed inference (src/quant_*.h)
           "_buffers"]    # _buffers: arrays on kept memory for training caches (src/scratch.h)
OPENMP_TEST = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def compiler_supports_openmp(compiler):
    """Try to compile and link a tiny OpenMP program with the build's compiler."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_test.c")
        with open(src, "w") as f:
            f.write(OPENMP_TEST)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, os.path.join(tmp, "omp_test"),
                                     extra_postargs=["-fopenmp"])
        except Exception:  # any compiler or linker failure means "no OpenMP"
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        debug = os.environ.get("FASTRNN_DEBUG") == "1"
        sanitize = os.environ.get("FASTRNN_SANITIZE") == "1"
        # FASTRNN_DISABLE_OPENMP=1 builds as if the compiler had no OpenMP (to test that path)
        has_omp = (os.environ.get("FASTRNN_DISABLE_OPENMP") != "1"
                   and compiler_supports_openmp(self.compiler))
        if not has_omp:
            if os.environ.get("FASTRNN_REQUIRE_OPENMP") == "1":
                sys.exit("fastrnn: FASTRNN_REQUIRE_OPENMP=1 but the compiler cannot build OpenMP code")
            warnings.warn("fastrnn: OpenMP not available; building single-threaded kernels")
        for ext in self.extensions:
            args = ["-O0", "-g"] if debug else ["-O3", "-g0"]
            # trapping-math/errno off lets the gate loops vectorise (NaN still propagates)
            args += ["-fno-trapping-math", "-fno-math-errno", "-Wno-unused-function"]
            link = []
            if has_omp:
                args.append("-fopenmp")
                link.append("-fopenmp")
                if ext.name == "fastrnn._openmp" and sys.platform.startswith("linux"):
                    link.append("-ldl")    # dladdr/dlsym (in libc itself from glibc 2.34)
            else:
                args.append("-fopenmp-simd")
            if sanitize:  # replaces the optimisation level chosen above
                san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
                args = [a for a in args if not a.startswith("-O")]
                args += ["-O1", "-g", "-fno-omit-frame-pointer"] + san
                link += san
            ext.extra_compile_args = args
            ext.extra_link_args = link
        super().build_extensions()


debug = os.environ.get("FASTRNN_DEBUG") == "1"
HEADERS = sorted(str(p) for p in Path("src").glob("*.h")) + sorted(
    str(p) for p in Path("src").glob("*.inc")) + sorted(
    str(p) for p in Path("src").glob("*.pxd")) + sorted(
    str(p) for p in Path("src").glob("*.pxi"))   # a change to any of these rebuilds the kernels
extensions = [
    Extension(f"fastrnn.{name}", [f"src/{name}.pyx"], include_dirs=["src", np.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
              depends=HEADERS)
    for name in KERNELS
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "boundscheck": debug, "wraparound": False,
                             "cdivision": True, "initializedcheck": debug},
        include_path=["src"],
    ),
    cmdclass={"build_ext": BuildExt},
)
