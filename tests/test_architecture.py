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


def distributed_imports(root: Path) -> list[str]:
    """`file:line module` for every import of torch.distributed (or anything under it) in the
    Python files under `root`, inside functions too."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} {n}" for n in names
                      if n == "torch.distributed" or n.startswith("torch.distributed.")]
    return found


def test_model_holds_no_distributed_code(tmp_path):
    """model/ is plain PyTorch: parallelism is applied to it from parallel/. The check itself
    finds a top-level and a function-level import."""
    problems = distributed_imports(ROOT / "model")
    assert not problems, "model/ imports torch.distributed:\n" + "\n".join(problems)
    (tmp_path / "m.py").write_text("import torch.distributed as dist\n"
                                   "def f():\n    from torch.distributed.tensor import DTensor\n")
    assert distributed_imports(tmp_path) == ["m.py:1 torch.distributed",
                                             "m.py:3 torch.distributed.tensor"]


# ----------------------------------------------------------------------------------------------
# The test files: what they share lives in tests/helpers.py (functions) and tests/conftest.py
# (fixtures); a test file imports neither another test file nor its own copy of the plumbing.

TESTS = Path(__file__).parent
SHARED = {"helpers", "conftest"}  # the modules a test file may import from tests/
RUN_FILES = {"metrics.jsonl", "eval.jsonl"}  # read through helpers.read_metrics / read_evals
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _own_nodes(fn: ast.AST):
    """The nodes of function `fn`, leaving out the bodies of the functions defined in it."""
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, FUNCTIONS):
            todo.extend(ast.iter_child_nodes(node))


def _binds_port_0(node: ast.AST) -> bool:
    """`sock.bind((host, 0))`: asking the OS for a free port."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "bind" and len(node.args) == 1
            and isinstance(node.args[0], ast.Tuple) and len(node.args[0].elts) == 2
            and isinstance(node.args[0].elts[1], ast.Constant) and node.args[0].elts[1].value == 0)


def _calls(node: ast.AST, *attrs: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in attrs)


def _reads_lines(nodes: list[ast.AST]) -> str | None:
    """What the code `nodes` (one function's) reads as records: "JSON lines" where it calls
    json.loads on each line of a file, "metrics.jsonl" (or "eval.jsonl") where it splits that
    file into lines (directly or through a name bound to its path); else None."""
    line_vars, run_vars = set(), {}
    for n in nodes:
        if isinstance(n, (ast.comprehension, ast.For)) and isinstance(n.target, ast.Name) and any(
                _calls(c, "splitlines", "readlines", "open")
                or isinstance(c, ast.Call) and getattr(c.func, "id", None) == "open"
                for c in ast.walk(n.iter)):
            line_vars.add(n.target.id)
        if isinstance(n, ast.Assign):
            for c in ast.walk(n.value):
                if isinstance(c, ast.Constant) and c.value in RUN_FILES:
                    run_vars.update((t.id, c.value) for t in n.targets if isinstance(t, ast.Name))
    if any(_calls(n, "loads") and n.args and getattr(n.args[0], "id", None) in line_vars
           for n in nodes):
        return "JSON lines"
    for n in nodes:
        if _calls(n, "splitlines", "readlines"):
            for c in ast.walk(n):
                if isinstance(c, ast.Constant) and c.value in RUN_FILES:
                    return c.value
                if isinstance(c, ast.Name) and c.id in run_vars:
                    return run_vars[c.id]
    return None


def plumbing_problems(tests: Path = TESTS) -> tuple[list[str], list[str]]:
    """(imports of one test file by another, copies of the shared plumbing: a free-port finder
    or a metrics.jsonl / eval.jsonl reader defined outside helpers.py) of the *.py in `tests`."""
    modules = {p.stem for p in tests.glob("*.py")}
    imports, copies = [], []
    for path in sorted(tests.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if name.startswith(".") or root == "tests" or (root in modules
                                                                and root not in SHARED):
                    imports.append(f"{path.name}:{node.lineno} imports {name}")
        if path.stem == "helpers":
            continue
        for fn in sorted((n for n in ast.walk(tree) if isinstance(n, FUNCTIONS)),
                         key=lambda n: n.lineno):
            name = getattr(fn, "name", "<lambda>")
            nodes = list(_own_nodes(fn))
            if name.endswith("free_port") or any(map(_binds_port_0, nodes)):
                copies.append(f"{path.name}:{fn.lineno} {name} finds a free port")
            what = _reads_lines(nodes)
            if what:
                copies.append(f"{path.name}:{fn.lineno} {name} reads {what}")
    return imports, copies


def test_no_test_file_imports_another():
    imports = plumbing_problems()[0]
    assert not imports, ("test files import other test files (share code through helpers.py "
                         "or conftest.py):\n" + "\n".join(imports))


def test_free_port_and_run_file_readers_only_in_helpers():
    copies = plumbing_problems()[1]
    assert not copies, "plumbing defined outside tests/helpers.py:\n" + "\n".join(copies)


def test_plumbing_checker_finds_test_imports_ports_and_readers(tmp_path):
    """The checks above fail when they should: imports of a test module (inside a function too,
    relative, or through `tests.`), a free-port finder under another name, JSON Lines and
    metrics readers (nested, a lambda, through a name); helpers.py may hold them, and writing
    metrics.jsonl, testing that it exists or naming it in a message is not reading it."""
    files = {
        "helpers.py": "def free_port():\n    pass\n"
                      "def read_metrics(run):\n    return (run / 'metrics.jsonl').read_text()"
                      ".splitlines()\n",
        "conftest.py": "from helpers import free_port\n",
        "test_a.py": "import json\nfrom conftest import free_port\nimport helpers\n"
                     "def test_x(r):\n    from test_b import f\n"
                     "    def losses(r):\n"
                     "        return [json.loads(x) for x in (r / 'metrics.jsonl').open()]\n"
                     "    assert 'drop' in (r / 'metrics.jsonl').read_text()\n"
                     "def write(r):\n    (r / 'metrics.jsonl').write_text(json.dumps({}))\n"
                     "def test_y(r, err):\n    assert (r / 'metrics.jsonl').exists()\n"
                     "    assert f'cannot write {r / \"metrics.jsonl\"}' in err.splitlines()\n",
        "test_b.py": "import tests.test_a\nfrom . import helpers\nimport json, socket\n"
                     "def port():\n    with socket.socket() as s:\n"
                     "        s.bind(('127.0.0.1', 0))\n"
                     "evals = lambda r: (r / 'eval.jsonl').read_text().splitlines()\n"
                     "def steps(run):\n    path = run / 'metrics.jsonl'\n"
                     "    return len(path.read_text().splitlines())\n"
                     "def jsonl(path):\n"
                     "    return [json.loads(line) for line in path.read_text().splitlines()]\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    imports, copies = plumbing_problems(tmp_path)
    assert imports == ["test_a.py:5 imports test_b", "test_b.py:1 imports tests.test_a",
                       "test_b.py:2 imports ."]
    assert copies == ["test_a.py:6 losses reads JSON lines", "test_b.py:4 port finds a free port",
                      "test_b.py:7 <lambda> reads eval.jsonl",
                      "test_b.py:8 steps reads metrics.jsonl", "test_b.py:11 jsonl reads JSON lines"]
