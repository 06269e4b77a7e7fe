"""The package's layer order (written once, in lmos_jax/__init__.py) holds for every import.

Function-local imports count too: a local import that points up hides a cycle instead of
removing it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lmos_jax

PACKAGE = Path(lmos_jax.__file__).parent


def layer_order() -> list[str]:
  """The layer names from the package docstring's 'Bottom to top:' list (up to the blank
  line that ends it)."""
  text = lmos_jax.__doc__.split("Bottom to top:", 1)[1].lstrip("\n").split("\n\n", 1)[0]
  return [m.group(1) for m in re.finditer(r"^  (\w+)\s", text, re.M)]


def layer_of(module: str) -> str | None:
  """'lmos_jax.train.step' -> 'train'; the package root itself has no layer."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "lmos_jax" else None


def lmos_imports(path: Path) -> list[tuple[int, str]]:
  """(line, module) of every import of an lmos_jax module in a file, wherever it sits."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      out += [(node.lineno, n) for n in names[:1] if n.startswith("lmos_jax")]
    elif isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmos_jax")]
  return out


def test_every_module_belongs_to_a_layer():
  order = layer_order()
  assert order[0] == "errors" and order[-1] == "cli", order
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE)
    if rel.name == "__init__.py" and len(rel.parts) == 1:
      continue
    name = rel.parts[0].removesuffix(".py")
    assert name in order, f"{rel}: add its package to the layer list in lmos_jax/__init__.py"


def test_no_import_points_up():
  order = layer_order()
  rank = {name: i for i, name in enumerate(order)}
  upward = []
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1 and rel.name == "__init__.py":
      continue
    own = rel.parts[0].removesuffix(".py")
    for line, module in lmos_imports(path):
      target = layer_of(module)
      if target is not None and rank[target] > rank[own]:
        upward.append(f"lmos_jax/{rel}:{line} ({own}) imports {module} ({target})")
  assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
  """The parser finds local imports too, so the test above can fail."""
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from lmos_jax.train.step import train_step\n")
  assert lmos_imports(f) == [(2, "lmos_jax.train.step")]
