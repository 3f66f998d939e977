"""Import structure of the kd_detr package: no cycles between its parts, and a declared layer order.

Static: every .py file under kd_detr/ is parsed with `ast` (nothing is imported), so the test needs
neither torch nor a working package. A *part* is the first component below kd_detr: a subpackage
(kd_detr.engine) or a top-level module (kd_detr.matcher). Every import counts: at module level,
inside functions or `if TYPE_CHECKING:`, relative ones (`from .x import y`, `from .. import z`,
also in `__init__.py`), `from kd_detr import data` (the imported name is itself a part), and
`importlib.import_module("kd_detr.x")` with a literal name.

kd_detr/__init__.py itself is the pseudo-part ROOT ("__init__"): `from kd_detr import __version__`
is an import of it. Importing any part runs it first, so it must import no part (layer table below).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "kd_detr"
THIS_FILE = "tests/test_layers.py"
ROOT = "__init__"  # the pseudo-part of kd_detr/__init__.py

# Layers, lowest first: a part may import parts of its own layer or of lower layers, never higher
# ones. Target architecture (top to bottom):
#   cli, __main__ -> runs -> engine -> methods -> teacher
#   -> models, criterion, matcher, postprocess, evaluation -> data -> utilities.
# Entries for parts that do not exist yet are allowed (the refactor creates them); a part that
# exists but is missing here fails test_layer_order, so every new part gets placed deliberately.
LAYERS: dict[str, int] = {
    # -1: the package's own __init__.py (__version__); imported by anything, imports nothing.
    ROOT: -1,
    # 0: utilities, no kd_detr imports beyond each other.
    "atomic": 0,
    "folder_lock": 0,
    "progress": 0,
    "zoo": 0,
    "schema": 0,
    "dependencies": 0,
    "errors": 0,
    "pickle_scan": 0,
    "download": 0,
    # 1: data sets, transforms, collation.
    "data": 1,
    # 2: detector building blocks and their evaluation.
    "models": 2,
    "criterion": 2,
    "matcher": 2,
    "postprocess": 2,
    "evaluation": 2,
    # 3: teachers (loading, serving, caches).
    "teacher": 3,
    # 4: distillation methods.
    "methods": 4,
    # 5: the training engine (and the recipe loader, which composes the registered methods' sections).
    "engine": 5,
    # 6: runs (assembling runs from recipes and specs; compare, quickstart, eval/predict, export).
    "runs": 6,
    # 7: entry points.
    "cli": 7,
    "__main__": 7,
}


# --------------------------------------------------------------------------- graph builder


@dataclass(frozen=True, order=True)
class Import:
    """One import statement that makes part `src` depend on part `dst`."""

    path: str  # relative to the package's parent, e.g. "kd_detr/distill/trainer.py"
    line: int
    src: str
    dst: str
    code: str  # the statement, for messages

    def where(self) -> str:
        return f"{self.path}:{self.line}  {self.code}"


def find_parts(pkg_dir: Path) -> set[str]:
    """Parts of the package on disk: top-level modules and subdirectories holding .py files."""
    parts = set()
    for entry in pkg_dir.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_file() and entry.suffix == ".py" and entry.name != "__init__.py":
            parts.add(entry.stem)
        elif entry.is_dir() and any(entry.rglob("*.py")):
            parts.add(entry.name)
    return parts


def _source_files(pkg_dir: Path):
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir)
        if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        yield path, rel


def _module_name(pkg: str, rel: Path) -> tuple[str, bool]:
    """("kd_detr.distill.trainer", False) for distill/trainer.py; ("kd_detr.distill", True) for
    distill/__init__.py. The bool says whether the file is a package's __init__.py."""
    bits = [pkg, *rel.with_suffix("").parts]
    is_pkg = bits[-1] == "__init__"
    if is_pkg:
        bits = bits[:-1]
    return ".".join(bits), is_pkg


def _part_of_source(rel: Path) -> str:
    if len(rel.parts) == 1:
        return ROOT if rel.name == "__init__.py" else rel.stem
    return rel.parts[0]


