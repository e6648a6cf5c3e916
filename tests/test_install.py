"""The installed package: its native module, the message when that is missing, its kernels."""

import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import ppfast

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # A neutral working directory, so only the installed package can be imported.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_native_module_says_how_to_build(tmp_path):
    # A finder ahead of all others makes ppfast._C unimportable, as in a source tree where the
    # extension was never built, without touching the real build.
    code = """
        import importlib.abc, sys

        class NoNative(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "ppfast._C":
                    raise ModuleNotFoundError("No module named 'ppfast._C'", name=name)
                return None

        sys.meta_path.insert(0, NoNative())
        try:
            import ppfast
        except ImportError as e:
            print(e)
            sys.exit(3)
        sys.exit(0)
    """
    res = run_python(code, tmp_path)
    assert res.returncode == 3, f"import ppfast did not fail: {res.stdout}{res.stderr}"
    message = res.stdout
    assert "ppfast._C" in message
    assert "pip install --no-build-isolation -e ." in message


def test_installed_package_imports_from_anywhere(tmp_path):
    res = run_python(
        "import ppfast, ppfast._C as C; print(ppfast.__version__, hasattr(C, 'run_program'))",
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [ppfast.__version__, "True"]


def test_version_matches_distribution_metadata():
    assert metadata.version("ppfast") == ppfast.__version__


def test_kernels_are_installed_as_ppfast_kernels(tmp_path):
    res = run_python("import ppfast.kernels as k; print(k.__name__); print(k.__file__)", tmp_path)
    assert res.returncode == 0, res.stderr
    name, file = res.stdout.split("\n")[:2]
    assert name == "ppfast.kernels"
    assert Path(file).parent.name == "kernels", "ppfast.kernels is the kernels/ folder"
    assert Path(file).parent != Path(ppfast.__file__).parent


def _setup_helpers() -> dict:
    """setup.py's functions, without running setup()."""
    path = Path(__file__).resolve().parents[1] / "setup.py"
    code = path.read_text().split("modules, cmdclass = ext_modules()")[0]
    ns = {"__file__": str(path), "__name__": "setup_helpers"}
    exec(compile(code, str(path), "exec"), ns)
    return ns


# Headers that only a CUDA toolkit (or torch's CUDA headers, which include the toolkit's)
# provides. One of them in csrc/ would make the build need nvcc's headers again.
CUDA_ONLY = ("c10/cuda/", "ATen/cuda/", "cuda_runtime", "cuda.h", "nccl.h", "cublas")


def test_the_native_build_needs_no_cuda_toolkit():
    (ext,), _ = _setup_helpers()["ext_modules"]()
    assert all(src.endswith(".cpp") for src in ext.sources), ext.sources
    for path in sorted((ROOT / "csrc").rglob("*.[ch]*")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("#include"):
                bad = [h for h in CUDA_ONLY if h in line]
                assert not bad, f"{path.relative_to(ROOT)}:{n} includes a CUDA-only header: {line}"
