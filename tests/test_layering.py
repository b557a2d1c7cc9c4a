"""The house rules of the source tree: no import cycle between modules (function-local imports
included), kernel packages that depend on jax alone, modules under ~500 lines."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Import name → folder (serve/, eval/, checkpoints/, cpu_kernels/ install under brownout_jax).
PACKAGES = {
    "brownout_jax": ROOT / "brownout_jax",
    "brownout_jax.serve": ROOT / "serve",
    "brownout_jax.eval": ROOT / "eval",
    "brownout_jax.checkpoints": ROOT / "checkpoints",
    "brownout_jax.cpu_kernels": ROOT / "cpu_kernels",
    "pallas_kernels": ROOT / "pallas_kernels",
}
GENERATED = {"brownout_jax.serve.brownout_pb2", "brownout_jax.serve.brownout_pb2_grpc"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the tree ``path`` imports, anywhere in it (functions included)."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {m for m in map(owner, names) if m is not None}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_import_cycle():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("kernels", ["pallas_kernels", "brownout_jax.cpu_kernels"])
def test_kernel_packages_import_no_model_code(kernels):
    modules = _modules()
    for name, path in modules.items():
        if name.startswith(kernels):
            model_code = {
                m
                for m in _imports(path, modules)
                if not m.startswith(("pallas_kernels", "brownout_jax.cpu_kernels"))
            }
            assert not model_code, f"{name} imports {sorted(model_code)}"
    code = (
        f"import json, sys, {kernels}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('brownout_jax.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert all(m.startswith("brownout_jax.cpu_kernels") for m in loaded), loaded


def test_modules_stay_under_about_500_lines():
    long = {
        name: n
        for name, path in _modules().items()
        if name not in GENERATED and (n := len(path.read_text().splitlines())) > 500
    }
    assert long == {}