def _targets(node: ast.AST, pkg: str, module: str, is_pkg: bool, parts: set[str], where: str):
    """Absolute module names (inside the package or not) that an import node pulls in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            # The package the file lives in: itself for an __init__.py, its parent otherwise.
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            if node.level - 1 >= len(base):
                raise ValueError(f"{where}: relative import goes above the top-level package")
            base = base[: len(base) - (node.level - 1)]
            full = ".".join(base + ([node.module] if node.module else []))
        else:
            full = node.module or ""
        if full == pkg:
            # `from kd_detr import data` imports the part; `from kd_detr import __version__` the root.
            return [f"{pkg}.{a.name}" if a.name in parts else pkg for a in node.names]
        return [full]
    if isinstance(node, ast.Call):  # importlib.import_module("kd_detr.x") / __import__("kd_detr.x")
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            return [node.args[0].value]
    return []


def collect_imports(pkg_dir: Path) -> list[Import]:
    """Every import from one part of the package to another (self-imports left out), sorted."""
    pkg_dir = Path(pkg_dir)
    pkg = pkg_dir.name
    parts = find_parts(pkg_dir)
    found = set()
    for path, rel in _source_files(pkg_dir):
        module, is_pkg = _module_name(pkg, rel)
        src = _part_of_source(rel)
        shown = f"{pkg}/{rel.as_posix()}"
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
        for node in ast.walk(tree):
            where = f"{shown}:{getattr(node, 'lineno', '?')}"
            for target in _targets(node, pkg, module, is_pkg, parts, where):
                bits = target.split(".")
                if bits[0] != pkg:
                    continue  # outside the package
                dst = bits[1] if len(bits) > 1 else ROOT
                if dst != src:
                    code = " ".join(ast.unparse(node).split())
                    found.add(Import(shown, node.lineno, src, dst, code))
    return sorted(found)


def edge_sites(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    sites = defaultdict(list)
    for imp in imports:
        sites[(imp.src, imp.dst)].append(imp)
    return dict(sites)


def find_cycles(edges, limit: int = 200) -> list[list[str]]:
    """Elementary cycles of a directed graph given as (src, dst) pairs, each once, as a node list
    that starts at its smallest node (the closing node is not repeated)."""
    succ = defaultdict(set)
    for a, b in edges:
        if a != b:
            succ[a].add(b)
    cycles = []
    for start in sorted(succ):
        # Cycles whose smallest node is `start`: search only nodes greater than it.
        stack = [(start, [start], iter(sorted(succ[start])))]
        while stack and len(cycles) < limit:
            node, path, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
            elif nxt == start:
                cycles.append(list(path))
            elif nxt > start and nxt not in path:
                stack.append((nxt, path + [nxt], iter(sorted(succ.get(nxt, ())))))
    return cycles


def cycle_report(imports: list[Import]) -> list[str]:
    """One readable entry per cycle: "a -> b -> a" and, per edge, the first import making it."""
    sites = edge_sites(imports)
    report = []
    for cycle in find_cycles(sites):
        closed = cycle + [cycle[0]]
        lines = [" -> ".join(closed)]
        for a, b in zip(closed, closed[1:]):
            first, *more = sites[(a, b)]
            extra = f"  (+{len(more)} more)" if more else ""
            lines.append(f"    {a} -> {b}: {first.where()}{extra}")
        report.append("\n".join(lines))
    return report


def layer_report(imports: list[Import], parts: set[str], layers: dict[str, int]) -> list[str]:
    """Parts missing from the layer table, then every import from a lower to a higher layer."""
    report = []
    everything = set(parts) | {i.src for i in imports} | {i.dst for i in imports}
    for part in sorted(everything - set(layers)):
        report.append(f"part {part} is not in the layer table of {THIS_FILE}: add it")
    for imp in imports:
        if imp.src in layers and imp.dst in layers and layers[imp.src] < layers[imp.dst]:
            report.append(
                f"{imp.where()}\n    {imp.src} (layer {layers[imp.src]}) imports "
                f"{imp.dst} (layer {layers[imp.dst]}), a higher layer"
            )
    return report


# --------------------------------------------------------------------------- the package


def test_no_import_cycle_between_parts():
    report = cycle_report(collect_imports(PKG_DIR))
    if report:
        pytest.fail(
            f"{len(report)} import cycle(s) between the parts of kd_detr "
            "(imports inside functions count):\n" + "\n".join(report),
            pytrace=False,
        )


def test_layer_order():
    report = layer_report(collect_imports(PKG_DIR), find_parts(PKG_DIR), LAYERS)
    if report:
        pytest.fail(
            f"kd_detr breaks its layer order ({THIS_FILE}, LAYERS: a part may import only its own "
            f"or lower layers) in {len(report)} place(s):\n" + "\n".join(report),
            pytrace=False,
        )


# --------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "synpkg"


def test_checker_on_a_synthetic_package(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "synpkg/__init__.py": '__version__ = "0"\n',
            # a/__init__ -> its own module: no edge.
            "synpkg/a/__init__.py": "from .core import f\n",
            # a -> b only through a function-level, two-dot relative import in a non-__init__ file.
            "synpkg/a/core.py": "import os\n\ndef f():\n    from ..b import helper\n    return helper\n",
            # b -> a through `from <package> import <part>`; b -> ROOT through __version__.
            "synpkg/b.py": "from synpkg import a, __version__\n\ndef helper():\n    pass\n",
            # In an __init__.py, `.` is the subpackage itself and `..` the package.
            "synpkg/c/__init__.py": "from . import inner\nfrom .. import b\n",
            "synpkg/c/inner.py": "import synpkg.c\n",
            # In a top-level module `.` is the package; importlib with a literal name counts too.
            "synpkg/d.py": (
                "import importlib\nfrom .a.core import f\n"
                "def g():\n    return importlib.import_module('synpkg.c.inner')\n"
            ),
        },
    )
    assert find_parts(pkg) == {"a", "b", "c", "d"}
    imports = collect_imports(pkg)
    sites = edge_sites(imports)
    assert set(sites) == {("a", "b"), ("b", "a"), ("b", ROOT), ("c", "b"), ("d", "a"), ("d", "c")}
    assert [i.where() for i in sites[("a", "b")]] == ["synpkg/a/core.py:4  from ..b import helper"]

    report = cycle_report(imports)
    assert report == [
        "a -> b -> a\n"
        "    a -> b: synpkg/a/core.py:4  from ..b import helper\n"
        "    b -> a: synpkg/b.py:1  from synpkg import a, __version__"
    ]

    layers = {ROOT: -1, "b": 0, "a": 1, "d": 2}
    assert layer_report(imports, find_parts(pkg), layers) == [
        "part c is not in the layer table of tests/test_layers.py: add it",
        "synpkg/b.py:1  from synpkg import a, __version__\n"
        "    b (layer 0) imports a (layer 1), a higher layer",
    ]


def test_find_cycles_lists_each_elementary_cycle_once():
    edges = {("a", "b"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "c"), ("d", "a")}
    assert find_cycles(edges) == [["a", "b"], ["a", "b", "c"]]
    assert find_cycles({("x", "y"), ("y", "z")}) == []
