"""The import graph of the library has no cycles, and every module imports
on its own, in any order.

Granularity, precisely:
- module level: the modules of astraea_jax/, converters/ and
  pallas_kernels/ (a package's __init__.py is the module of the package),
  with an edge for every import of one of them anywhere in a file (module
  level or inside a function, `import a.b`, `from a import b`, relative
  imports); `from a import b` counts as an import of the module a.b where
  one exists, else of a. The implicit import of a parent package's
  __init__ is not an edge. No cycle may exist among these modules.
- package level: the same edges between units, a unit being a top-level
  module of astraea_jax (configs, checkpoint, ...), a subpackage of
  astraea_jax (models, vae, sampling, astraea, parallel, pipelines,
  commands, demo_model), astraea_jax/__init__ itself, converters and
  pallas_kernels. No cycle may exist among units either: the data flows
  configs -> models/vae -> sampling -> astraea -> parallel -> pipelines ->
  commands.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("astraea_jax", "converters", "pallas_kernels")


def module_files() -> dict[str, pathlib.Path]:
  """{dotted module name: its file} of the library's packages."""
  files = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = list(path.relative_to(REPO).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      files[".".join(parts)] = path
  return files


def _known_prefix(name: str, files) -> str | None:
  """The longest prefix of `name` that is a module of ours."""
  while name and name not in files:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str, path: pathlib.Path, files) -> set[str]:
  """Our modules that `path` imports anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(_known_prefix(a.name, files) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")
        if path.name != "__init__.py":
          base = base[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      for alias in node.names:
        full = f"{source}.{alias.name}"
        found.add(full if full in files else _known_prefix(source, files))
  found.discard(None)
  found.discard(module)
  return found


def module_graph() -> dict[str, set[str]]:
  files = module_files()
  return {m: imports_of(m, p, files) for m, p in files.items()}


def unit_of(module: str) -> str:
  parts = module.split(".")
  return ".".join(parts[:2]) if parts[0] == "astraea_jax" else parts[0]


def package_graph(graph) -> dict[str, set[str]]:
  units = {}
  for module, deps in graph.items():
    units.setdefault(unit_of(module), set()).update(
        unit_of(d) for d in deps if unit_of(d) != unit_of(module))
  return units


def cycles(graph) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
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
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_graph_sees_function_level_and_relative_imports():
  files = {"p": None, "p.a": None, "p.b": None, "p.c": None}
  source = ("from p import a\nimport p.b as bee\n"
            "def f():\n  from . import c\n")
  path = REPO / "tests" / "_graph_probe.py"
  try:
    path.write_text(source)
    assert imports_of("p.d", path, files) == {"p.a", "p.b", "p.c"}
  finally:
    path.unlink()
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
      ["a", "b", "c"]]


def test_no_module_cycles():
  assert cycles(module_graph()) == []


def test_no_package_cycles():
  graph = package_graph(module_graph())
  assert cycles(graph) == [], {u: sorted(d) for u, d in graph.items()}


def test_the_layers_point_down():
  """The named layers never import a layer above them."""
  order = ["astraea_jax.configs", "astraea_jax.models", "astraea_jax.vae",
           "astraea_jax.sampling", "astraea_jax.astraea",
           "astraea_jax.parallel", "astraea_jax.pipelines",
           "astraea_jax.commands"]
  graph = package_graph(module_graph())
  for i, unit in enumerate(order):
    assert not graph[unit] & set(order[i + 1:]), (unit, graph[unit])


def _import_all(modules) -> subprocess.CompletedProcess:
  code = "import importlib, sys\nfor m in sys.argv[1:]:\n" \
         "  importlib.import_module(m)\n"
  return subprocess.run([sys.executable, "-c", code, *modules], cwd=REPO,
                        capture_output=True, text=True, check=False)


@pytest.mark.parametrize("order", ["sorted", "reversed", "deepest_first"])
def test_every_module_imports_in_a_fresh_process(order):
  """All modules import one after another in a fresh interpreter, in three
  orders, so that each import chain starts from a different module."""
  modules = sorted(module_graph())
  if order == "reversed":
    modules = modules[::-1]
  elif order == "deepest_first":
    modules = sorted(modules, key=lambda m: (-m.count("."), m[::-1]))
  done = _import_all(modules)
  assert done.returncode == 0, done.stderr[-3000:]
