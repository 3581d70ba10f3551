"""No import cycles between caig_jax modules, and library code never reads configs/.

Counts every import statement anywhere in a module (function-local and `TYPE_CHECKING` ones included),
`importlib.import_module("literal")`, and the package `__init__` modules that importing `a.b.c` runs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "caig_jax")


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py under caig_jax/ (packages as `a.b` for `a/b/__init__.py`)."""
    out = {}
    base = os.path.dirname(ROOT)
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), base)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, name)
    return out


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every caig_jax module `tree` imports, with the packages whose __init__ those imports run."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then a.b.c
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != module and prefix != "caig_jax":
                out.add(prefix)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        graph[name] = _imported(tree, name, path.endswith("__init__.py"), known)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_finder_sees_a_function_local_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from caig_jax.x import y\n    import importlib\n    importlib.import_module('caig_jax.z')\n")
    assert _imported(tree, "caig_jax.w", False, {"caig_jax.x", "caig_jax.x.y", "caig_jax.z"}) == {
        "caig_jax.x", "caig_jax.x.y", "caig_jax.z"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between caig_jax modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_library_never_reads_configs_folder():
    offenders = []
    for name, path in _modules().items():
        with open(path) as f:
            text = f.read()
        if "configs/" in text.replace("`configs/", "").replace("(configs/", "") and "load_config(f\"configs/" in text:
            offenders.append(name)
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("configs/"):
                offenders.append(f"{name}: {node.value!r}")
            if isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and str(v.value).startswith("configs/") for v in node.values[:1]
            ):
                offenders.append(f"{name}: f-string starting with configs/")
    assert not offenders, f"library modules that read configs/: {offenders}"


JOBS = ("smoke", "reward", "baselines", "market", "render", "eval_sweep", "sft", "preference")


@pytest.mark.parametrize("job", JOBS)
def test_every_job_imports_alone(job):
    out = subprocess.run([sys.executable, "-c", f"import caig_jax.jobs.{job}"], capture_output=True, text=True,
                         cwd=os.path.dirname(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_main_jobs_point_only_into_jobs_package():
    from caig_jax import main

    assert all(module == f"caig_jax.jobs.{name}" for name, module in main.JOBS.items()), main.JOBS


REFERENCE_ONLY = ("torch", "diffusers")  # test extras (requirements-test.txt): parity references, never runtime


def test_no_module_imports_torch_or_diffusers():
    """Every caig_jax module (function-local imports included) runs on requirements.txt alone: no statement
    imports a reference-only package."""
    offenders = []
    for name, path in _modules().items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in REFERENCE_ONLY]
    assert not offenders, offenders


def test_every_module_imports_with_torch_and_diffusers_unimportable():
    """Imports every caig_jax module in a fresh interpreter where torch and diffusers cannot be found (as in a
    requirements.txt-only environment: `import torch` fails and `importlib.util.find_spec` returns None); CI also
    runs every README job in such an environment (.ci/run)."""
    modules = sorted(m for m in _modules() if m != "caig_jax")
    code = f"""
import importlib, sys

class Hidden:  # wraps each import finder: the reference-only packages are not found, as if not installed
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {REFERENCE_ONLY!r}:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
try:
    import torch
    raise SystemExit("torch is still importable")
except ModuleNotFoundError:
    pass
for name in {modules!r}:
    importlib.import_module(name)
loaded = [n for n in sys.modules if n.split(".")[0] in {REFERENCE_ONLY!r}]
assert not loaded, loaded
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(ROOT),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
