"""Builds the native module ppfast._C with torch's cpp_extension (ninja).

Environment switches:
  PPFAST_CUDA=0   build without the CUDA parts even where nvcc and a CUDA torch are present
  PPFAST_DEBUG=1  build with -O0 -g
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def core_sources():
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [f"csrc/{x.strip()}" for x in lines if x.strip() and not x.startswith("#")]


# What torch's own CUDA headers include (ATen/cuda/CUDAContext.h and what it pulls in): a
# toolkit without them fails the build deep inside torch's headers.
CUDA_HEADERS = ("cuda.h", "cuda_runtime_api.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h")


def cuda_include_dirs(cuda_home: str | None) -> tuple[list[str], list[str]]:
    """Folders that together hold CUDA_HEADERS (the toolkit's, then those of the nvidia-*
    wheels beside torch), and the headers found in none of them."""
    import site

    roots = []
    if cuda_home:
        home = Path(cuda_home)
        roots += [home / "include", *sorted(home.glob("targets/*/include"))]
    for sp in [*site.getsitepackages(), site.getusersitepackages()]:
        roots += sorted(Path(sp).glob("nvidia/**/include"))
    dirs, missing = [], []
    for header in CUDA_HEADERS:
        where = next((r for r in roots if (r / header).is_file()), None)
        if where is None:
            missing.append(header)
        elif str(where) not in dirs:
            dirs.append(str(where))
    return dirs, missing


def want_cuda() -> tuple[bool, list[str]]:
    """Whether to build the CUDA parts, and the include folders they need. Where the build
    cannot succeed, one line says why and how to get them, and the build goes on CPU-only."""
    if os.environ.get("PPFAST_CUDA", "1") == "0":
        return False, []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False, []
    if torch.version.cuda is None:
        return False, []
    if CUDA_HOME is None:
        print(
            f"ppfast: torch is built with CUDA {torch.version.cuda} but no CUDA toolkit (nvcc) "
            "was found: building without the CUDA parts; set CUDA_HOME to a toolkit to get them"
        )
        return False, []
    dirs, missing = cuda_include_dirs(CUDA_HOME)
    if missing:
        print(
            f"ppfast: the CUDA toolkit at {CUDA_HOME} lacks {', '.join(missing)}, which torch's "
            "CUDA headers include: building without the CUDA parts; install the toolkit's "
            "headers (or the matching nvidia-* wheels) or set CUDA_HOME to a full toolkit, or "
            "set PPFAST_CUDA=0 to silence this"
        )
        return False, []
    return True, dirs


def ext_modules():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
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
    cuda, cuda_dirs = want_cuda()
    kwargs = {"include_dirs": [str(ROOT / "csrc"), *cuda_dirs]}
    if cuda:
        cuda_dir = ROOT / "csrc" / "cuda"
        sources += sorted(f"csrc/cuda/{p.name}" for p in cuda_dir.glob("*.c*"))
        ext = CUDAExtension(
            "ppfast._C",
            sources,
            define_macros=[("PPFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            **kwargs,
        )
    else:
        ext = CppExtension("ppfast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


modules, cmdclass = ext_modules()
setup(
    package_dir={"ppfast": "python/ppfast", "ppfast.kernels": "kernels"},
    # every package under python/ (the layers and their parts), and the Triton kernels
    packages=[*find_packages("python"), "ppfast.kernels"],
    ext_modules=modules,
    cmdclass=cmdclass,
)
