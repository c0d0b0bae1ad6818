"""The import graph of llmtrain: no cycles, no private names used across modules (issue 21).

The graph is read from the source with `ast`, so imports inside functions count too: a cycle
hidden by a function-level import still ties the modules together (and breaks as soon as someone
moves the import up). Edges: `import a.b` and `from a import b` (b a module) go to the module
a.b, `from a.b import name` to a.b (a package's is its __init__); importing a module from outside
its package also runs the package's __init__, so that is an edge too. Imports under
`if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llmtrain

ROOT = Path(llmtrain.__file__).parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file of every module under `root` (the directory of package `package`)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


class _Imports(ast.NodeVisitor):
    """Edges and private-name uses of one module `me`; `mods` are all modules of the package."""

    def __init__(self, me: str, is_package: bool, mods: dict[str, Path], package: str):
        self.me, self.mods, self.package = me, mods, package
        self.here = me if is_package else _parent(me)  # what relative imports start from
        self.edges: set[str] = set()
        self.problems: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> package module it is bound to

    def _ours(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def _owner(self, name: str) -> str:
        """The module defining `name` (a module itself, or an attribute of the nearest one)."""
        while name not in self.mods:
            name = _parent(name)
        return name

    def _edge(self, target: str) -> None:
        """An import of module `target` (and of each package above it that `me` is outside)."""
        if target != self.me:
            self.edges.add(target)
        pkg = _parent(target)
        while pkg and not (self.me == pkg or self.me.startswith(pkg + ".")):
            self.edges.add(pkg)
            pkg = _parent(pkg)

    def _private(self, what: str, line: int) -> None:
        self.problems.append(f"{self.me}:{line} uses {what}")

    def visit_If(self, node: ast.If) -> None:
        name = node.test.id if isinstance(node.test, ast.Name) else getattr(node.test, "attr", "")
        if name != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        for child in node.orelse:  # `if TYPE_CHECKING:` runs only for type checkers
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if self._ours(a.name):
                self._edge(self._owner(a.name))
                if a.asname:
                    self.aliases[a.asname] = a.name
                else:
                    self.aliases[a.name.split(".")[0]] = a.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            up = self.here.split(".")[:len(self.here.split(".")) - node.level + 1]
            base = ".".join(up + ([node.module] if node.module else []))
        if not self._ours(base):
            return
        for a in node.names:
            full = f"{base}.{a.name}"
            if full in self.mods:  # a submodule: private ones only inside their package
                self._edge(full)
                self.aliases[a.asname or a.name] = full
                if _is_private(a.name) and not self.me.startswith(base + "."):
                    self._private(full, node.lineno)
            else:
                owner = self._owner(base)
                self._edge(owner)
                if _is_private(a.name) and owner != self.me:
                    self._private(full, node.lineno)

    def _module_of(self, node: ast.expr) -> str | None:
        """The package module an expression like `ckpt` or `llmtrain.train.checkpoint` names."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._module_of(node.value)
            if base is not None and f"{base}.{node.attr}" in self.mods:
                return f"{base}.{node.attr}"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        module = self._module_of(node.value)
        if (module is not None and module != self.me and _is_private(node.attr)
                and f"{module}.{node.attr}" not in self.mods):
            self._private(f"{module}.{node.attr}", node.lineno)
        self.generic_visit(node)


def import_graph(root: Path = ROOT, package: str = "llmtrain"):
    """(module -> modules it imports, private-name uses across modules) of the package."""
    mods = module_files(root, package)
    graph, problems = {}, []
    for name, path in mods.items():
        v = _Imports(name, path.name == "__init__.py", mods, package)
        v.visit(ast.parse(path.read_text(), str(path)))
        graph[name], problems = v.edges, problems + v.problems
    return graph, problems


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(modules, one cycle through them: a closed path, first module repeated at the end) for
    every strongly connected set of more than one module."""
    found, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        reach, todo = {start}, [start]  # modules reachable from `start`
        while todo:
            for w in graph[todo.pop()]:
                if w not in reach:
                    reach.add(w)
                    todo.append(w)
        back = {start} | {m for m in reach if _path(graph, m, start, reach)}
        done |= back
        if len(back) > 1:
            found.append((sorted(back), _path(graph, start, start, back)))
    return found


def _path(graph: dict[str, set[str]], src: str, dst: str, within: set[str]) -> list[str] | None:
    """A shortest path src -> ... -> dst of at least one edge inside `within` (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [src]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & within):
                if w in prev:
                    continue
                prev[w] = v
                if w == dst:
                    path = [dst, v]
                    while path[-1] != src:
                        path.append(prev[path[-1]])
                    return path[::-1]
                nxt.append(w)
        frontier = nxt
    return None


def test_no_import_cycles():
    cycles = find_cycles(import_graph()[0])
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(
        f"{len(mods)} modules {mods}, e.g. " + " -> ".join(cycle) for mods, cycle in cycles)


def test_no_private_names_across_modules():
    problems = import_graph()[1]
    assert not problems, "private names used outside their module:\n" + "\n".join(problems)


def test_checker_finds_cycles_and_private_names(tmp_path):
    """The checks above fail when they should: a function-level cycle through a package
    __init__, a relative import, `from x import _name` and `alias._name`."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "",
             "a.py": "def f():\n    from pkg.sub.b import g\n",
             "sub/__init__.py": "from . import c\n",
             "sub/b.py": "def g(): pass\n",
             "sub/c.py": "from ..a import _h\nfrom pkg import a as alias\nalias._k\n",
             "d.py": "import pkg.sub.b\n",
             "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph, problems = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.sub"}
    assert graph["pkg.sub.b"] == set()
    assert graph["pkg.d"] == {"pkg.sub.b", "pkg.sub"}
    assert graph["pkg.e"] == set()
    assert find_cycles(graph) == [(["pkg.a", "pkg.sub", "pkg.sub.c"],
                                   ["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"])]
    assert problems == ["pkg.sub.c:1 uses pkg.a._h", "pkg.sub.c:3 uses pkg.a._k"]
