"""The package's import graph runs one way (ARCHITECTURE.md): a static check with ``ast``.

The rules, for every module of ``python/rank1fast`` (a module is a ``.py`` file; the package's
own ``__init__.py`` is the module ``__init__``):

1. Every import of a module of the package counts, wherever it is written: at the top, inside
   a function (a "lazy" import runs later but still ties the two modules together), or in
   ``try``/``if`` blocks. Only ``if TYPE_CHECKING:`` blocks are left out: they never run.
   ``from . import x`` (or ``import rank1fast.x``) imports the module ``x`` when ``x`` is one;
   any other name imported from the package is an import of ``__init__``.
2. No cycles: the graph of rule 1 is acyclic.
3. Layers: each module sits in one of ``LAYERS``, and imports only modules of its own layer or
   of lower ones. A new module must be added to ``LAYERS``.
4. No module imports the package ``__init__`` (``from . import __version__``,
   ``import rank1fast``): ``__init__`` imports (nearly) everything, so that is a cycle waiting
   to happen; import the owner module instead (``from ._version import __version__``).
5. Private names stay private: no module imports a name with a leading underscore from another
   module (``from .collect import _summary``), nor reads one off an imported module
   (``collect._summary``). Private *modules* may be imported (``from . import _core``,
   ``from ._fs import write_json``); the helpers they share have names without an underscore.
   Dunder names (``__version__``) are not private.

The native extension ``_core`` is not a ``.py`` file: imports of it are allowed everywhere and
are not part of the graph.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "rank1fast"
ROOT = Path(__file__).resolve().parents[1] / "python" / PACKAGE

#: Lowest first. A module imports only modules of its own layer or of lower ones.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "helpers: private modules shared by several others, the errors, the version",
        {
            "errors",
            "_version",
            "_progress",
            "_files",
            "_fs",
            "_peft",
            "_args",
            "_manifest",
            "_batch",
        },
    ),
    (
        "building blocks: what the pipeline passes around (reports, models, corpora, vectors, "
        "adapter file rules)",
        {"report", "solve_torch", "online", "models", "corpus", "vectors", "serving"},
    ),
    (
        "pipeline: collect, analyze, steer, write, verify, correct, convert",
        {
            "_cluster",
            "analysis",
            "collect",
            "steering",
            "adapter",
            "verify",
            "corrections",
            "convert",
        },
    ),
    (
        "interop and views: llama.cpp, merging into weights, clusters, explanations, plots",
        {"llamacpp", "merging", "distributed", "explain", "plot"},
    ),
    ("entry points: the CLI, the demo, the package", {"cli", "demo", "__main__", "__init__"}),
]

NATIVE = {"_core"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Import:
    """One import of a module of the package: ``importer`` imports ``target`` (``names``
    from it) at ``line``."""

    importer: str
    target: str
    names: tuple[str, ...]
    line: int


@dataclass
class Package:
    """What the checks read from a package directory."""

    modules: set[str]
    imports: list[Import]
    attributes: list[tuple[str, str, str, int]]  # (module, imported module, _name, line)


def _body_without_type_checking(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:`` (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read_package(root: Path, package: str = PACKAGE) -> Package:
    """Parse every module of the (flat) package at ``root``."""
    modules = {p.stem for p in root.glob("*.py")}
    imports: list[Import] = []
    attributes: list[tuple[str, str, str, int]] = []
    for path in sorted(root.glob("*.py")):
        me = path.stem
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        aliases: dict[str, str] = {}  # local name -> module of the package it is bound to

        def add(target: str, names: tuple[str, ...], line: int, me: str = me) -> None:
            if target not in NATIVE:
                imports.append(Import(me, target, names, line))

        for node in _body_without_type_checking(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    raise AssertionError(
                        f"{path}:{node.lineno}: a relative import above the package"
                    )
                if node.level == 1:
                    base = node.module or ""
                elif node.module == package or (node.module or "").startswith(package + "."):
                    base = node.module[len(package) :].lstrip(".")
                else:
                    continue
                if base:
                    add(base.split(".")[0], tuple(a.name for a in node.names), node.lineno)
                    continue
                # `from . import x, y`: submodules are imports of them, other names of __init__.
                for a in node.names:
                    if a.name in modules or a.name in NATIVE:
                        add(a.name, (), node.lineno)
                        aliases[a.asname or a.name] = a.name
                    else:
                        add("__init__", (a.name,), node.lineno)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == package:
                        add("__init__", (), node.lineno)
                    elif a.name.startswith(package + "."):
                        sub = a.name.split(".")[1]
                        add(sub, (), node.lineno)
                        if a.asname:
                            aliases[a.asname] = sub
        for node in _body_without_type_checking(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                attributes.append((me, aliases[node.value.id], node.attr, node.lineno))
    return Package(modules, imports, attributes)


# --------------------------------------------------------------------------- the checks


def find_cycle(pkg: Package) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    graph: dict[str, set[str]] = {m: set() for m in pkg.modules}
    for imp in pkg.imports:
        if imp.target != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.target)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def cycle_problems(pkg: Package) -> list[str]:
    cycle = find_cycle(pkg)
    if cycle is None:
        return []
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        lines = sorted({i.line for i in pkg.imports if i.importer == a and i.target == b})
        steps.append(f"{a}.py (line {', '.join(map(str, lines))}) imports {b}")
    return ["import cycle " + " -> ".join(cycle) + ":\n    " + "\n    ".join(steps)]


def layer_problems(pkg: Package) -> list[str]:
    level = {m: i for i, (_, members) in enumerate(LAYERS) for m in members}
    problems = [
        f"{m}.py is in no layer: add it to LAYERS in tests/test_layout.py (and ARCHITECTURE.md)"
        for m in sorted(pkg.modules - set(level))
    ]
    for imp in pkg.imports:
        a, b = level.get(imp.importer), level.get(imp.target)
        if a is not None and b is not None and b > a:
            problems.append(
                f"{imp.importer}.py line {imp.line} imports {imp.target}, a higher layer "
                f"({LAYERS[b][0].split(':')[0]} above {LAYERS[a][0].split(':')[0]}): move what "
                "it needs down, or the importer up"
            )
    return problems


def init_problems(pkg: Package) -> list[str]:
    return [
        f"{imp.importer}.py line {imp.line} imports the package __init__"
        + (f" ({', '.join(imp.names)})" if imp.names else "")
        + ": import from the module that owns the name"
        for imp in pkg.imports
        if imp.target == "__init__" and imp.importer != "__init__"
    ]


def private_name_problems(pkg: Package) -> list[str]:
    problems = [
        f"{imp.importer}.py line {imp.line} imports {name} from {imp.target}: a private name "
        "of another module; make it public in its owner, or move it to a private helper "
        "module (rank1fast._x) under a name without an underscore"
        for imp in pkg.imports
        if imp.target != imp.importer
        for name in imp.names
        if _private(name)
    ]
    problems += [
        f"{me}.py line {line} reads {target}.{name}: a private name of another module"
        for me, target, name, line in pkg.attributes
        if target != me
    ]
    return problems


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def package() -> Package:
    return read_package(ROOT)


def test_the_package_is_read(package: Package) -> None:
    # The checks below see something: the modules and imports everyone knows about.
    assert {"__init__", "collect", "analysis", "cli"} <= package.modules
    assert any(i.importer == "__init__" and i.target == "collect" for i in package.imports)
    lazy = [i for i in package.imports if i.importer == "cli" and i.target == "distributed"]
    assert lazy, "imports inside functions are part of the graph"


def test_no_import_cycle(package: Package) -> None:
    problems = cycle_problems(package)
    assert not problems, "\n".join(problems)


def test_imports_run_down_the_layers(package: Package) -> None:
    problems = layer_problems(package)
    assert not problems, "\n".join(problems)


def test_no_module_imports_the_package_init(package: Package) -> None:
    problems = init_problems(package)
    assert not problems, "\n".join(problems)


def test_no_private_name_crosses_modules(package: Package) -> None:
    problems = private_name_problems(package)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_forbid(tmp_path: Path) -> None:
    # A small package that breaks every rule once: each check must name the culprit.
    files = {
        "__init__.py": "from .b import g\n__version__ = '1'\n",
        "_h.py": "def shared():\n    pass\n",
        "errors.py": "def h():\n    from .cli import main\n",
        "a.py": (
            "from typing import TYPE_CHECKING\n"
            "from . import _h, b\n"
            "from ._h import shared\n"
            "if TYPE_CHECKING:\n"
            "    from .cli import main\n"
            "def f():\n"
            "    return b._private\n"
        ),
        "b.py": "def g():\n    from .a import f\n",
        "cli.py": "from rank1fast.a import _f\nfrom rank1fast import __version__\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    pkg = read_package(tmp_path)
    assert find_cycle(pkg) in (["a", "b", "a"], ["b", "a", "b"])
    assert any(
        "cli.py line 2 imports the package __init__ (__version__)" in p for p in init_problems(pkg)
    )
    private = "\n".join(private_name_problems(pkg))
    assert "cli.py line 1 imports _f from a" in private
    assert "a.py line 7 reads b._private" in private
    assert "shared" not in private  # a private helper module's public names are fine
    # The TYPE_CHECKING import of cli (a higher layer) is not counted; lazy ones are.
    assert not any(i.importer == "a" and i.target == "cli" for i in pkg.imports)
    assert any(i.importer == "b" and i.target == "a" and i.line == 2 for i in pkg.imports)
    layers = "\n".join(layer_problems(pkg))
    assert "_h.py is in no layer" in layers
    assert "errors.py line 2 imports cli, a higher layer" in layers
