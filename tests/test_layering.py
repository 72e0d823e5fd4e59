"""The import graph follows the layers of the package (README "Architecture")."""

import ast
import pathlib

import peft_jax

PACKAGE = pathlib.Path(peft_jax.__file__).parent

# layer -> the layers it may import (besides itself). Every module file of the
# package belongs to the layer named by its first component under peft_jax/.
# ``targeting`` (paths) and ``validation`` (checks of user-given values) are
# the bottom: every layer may import them.
_BOTTOM = {"targeting", "validation", "_lapack"}
ALLOWED = {
    "targeting": set(),
    "validation": set(),
    "_lapack": set(),
    "data": set(),
    "quant": _BOTTOM,
    "lora": _BOTTOM | {"quant"},
    "qlora": _BOTTOM | {"quant", "lora"},
    "optim": _BOTTOM | {"quant", "lora"},
    "models": set(),
    "sharding": _BOTTOM | {"quant", "lora"},
    "checkpoint": _BOTTOM | {"quant", "lora"},
    "merging": _BOTTOM | {"quant", "lora"},
    "multitask": _BOTTOM | {"quant", "lora", "checkpoint"},
    "training": _BOTTOM | {"quant", "lora", "models", "sharding"},
    "training_nnx": _BOTTOM | {"quant", "lora", "models", "sharding", "training", "nnx"},
    "nnx": _BOTTOM | {"quant", "lora", "qlora", "checkpoint", "multitask"},
    "cli": None,  # the top: may import anything
    "__init__": None,
}

def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  """``(imported module, lineno, at top level)`` for every peft_jax import of a file."""
  tree = ast.parse(path.read_text(), str(path))
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from pkg import name`: the submodule pkg.name if there is one, else pkg.
      names = [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      if name == "peft_jax" or name.startswith("peft_jax."):
        yield name, node.lineno, id(node) in top


def _known(name: str, modules: set[str]) -> str | None:
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _graph():
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph, lazy = {}, []
  for module, path in files.items():
    edges = set()
    for name, line, at_top in _imports(path):
      target = _known(name, set(files))
      if target is None or target == module:
        continue
      edges.add(target)
      # A function-level import across layers is how a cycle hides (cli may: it is the top).
      if not at_top and _layer(module) not in ("cli", _layer(target)):
        lazy.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} inside a function")
    graph[module] = edges
  return graph, lazy


def test_layers_import_only_what_they_may():
  graph, _ = _graph()
  problems = []
  for module, edges in sorted(graph.items()):
    layer = _layer(module)
    for target in sorted(edges):
      other = _layer(target)
      if other == layer or other == "__init__" and target == "peft_jax" and layer == "__init__":
        continue
      if other == "cli":
        problems.append(f"{module} imports {target}: nothing imports cli")
      elif ALLOWED[layer] is not None and other not in ALLOWED[layer]:
        problems.append(f"{module} ({layer}) imports {target} ({other})")
  assert not problems, "\n".join(problems)


def test_no_lazy_imports_hide_a_cycle():
  _, lazy = _graph()
  assert not lazy, "\n".join(lazy)


def test_import_graph_is_acyclic():
  graph, _ = _graph()
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
      if nxt not in state:
        visit(nxt, stack + [node])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [])


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
  # The rules can fail: a quant module importing lora is reported.
  bad = tmp_path / "peft_jax"
  (bad / "quant").mkdir(parents=True)
  (bad / "lora").mkdir()
  (bad / "__init__.py").write_text("")
  (bad / "quant" / "__init__.py").write_text("")
  (bad / "lora" / "__init__.py").write_text("")
  (bad / "quant" / "x.py").write_text("def f():\n  from peft_jax.lora import y\n")
  (bad / "lora" / "y.py").write_text("from peft_jax.quant import x\n")
  monkeypatch.setitem(globals(), "PACKAGE", bad)
  graph, lazy = _graph()
  assert graph["peft_jax.quant.x"] == {"peft_jax.lora.y"}
  assert lazy and "inside a function" in lazy[0]
  try:
    test_import_graph_is_acyclic()
  except AssertionError as e:
    assert "cycle" in str(e)
  else:
    raise AssertionError("the cycle was not found")
