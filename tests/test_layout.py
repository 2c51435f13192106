"""The package's layers stay one-way: binaries on top, parts in the middle, base below.

Every module of big_clip/ is parsed (imports at module level and inside functions alike); the
test fails on an import circle, on any import of a binary from inside the package, on a part
importing a layer above it, and on an in-function import of big_clip itself (lazy imports are
kept for heavy optional third-party dependencies only).
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "big_clip")

BINARIES = {"big_clip.train", "big_clip.evaluate", "big_clip.export", "big_clip.predict",
            "big_clip.report", "big_clip.plan"}
# Lower layers first; a module may import its own layer and the layers below it.
LAYERS = (
    ("base", ("big_clip.errors", "big_clip.fileio", "big_clip.config", "big_clip.workdir",
              "big_clip.sharding", "big_clip.optim", "big_clip.checkpoints", "big_clip.cli")),
    ("models", ("big_clip.models",)),
    ("losses", ("big_clip.losses",)),
    ("data", ("big_clip.data",)),
    ("convert", ("big_clip.convert",)),
    ("evals", ("big_clip.evals",)),
    ("steps", ("big_clip.steps",)),
    ("planning", ("big_clip.planning",)),  # compiles the steps for a TPU topology
    ("reporting", ("big_clip.reporting",)),  # plots of a workdir's logs
    ("api", ("big_clip.api",)),  # load / embed / zero-shot over the parts
    ("package", ("big_clip",)),  # the package root: the user's door
    ("binaries", tuple(sorted(BINARIES))),
)
# The one documented seam where data reads a model: an LLM tower's tokenizer needs the LLM's
# config (EOS id, vocabulary size, pad id) and its embedding cache runs the LLM
# (big_clip/data/text_cache.py).
SEAMS = {("big_clip.data.text_cache", "big_clip.models.llm")}


def modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE_DIR):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def imports(mods: dict[str, str]) -> tuple[set[tuple[str, str]], list[str]]:
  """(edges between big_clip modules, 'module:line -> target' of in-function ones)."""
  edges, lazy = set(), []
  for name, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = name.split(".")
          keep = len(parts) - node.level + (1 if path.endswith("__init__.py") else 0)
          base = ".".join(parts[:keep] + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                   for a in node.names]
      else:
        continue
      for target in targets:
        while target and target not in mods:
          target = target.rpartition(".")[0]
        if target and target != name:
          edges.add((name, target))
          if id(node) not in top:
            lazy.append(f"{name}:{node.lineno} -> {target}")
  return edges, lazy


# Local-only file calls: on 'gs://bucket/run' they read nothing or write into a local folder
# named 'gs:'. User paths go through big_clip.fileio; these modules keep local files on
# purpose (memory-mapped LLM weights and embedding caches, a temporary folder, package data).
LOCAL_FILE_CALLS = {"open", "os.makedirs", "os.replace", "os.rename", "os.remove",
                    "os.listdir", "os.walk", "os.path.exists", "os.path.isdir",
                    "os.path.isfile", "os.path.getsize", "os.path.abspath", "shutil.copy",
                    "shutil.rmtree", "np.load", "np.save"}
LOCAL_FILES_ON_PURPOSE = {
    "big_clip.fileio": "the layer itself",
    "big_clip.models.llm": "safetensors are memory-mapped from a local folder",
    "big_clip.data.text_cache": "the embedding cache is memory-mapped from a local folder",
    "big_clip.convert.llm_export": "writes an LLM folder, which models.llm memory-maps locally",
    "big_clip.data.tokenizers": "sentencepiece trains into a local temporary folder",
    "big_clip.evals.labels": "the label files shipped inside the package",
    "big_clip.api": "a local image path (a remote one goes through data.manifest)",
}


def local_file_calls(path: str) -> list[str]:
  """'line: name' of every call of LOCAL_FILE_CALLS in the file at `path`."""
  with open(path) as f:
    tree = ast.parse(f.read())
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      name, func = [], node.func
      while isinstance(func, ast.Attribute):
        name.insert(0, func.attr)
        func = func.value
      if isinstance(func, ast.Name):
        dotted = ".".join([func.id] + name)
        if dotted in LOCAL_FILE_CALLS:
          out.append(f"{node.lineno}: {dotted}")
  return out


def layer(module: str) -> int:
  best = None
  for rank, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if module == p or module.startswith(p + "."):
        if best is None or len(p) > best[1]:
          best = (rank, len(p))
  assert best is not None, f"{module} belongs to no layer; add it to LAYERS in {__file__}"
  return best[0]


def violations(edges: set[tuple[str, str]]) -> list[str]:
  """Every edge that breaks the layering rules."""
  out = []
  for a, b in sorted(edges):
    if b in BINARIES:
      out.append(f"{a} imports the binary {b}")
    elif (a, b) in SEAMS:
      continue
    elif layer(b) > layer(a):
      out.append(f"upward: {a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})")
    elif LAYERS[layer(a)][0] == "data" and LAYERS[layer(b)][0] == "models":
      out.append(f"{a} imports {b}: data reads models only through {sorted(SEAMS)}")
  return out


def circles(edges: set[tuple[str, str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  graph: dict[str, set[str]] = {}
  for a, b in edges:
    graph.setdefault(a, set()).add(b)
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
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
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


@pytest.fixture(scope="module")
def graph():
  mods = modules()
  return mods, *imports(mods)


def test_the_package_has_no_import_circle(graph):
  _, edges, _ = graph
  assert circles(edges) == []


def test_no_module_imports_a_binary_or_a_layer_above_it(graph):
  _, edges, _ = graph
  assert violations(edges) == []


def test_big_clip_is_never_imported_inside_a_function(graph):
  _, _, lazy = graph
  assert lazy == []


def test_every_module_belongs_to_a_layer(graph):
  mods, _, _ = graph
  for m in mods:
    layer(m)


def test_user_paths_go_through_fileio_so_gcs_workdirs_never_land_in_a_local_gs_folder():
  found = {name: calls for name, path in modules().items()
           if name not in LOCAL_FILES_ON_PURPOSE and (calls := local_file_calls(path))}
  assert not found, ("use big_clip.fileio (tf.io.gfile) for user paths, or add the module to "
                     f"LOCAL_FILES_ON_PURPOSE with the reason: {found}")


def test_the_local_file_call_finder_sees_builtin_and_os_calls(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import os\nos.makedirs(d)\nwith open(p) as f: pass\nImage.open(x)\n"
                  "os.path.join(a, b)\n")
  assert local_file_calls(str(path)) == ["2: os.makedirs", "3: open"]


@pytest.mark.parametrize("edge", [  # the back-edges this layout removed: each must still fail
    ("big_clip.evaluate", "big_clip.train"),
    ("big_clip.export", "big_clip.train"),
    ("big_clip.train", "big_clip.evaluate"),
    ("big_clip.data.text_cache", "big_clip.evaluate"),
    ("big_clip.models.llm", "big_clip.data.tokenizers"),
    ("big_clip.data.tokenizers", "big_clip.models.llm"),
    ("big_clip.losses.long_clip", "big_clip.data.pipeline"),
    ("big_clip.config", "big_clip.evals.specs"),
    ("big_clip.models.adapt", "big_clip.convert.tables"),
])
def test_the_rules_reject_the_old_back_edges(edge):
  assert violations({edge}), edge


def test_circles_are_found():
  assert circles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
