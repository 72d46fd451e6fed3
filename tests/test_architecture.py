"""The layer picture of the README, checked from the source: every arrow between folders points down.

Every ``import`` of an ``ascl`` module (module level, inside functions, under TYPE_CHECKING) is
an arrow from the importing module's layer to the imported one's. Entry points sit on top and
may call any layer: the CLI modules (``ascl/cli.py``, ``*/cli.py``, ``ascl/__main__.py``) and the
package façade ``ascl/__init__.py`` (which lazily re-exports ``ASCLLoss`` and ``Encoder``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (import prefix, layer); a module belongs to the longest folder that holds it
FOLDERS = {
    "ascl": ("ascl", "core"),
    "training": ("ascl.training", "training"),
    "export": ("ascl.export", "export"),
    "model_cards": ("ascl.model_cards", "publishing"),
    "serving/collections": ("ascl.serving.collections", "collections"),
    "serving/online": ("ascl.serving.online", "online"),
    "serving": ("ascl.serving", "online"),  # the package itself: lazy re-exports of Client, Hit, TritonServer
    "demo": ("ascl.demo", "demo"),
}
# What each layer may import besides itself (../shared/docs/DESIGN.md, the README's Architecture).
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "export": {"core"},
    "publishing": {"core", "training"},
    "collections": {"core", "export"},
    "online": {"core", "export", "collections"},
    "demo": {"core", "online"},
}
ENTRY_POINTS = {"ascl", "ascl.__main__", "ascl.cli"}
# The Triton Python models: files of the model repository, not modules of the package. They are
# checked as modules of the online layer (``ascl.serving.online.templates.<name>``).
TEMPLATES = ROOT / "serving" / "online" / "templates"


def _folder_of(path: Path) -> str:
    """The most specific folder of ``FOLDERS`` that holds ``path``."""
    rel = path.relative_to(ROOT).as_posix()
    return max((f for f in FOLDERS if rel.startswith(f + "/")), key=len)


def project_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the ``ascl`` namespace (and the Triton models)."""
    modules = {}
    for folder, (prefix, _) in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if _folder_of(path) != folder:
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def imported_names(path: Path) -> set[str]:
    """Every absolute ``ascl...`` module name that ``path`` imports, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("ascl"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("ascl"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from ascl import registry`
    return names


def layer_of(module: str) -> str:
    """The layer of a dotted module name: that of the longest folder prefix it has (core when none)."""
    found = [(prefix, layer) for prefix, layer in FOLDERS.values()
             if prefix != "ascl" and (module.startswith(prefix + ".") or module == prefix)]
    return max(found)[1] if found else "core"


def is_entry_point(module: str) -> bool:
    return module in ENTRY_POINTS or module.endswith(".cli")


def layer_arrows() -> dict[tuple[str, str], list[str]]:
    """(from layer, to layer) -> the module imports behind it, entry points left out."""
    modules = project_modules()
    arrows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in modules.items():
        if is_entry_point(module):
            continue
        for name in imported_names(path):
            target = name if name in modules else name.rpartition(".")[0]  # `from m import f` -> m
            if target not in modules or target == "ascl":
                continue
            src, dst = layer_of(module), layer_of(target)
            if src != dst:
                arrows[(src, dst)].append(f"{module} -> {target}")
    return arrows


def find_cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    """A cycle in the directed graph ``edges`` (as a node list), or None."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*stack, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_checker_sees_arrows_and_cycles() -> None:
    assert layer_of("ascl.models") == "core" and layer_of("ascl.serving.online.gallery") == "online"
    assert layer_of("ascl.serving.collections.index") == "collections" and layer_of("ascl.serving") == "online"
    assert layer_of("ascl.model_cards.publish") == "publishing" and layer_of("ascl.training") == "training"
    assert find_cycle({("a", "b"), ("b", "c"), ("c", "a")}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"), ("b", "c"), ("a", "c")}) is None
    arrows = layer_arrows()
    assert ("collections", "export") in arrows and ("training", "core") in arrows  # it does see real imports
    assert ("online", "collections") in arrows
    assert any("ascl.serving.online.model_steps -> " in why for why in arrows[("online", "collections")])


def test_every_arrow_between_folders_points_down() -> None:
    upward = [
        f"{src} may not import {dst}: " + "; ".join(sorted(set(why))[:5])
        for (src, dst), why in sorted(layer_arrows().items())
        if dst not in ALLOWED[src]
    ]
    assert not upward, "\n".join(upward)


def test_no_cycle_between_folders() -> None:
    assert find_cycle(set(layer_arrows())) is None


@pytest.mark.parametrize("folder", ["benchmarks"])
def test_benchmarks_do_not_import_the_test_suite(folder: str) -> None:
    offenders = []
    for path in sorted((ROOT / folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {m}" for m in mods if m.split(".")[0] in ("tests", "conftest", "pytest")]
    assert not offenders, offenders


def longest_chain(start: str) -> list[str]:
    """The longest import chain (no module twice) from ``start``: what a reader of it may have to follow."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = {n if n in modules else n.rpartition(".")[0] for n in imported_names(path)}
        graph[module] = sorted(t for t in targets if t in modules and t not in (module, "ascl"))
    best: list[str] = []

    def walk(path: list[str]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for nxt in graph[path[-1]]:
            if nxt not in path:
                walk([*path, nxt])

    walk([start])
    return best


def test_the_ascl_up_path_is_short_and_downhill() -> None:
    chain = longest_chain("ascl.demo.up")
    layers = [layer_of(m) for m in chain]
    crossings = [(a, b) for a, b in zip(layers, layers[1:], strict=False) if a != b]
    assert all(b in ALLOWED[a] for a, b in crossings), chain
    # Before the core model layer: 13 modules, 5 layers, 5 crossings up and down (README, Architecture).
    # serving/online and serving/collections count as the one serving folder they share here.
    folders = {"serving" if layer in ("online", "collections") else layer for layer in layers}
    assert len(chain) <= 11 and len(folders) <= 4, " -> ".join(chain)


def import_time_names(path: Path) -> set[str]:
    """The ``ascl`` modules ``path`` imports when it is imported: module-level statements, not
    those inside functions or under ``if TYPE_CHECKING``."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        names |= imported_names_of(node)
    return names


def imported_names_of(tree: ast.AST) -> set[str]:
    """``imported_names`` of one syntax tree."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("ascl"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("ascl"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_model_repository_vendors_what_the_triton_models_import() -> None:
    """Every ``ascl`` module a Triton model imports, and what those import when loaded (and their
    packages), is copied into the model repository: the models run where ascl is not installed."""
    from ascl.serving.online.repository import VENDORED_MODULES

    modules = project_modules()

    def resolve(names: set[str]) -> set[str]:
        return {n if n in modules else n.rpartition(".")[0] for n in names} & set(modules)

    templates = sorted(TEMPLATES.glob("*.py"))
    assert {p.stem for p in templates} >= {"preprocess", "encoder", "search"}
    needed: set[str] = set()
    todo = sorted(resolve(set().union(*(imported_names(p) for p in templates))))
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        needed.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a module runs its packages
        todo += sorted(resolve(import_time_names(modules[module])))
    assert "ascl.serving.collections.index" in needed and "ascl.export.runtime" in needed
    missing = sorted(needed - set(VENDORED_MODULES))
    assert not missing, f"the Triton models import these, but the repository does not vendor them: {missing}"


def test_the_triton_models_search_only_through_the_index_interface() -> None:
    """The Python models and their steps never reach FAISS itself, so any backend of the index
    interface (a vector database too) serves them."""
    offenders = []
    for path in [*sorted(TEMPLATES.glob("*.py")), ROOT / "serving" / "online" / "model_steps.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {m}" for m in mods
                          if m.split(".")[0] == "faiss" or m.startswith("ascl.serving.collections.faiss")]
    assert not offenders, offenders
