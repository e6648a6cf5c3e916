"""The package's layers: every import points down (or stays in its layer), and none is circular.

Layers, lowest first (docs/architecture.md):

    native      ppfast._native, ppfast.kernels          the compiled module and the Triton kernels
    program     ppfast.program                          schedules as data; no device, no c10d
    runtime     ppfast.runtime                          executor, transports, metrics, errors
    training    ppfast.training                         stage, schedule classes, Pipe, microbatching
    model tools ppfast.model, .nn, .recompute, .parallel, .checkpoint, .hf
    api         ppfast (its __init__)                   the public names
    tools       ppfast.tools, .testing, .__main__       CLI, demo, benchmarks, test backends

Every import counts: at module level, inside functions and under TYPE_CHECKING alike, since
each is a dependency a reader must follow. Importing ``a.b`` runs ``a/__init__`` first, but
only what a module names counts as its dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"ppfast": ROOT / "python" / "ppfast", "ppfast.kernels": ROOT / "kernels"}

LAYERS = [
    ("native", ("ppfast._native", "ppfast._C", "ppfast.kernels")),
    ("program", ("ppfast.program",)),
    ("runtime", ("ppfast.runtime",)),
    ("training", ("ppfast.training",)),
    (
        "model tools",
        (
            "ppfast.model",
            "ppfast.nn",
            "ppfast.recompute",
            "ppfast.parallel",
            "ppfast.checkpoint",
            "ppfast.hf",
        ),
    ),
    ("api", ("ppfast",)),
    ("tools", ("ppfast.tools", "ppfast.testing", "ppfast.__main__")),
]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their __init__)."""
    out = {}
    for base, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([base, *parts])] = path
    return out


MODULES = modules()


def layer_of(name: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} belongs to no layer; add it to LAYERS and the docs"
    return best[0]


def imports_of(name: str) -> list[tuple[str, int]]:
    """(imported package module, line) for every import in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub where there is one
            targets = [
                f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names
            ]
        else:
            continue
        for t in targets:
            if t == "ppfast" or t.startswith("ppfast."):
                exists = t in MODULES or t == "ppfast._C"
                assert exists, f"{name}:{node.lineno} imports {t}, which does not exist"
                if t != name:
                    out.append((t, node.lineno))
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_belongs_to_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_point_down():
    wrong = [
        f"{name}:{line} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for name, deps in GRAPH.items()
        for dep, line in deps
        if layer_of(dep) > layer_of(name)
    ]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    # Tarjan's strongly connected components over module -> imported module
    index, low, stack, on, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in GRAPH[v]:
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other: " + "; ".join(map(", ".join, cycles))


def _touches(name: str, banned: tuple[str, ...]) -> list[str]:
    path = MODULES[name]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Attribute):
            names = [ast.unparse(node)]
        found += [f"{name}:{node.lineno} {n}" for n in names if n.startswith(banned)]
    return found


def test_program_layer_touches_no_device_and_no_c10d():
    banned = ("torch.distributed", "torch.cuda", "torch.device")
    found = [hit for name in MODULES if layer_of(name) == 1 for hit in _touches(name, banned)]
    assert not found, "the program layer must run without devices or c10d:\n" + "\n".join(found)


def test_runtime_knows_no_schedule_names():
    found = [
        f"{name}:{line} imports {dep}"
        for name, deps in GRAPH.items()
        if layer_of(name) == 2
        for dep, line in deps
        if dep.startswith("ppfast.program.schedules")
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_under_400_lines_and_says_what_it_is(name):
    text = MODULES[name].read_text()
    lines = text.count("\n")
    assert lines < 400, f"{name} has {lines} lines; split it by idea"
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{name} opens with no docstring"
