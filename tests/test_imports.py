"""The package's imports point one way (docs/architecture.md): read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
import os

from helpers import REPO

PACKAGE = "flowlm_jax"
# The top floor: entry points that nothing in the package may import.
TOP = {"flowlm_jax.loop", "flowlm_jax.sample", "flowlm_jax.evaluate", "flowlm_jax.export", "flowlm_jax.plot",
       "flowlm_jax.bench"}
# Above it: the comparison report runs the other tools' functions (evaluate, plot); nothing imports it.
REPORT = {"flowlm_jax.compare"}


def modules() -> dict[str, str]:
  """{dotted module name: path} of every .py file in the package."""
  found = {}
  for directory, _, files in os.walk(os.path.join(REPO, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def import_graph() -> dict[str, set[str]]:
  """{module: the package modules it imports}, function-level (lazy) imports included."""
  mods = modules()
  graph = {}
  for name, path in mods.items():
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    deps = set()
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name in mods}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([node.module] if node.module else []))
        for a in node.names:  # `from pkg import module` imports the module; `from module import name` the module
          deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    graph[name] = {d for d in deps if d in mods and d != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (cycle := visit(dep)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
  graph = import_graph()
  assert "flowlm_jax.models.layers" in graph and graph["flowlm_jax.loading"]  # the walk found the package
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_down():
  graph = import_graph()
  below_registry = [m for m in graph if m.startswith(("flowlm_jax.models.", "flowlm_jax.formats."))
                    and m != "flowlm_jax.models.registry"]
  for name in below_registry:  # families and formats never dispatch on the family themselves
    assert "flowlm_jax.models.registry" not in graph[name], name
  family_or_top = {"flowlm_jax.models.llama", "flowlm_jax.models.modernbert", "flowlm_jax.models.registry"}
  assert not graph["flowlm_jax.models.layers"] & family_or_top
  for name in (m for m in graph if m.startswith("flowlm_jax.formats.")):
    assert not graph[name] & ({"flowlm_jax.loading", "flowlm_jax.checkpoint", "flowlm_jax.train"} | TOP), name
  assert "flowlm_jax.loop" not in graph["flowlm_jax.checkpoint"] | graph["flowlm_jax.train"]
  for name, deps in graph.items():
    assert not deps & REPORT, f"{name} imports {sorted(deps & REPORT)}"
    if name not in REPORT:
      assert not deps & TOP, f"{name} imports the top floor: {sorted(deps & TOP)}"
