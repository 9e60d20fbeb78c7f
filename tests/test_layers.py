"""The package's layers point one way: a module imports only from its own layer or below.

Read from the source (every ``import mmgen...`` and ``from mmgen... import``, also inside
functions), so the architecture in docs/CONVENTIONS.md stays true because a test holds it.
The tests point one way too: no test file imports another (or conftest.py); what two
files share is a fixture in tests/conftest.py.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mmgen")
TESTS = os.path.join(ROOT, "tests")

# Top to bottom. A module may import from its own layer and the layers below it.
LAYERS = (
    ("mmgen", "mmgen.__main__", "mmgen.api", "mmgen.commands"),  # the command line, the Python API (the front door)
    ("mmgen.families",),  # what the loop runs: state, step, data, evaluation hook, load
    ("mmgen.eval",),  # metrics and evaluators over loaded models
    ("mmgen.generative", "mmgen.tokenizers", "mmgen.adapters"),  # models and their host-side inputs
    ("mmgen.train",),  # the loop, checkpoints, optimizers, metrics files, workdirs
    ("mmgen.data",),  # datasets, media, the input pipeline
    ("mmgen.nn",),  # shared layers
    ("mmgen.parallel",),  # meshes, sharding rules, multi-host start-up
    ("mmgen.config", "mmgen.errors", "mmgen.fs", "mmgen.progress"),  # config files and overrides; user errors; paths on any filesystem; progress
)

# (importer, imported) pairs allowed to point up, each with its reason. Keep it at most one.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def all_modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[module_name(path)] = path
    return out


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The mmgen modules ``name`` imports (a ``from pkg import sub`` of a submodule names the submodule)."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mmgen")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mmgen":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs if len(subs) == len(node.names) else [target, *subs])
    found.discard(name)
    return found


def layer_of(module: str) -> int:
    best, index = "", None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, index = p, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS (and docs/CONVENTIONS.md)"
    return index


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_no_import_points_up_the_layer_list():
    upward = sorted((a, b) for a, targets in import_graph().items() for b in targets
                    if layer_of(b) < layer_of(a) and (a, b) not in ALLOWED_UPWARD)
    assert upward == []
    assert len(ALLOWED_UPWARD) <= 1


def test_the_layer_check_sees_a_violation():
    # The checks above could pass by finding nothing: a planted upward import and cycle are found.
    graph = {"mmgen.train.loop": {"mmgen.families.toy"}, "mmgen.families.toy": {"mmgen.train.loop"}}
    assert cycles(graph) == [["mmgen.families.toy", "mmgen.train.loop"]]
    assert layer_of("mmgen.families.toy") < layer_of("mmgen.train.loop")
    assert "mmgen.generative.tokens" in import_graph()["mmgen.families.generative"]


# Where a tokenizer's kind is settled once, by ``mmgen.tokenizers.kinds.kind(cfg.modality)``:
# these packages call the kind's methods instead of comparing the modality to a name.
KIND_DISPATCH_FREE = ("mmgen.families", "mmgen.tokenizers")


def _names_modality(node: ast.AST) -> bool:
    """``x.modality``, ``modality``, ``x.get("modality")`` or ``x["modality"]``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "modality"
    if isinstance(node, ast.Name):
        return node.id == "modality"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "modality"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "modality"
    return False


def _is_name_literal(node: ast.AST) -> bool:
    """A string, or a tuple/list/set of strings."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_name_literal(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def modality_comparisons(source: str) -> list[int]:
    """Lines of ``source`` comparing a modality to a literal name (``cfg.modality == "video"``, ``in (...)``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_modality(o) for o in operands) and any(_is_name_literal(o) for o in operands):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_tokenizer_family_asks_the_tokenizer_kind_instead_of_branching_on_modality():
    found = {}
    for name, path in sorted(all_modules().items()):
        if name.startswith(KIND_DISPATCH_FREE):
            with open(path) as f:
                lines = modality_comparisons(f.read())
            if lines:
                found[name] = lines
    assert found == {}, "call the tokenizer kind (mmgen.tokenizers.kinds) instead of comparing cfg.modality"
    # The check could pass by finding nothing: planted comparisons are found, a lookup is not.
    planted = ("if cfg.modality == 'video':\n    pass\nx = 1 if cfg.get('modality') != \"audio\" else 2\n"
               "ok = modality in ('video', 'audio')\ny = KINDS[cfg.modality]\nz = cfg['modality'] == name\n")
    assert modality_comparisons(planted) == [1, 3, 4]


def test_every_package_folder_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    folders = {module_name(os.path.join(d, "__init__.py")) for d, _, files in os.walk(PACKAGE) if "__init__.py" in files}
    configs = {"mmgen." + os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "configs")) if "__init__.py" in files}
    assert folders | configs == listed


def imported_test_modules(source: str) -> set[str]:
    """The test modules (``test_*``, ``conftest``) that ``source`` imports, also inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else [node.module or ""] + [a.name for a in node.names]
        else:
            continue
        for name in names:
            last = name.split(".")[-1]
            if last.startswith("test_") or last == "conftest":
                found.add(name)
    return found


def test_no_test_file_imports_another():
    imports = {}
    for f in sorted(os.listdir(TESTS)):
        if f.endswith(".py"):
            with open(os.path.join(TESTS, f)) as source:
                imports[f] = imported_test_modules(source.read())
    assert "test_layers.py" in imports and "conftest.py" in imports
    assert {f: sorted(names) for f, names in imports.items() if names} == {}, \
        "move what two test files share into tests/conftest.py as a fixture"
    # The check could pass by finding nothing: planted imports are found.
    planted = "from test_transformer import small_config\nimport tests.test_plan\n" \
              "def f():\n    from conftest import ROOT\n    from . import test_sampling\n"
    assert imported_test_modules(planted) == {"test_transformer", "tests.test_plan", "conftest", "test_sampling"}
