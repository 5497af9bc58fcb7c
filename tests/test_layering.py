"""The package's layering, checked from the source: every import (function-local ones included) goes to the
same layer or one below, and no two modules import each other in a cycle. A newcomer can read the layers
below as the architecture: each wing builds only on what is under it."""

from __future__ import annotations

import ast
from pathlib import Path

import spinquant

PACKAGE = Path(spinquant.__file__).parent

# Bottom to top. A module's layer is that of the longest prefix listed here.
LAYERS = [
    ["errors", "version", "config", "io", "native"],  # plain facts, safe file writing, the C++ kernels
    ["models", "distributed"],  # architecture adapters; process groups
    ["streaming", "rotation", "evaluation"],  # offload; rotations; text, scoring, charts
    ["quant"],  # quantizers, GPTQ, fake-quant modules (use rotation for R4)
    ["training"],  # learning R1/R2 with the quantizers in the loop
    ["runtime"],  # packed checkpoints and the kernels that run them
    ["export"],  # other formats, from a checkpoint or a model in memory
    ["pipeline", "loading"],  # rotate + quantize a model; find and load one
    ["api"],
    ["cli", "__main__", ""],  # "" is the package itself (spinquant/__init__.py)
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    best, where = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) >= best:
                best, where = len(prefix), i
    assert where is not None, f"{name} is in no layer: add it to LAYERS"
    return where


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import native` names a module
                    sub = f"{target}.{alias.name}" if target else alias.name
                    found.add(sub if sub in modules else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spinquant"):
                found.add(node.module.removeprefix("spinquant").lstrip("."))
            elif isinstance(node, ast.Import):
                found.update(a.name.removeprefix("spinquant").lstrip(".") for a in node.names
                             if a.name.startswith("spinquant"))
        graph[name] = {t for t in found if t != name and t in modules}
    return graph


def test_every_import_goes_down_or_sideways():
    wrong = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
             for m, targets in imports().items() for t in sorted(targets)
             if layer(t) > layer(m) and not m.startswith(t + ".")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = imports()
    # A package's __init__ re-exporting its own modules is not a cycle with them.
    edges = {m: {t for t in ts if not (m.startswith(t + ".") or t.startswith(m + ".") or "" in (m, t))}
             for m, ts in graph.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in edges[m]:
            if seen.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_top_level_holds_few_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= 10, top
