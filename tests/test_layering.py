"""The import graph of radfm_jax/ and eval/ (read from the source with `ast`, nothing executed): no cycle,
no upward import, no library module importing configs/ or eval/, absl flags only in entry modules.

Layers, lowest first (a module may import its own layer and the layers below it):
  0 data core   radfm_jax.data.{schema,store,tokenizer,preprocess,collate,pipeline,readers}
  1 ingest      radfm_jax.data.ingest.*       2 demo data   radfm_jax.data.demo.*
  3 sharding    radfm_jax.sharding, radfm_jax.distributed
  4 models      radfm_jax.models.*            5 checkpoint  radfm_jax.checkpoint, radfm_jax.convert.*
  6 training / inference   radfm_jax.training.*, radfm_jax.inference.*
  7 entry points  train, generate, export, demo, aot, data.build, data.demo.__main__, convert.__main__, bench.*
  8 eval          eval.*
Imports inside functions count too (they hide cycles); the only ones allowed are the heavy optional
dependencies listed in LAZY_OK, each with a reason comment on its line.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = [  # (layer, module-name prefixes); the longest matching prefix wins
    (0, ["radfm_jax", "radfm_jax.data"]),
    (1, ["radfm_jax.data.ingest"]),
    (2, ["radfm_jax.data.demo"]),
    (3, ["radfm_jax.sharding", "radfm_jax.distributed"]),
    (4, ["radfm_jax.models"]),
    (5, ["radfm_jax.checkpoint", "radfm_jax.convert"]),
    (6, ["radfm_jax.training", "radfm_jax.inference"]),
    (7, ["radfm_jax.train", "radfm_jax.generate", "radfm_jax.export", "radfm_jax.demo", "radfm_jax.aot",
         "radfm_jax.data.build", "radfm_jax.data.demo.__main__", "radfm_jax.convert.__main__",
         "radfm_jax.bench"]),
    (8, ["eval"]),
]
ENTRY_LAYER = 7
# Imports that may stay inside functions: heavy or optional dependencies only.
LAZY_OK = ("torch", "clu", "tensorflow", "sentence_transformers", "RaTEScore", "apache_beam", "peft",
           "transformers", "jax.experimental.pallas", "libtpu", "sklearn", "sacrebleu", "rouge_score",
           "pycocoevalcap", "nltk", "safetensors", "jax", "eval.generation")


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for top in ("radfm_jax", "eval"):
    for p in sorted((ROOT / top).rglob("*.py")):
      name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
      mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
  return mods


MODULES = _modules()


def layer_of(mod: str) -> int:
  best, layer = -1, None
  for lay, prefixes in LAYERS:
    for pre in prefixes:
      if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best:
        best, layer = len(pre), lay
  assert layer is not None, f"{mod} is in no layer: add it to LAYERS in tests/test_layering.py"
  return layer


def _resolve(name: str) -> str | None:
  """The project module an imported dotted name refers to (a module, or the module defining a name)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports(mod: str) -> list[tuple[str, int, bool, str]]:
  """(target, line, inside a function, imported name) for every import in `mod`."""
  path = MODULES[mod]
  tree = ast.parse(path.read_text(), str(path))
  pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
  out = []

  def visit(node, in_func):
    for child in ast.iter_child_nodes(node):
      inner = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
          base = ".".join(parts + ([base] if base else []))
        # `from pkg import sub` imports the submodule when it is one, else a name defined in pkg
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
      for n in names:
        out.append((n, child.lineno, in_func, n))
      visit(child, inner)

  visit(tree, False)
  return out


def graph() -> dict[str, set[str]]:
  g = {m: set() for m in MODULES}
  for m in MODULES:
    for name, *_ in imports(m):
      t = _resolve(name)
      if t and t != m and not m.startswith(t + "."):
        g[m].add(t)
  return g


def test_every_module_has_a_layer():
  for m in MODULES:
    layer_of(m)


def test_no_import_cycles():
  g = graph()
  state: dict[str, int] = {}
  cycles = []

  def dfs(v, stack):
    state[v] = 1
    stack.append(v)
    for w in sorted(g[v]):
      if state.get(w) == 1:
        cycles.append(" -> ".join(stack[stack.index(w):] + [w]))
      elif not state.get(w):
        dfs(w, stack)
    stack.pop()
    state[v] = 2

  for v in sorted(g):
    if not state.get(v):
      dfs(v, [])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_point_down():
  bad = []
  for m, targets in graph().items():
    for t in targets:
      if layer_of(t) > layer_of(m):
        bad.append(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})")
      elif (layer_of(t) == ENTRY_LAYER == layer_of(m) and not t.startswith("radfm_jax.bench.")
            and not (m.startswith("radfm_jax.aot") and t.startswith("radfm_jax.aot."))):  # one package
        bad.append(f"entry module {m} imports entry module {t}")
  assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_library_never_imports_configs():
  bad = [f"{m}:{line}" for m in MODULES if layer_of(m) < ENTRY_LAYER
         for name, line, *_ in imports(m) if name == "configs" or name.startswith("configs.")]
  assert not bad, f"library modules import configs/: {bad}"


def test_imports_inside_functions_are_heavy_optional_deps_with_a_reason():
  bad = []
  for m, path in MODULES.items():
    lines = path.read_text().splitlines()
    for name, line, in_func, _ in imports(m):
      if not in_func:
        continue
      ok = any(name == p or name.startswith(p + ".") for p in LAZY_OK)
      if not ok or "#" not in lines[line - 1]:
        bad.append(f"{m}:{line}: {name}")
  assert not bad, ("imports inside functions (only heavy optional deps, with a reason comment):\n"
                   + "\n".join(bad))


def test_flags_only_in_entry_modules_and_never_at_import_of_a_library():
  bad = []
  for m, path in MODULES.items():
    if layer_of(m) >= ENTRY_LAYER:
      continue
    tree = ast.parse(path.read_text())

    def at_import(node):  # what runs at import: not function bodies, not the `__main__` block
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
          continue
        if isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
          continue
        if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
            and child.func.attr.startswith("DEFINE")):
          bad.append(f"{m}:{child.lineno}")
        at_import(child)

    at_import(tree)
  assert not bad, f"library modules define absl flags at import: {bad}"


@pytest.mark.parametrize("src,expect", [
    ("from radfm_jax.training import step\n", "radfm_jax.training.step"),
    ("from radfm_jax import models\n", "radfm_jax.models"),
    ("from radfm_jax.models.llama import Llama\n", "radfm_jax.models.llama"),
])
def test_resolver(src, expect, tmp_path):
  """The checker itself sees the imports it must see (so the tests above cannot pass vacuously)."""
  node = ast.parse(src).body[0]
  base = node.module
  names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
  assert _resolve(names[0]) == expect
