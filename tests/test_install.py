"""The installed package: its native module, the message when that is missing, its kernels."""

import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

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


def test_cuda_helpers_report_a_build_without_cuda():
    C = ppfast._C
    if not hasattr(C, "cuda_built"):
        pytest.skip("ppfast._C does not register the CUDA helpers")
    if C.cuda_built():
        pytest.skip("built with CUDA; tests/ for CUDA cover the helpers")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        C.comm_streams(0)


def _setup_helpers() -> dict:
    """setup.py's functions, without running setup()."""
    path = Path(__file__).resolve().parents[1] / "setup.py"
    code = path.read_text().split("modules, cmdclass = ext_modules()")[0]
    ns = {"__file__": str(path), "__name__": "setup_helpers"}
    exec(compile(code, str(path), "exec"), ns)
    return ns


def test_the_cuda_build_looks_for_every_header_torch_needs(tmp_path, monkeypatch):
    import site

    # only the toolkit below: not the nvidia-* wheels a CUDA torch may have beside it
    monkeypatch.setattr(site, "getsitepackages", lambda: [])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path / "none"))
    find = _setup_helpers()["cuda_include_dirs"]
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("")
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    dirs, missing = find(str(tmp_path))
    assert str(tmp_path / "include") in dirs
    # a toolkit with nvcc and the runtime but not the libraries' headers torch includes
    assert {"cublas_v2.h", "cusparse.h", "cusolverDn.h"} <= set(missing)
    for h in ("cublas_v2.h", "cusparse.h", "cusolverDn.h"):
        (tmp_path / "include" / h).write_text("")
    assert find(str(tmp_path))[1] == []
