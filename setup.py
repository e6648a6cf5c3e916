"""Builds the native module ppfast._C with torch's cpp_extension (ninja).

One build serves CPU and CUDA: the C++ is written against c10's device-generic stream, event
and guard interfaces, which a CUDA torch implements in its own libraries at run time. So the
build compiles no CUDA source and needs no CUDA toolkit, only torch's headers and ninja.

Environment switches:
  PPFAST_DEBUG=1  build with -O0 -g
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def core_sources():
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [f"csrc/{x.strip()}" for x in lines if x.strip() and not x.startswith("#")]


def ext_modules():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        raise SystemExit(
            "ppfast builds its native module against an installed torch: "
            "`pip install torch` first, then `pip install --no-build-isolation .`"
        ) from e
    debug = os.environ.get("PPFAST_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No -std here: torch adds the standard its headers need (C++20 for torch 2.13) only when
    # none is given. The core's own C++17 is held by CMakeLists.txt.
    cxx += ["-Wall"]
    # the runtime (executor, transports) and the test backends need torch's headers; the
    # program engine does not
    torch_parts = [ROOT / "csrc" / d for d in ("runtime", "testing")]
    runtime = sorted(str(p.relative_to(ROOT)) for d in torch_parts for p in d.glob("*.cpp"))
    sources = core_sources() + runtime + ["csrc/bindings.cpp"]
    ext = CppExtension(
        "ppfast._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


modules, cmdclass = ext_modules()
setup(
    package_dir={"ppfast": "python/ppfast", "ppfast.kernels": "kernels"},
    # every package under python/ (the layers and their parts), and the Triton kernels
    packages=[*find_packages("python"), "ppfast.kernels"],
    ext_modules=modules,
    cmdclass=cmdclass,
)
