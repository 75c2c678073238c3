"""The house rules of diffalign's imports, read from the source with `ast` (imports inside functions count).

Floors, top to bottom: toy/ (uses everything; nothing general imports it) > synpic/, evaluation/,
training/ > backbones/ > data/, rewards/, objectives/, config. Checked here: (a) only the toy imports the
toy (a lower layer names toy code by a "package.module:attr" string resolved on use, diffalign.lazy);
(b) no two diffalign modules import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = "diffalign.toy"

#: modules outside diffalign/toy/ that may still import the toy, each with the reason. Delete an entry
#: when its module stops importing the toy (the test then asks for it).
TOY_IMPORT_ALLOWED: dict[str, str] = {}

#: import edges allowed to close a cycle, each with the reason. Delete an entry when the edge goes.
CYCLE_EDGES_ALLOWED: dict[tuple[str, str], str] = {}


def module_files(root: Path, package: str = "diffalign") -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/package (a package is its __init__.py)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that module `name` imports anywhere in its file. `from pkg import x`
    counts as importing pkg.x when that is a module, else pkg; `import a.b` as importing a.b."""

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {m for m in map(known, targets) if m is not None and m != name}
    return found


def import_graph(root: Path, package: str = "diffalign") -> tuple[dict[str, set[str]], dict[str, Path]]:
    modules = module_files(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}, modules


def toy_imports(graph: dict[str, set[str]], modules: dict[str, Path], root: Path) -> dict[str, set[str]]:
    """Modules outside the toy package that import it: relative path -> the toy modules imported."""
    is_toy = lambda m: m == TOY or m.startswith(TOY + ".")  # noqa: E731
    return {
        modules[m].relative_to(root).as_posix(): {t for t in targets if is_toy(t)}
        for m, targets in graph.items()
        if not is_toy(m) and any(is_toy(t) for t in targets)
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import loop (a, b, ..., a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_loop_through(min(comp), graph, comp) for comp in components]


def _loop_through(start: str, graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest import path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in no loop")  # pragma: no cover


def without(graph: dict[str, set[str]], edges) -> dict[str, set[str]]:
    return {m: {t for t in targets if (m, t) not in edges} for m, targets in graph.items()}


# ------------------------------------------------------------------------------------------------ tests


def test_nothing_outside_the_toy_imports_the_toy():
    graph, modules = import_graph(ROOT)
    found = toy_imports(graph, modules, ROOT)
    forbidden = {path: sorted(t) for path, t in found.items() if path not in TOY_IMPORT_ALLOWED}
    assert not forbidden, (
        f"these modules import the toy world, which sits above them: {forbidden}. Name toy code by a "
        "'package.module:attr' string in a registry resolved on use (diffalign.lazy), or move the code into "
        "diffalign/toy/."
    )
    stale = sorted(set(TOY_IMPORT_ALLOWED) - set(found))
    assert not stale, f"{stale} no longer import the toy: delete them from TOY_IMPORT_ALLOWED"


def test_no_import_cycles():
    graph, _ = import_graph(ROOT)
    loops = cycles(without(graph, CYCLE_EDGES_ALLOWED))
    assert not loops, "import cycles (split a module or pass the dependency in): " + "; ".join(
        " -> ".join(loop) for loop in loops
    )
    stale = sorted(edge for edge in CYCLE_EDGES_ALLOWED if edge[1] not in graph.get(edge[0], ()))
    assert not stale, f"{stale} are no longer imports: delete them from CYCLE_EDGES_ALLOWED"


def test_the_checks_catch_a_toy_import_and_a_cycle(tmp_path):
    """The two checks above, on a made-up package: they find a function-level toy import and a loop."""
    pkg = tmp_path / "diffalign"
    for rel, text in {
        "__init__.py": "",
        "toy/__init__.py": "",
        "toy/world.py": "import diffalign.data\n",  # the toy may import anything below it
        "data/__init__.py": "",
        "data/a.py": "def f():\n    from diffalign.data import b\n",
        "data/b.py": "from diffalign.data.c import x\n",
        "data/c.py": "def g():\n    from diffalign.toy import world\n    import diffalign.data.a\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph, modules = import_graph(tmp_path)
    assert toy_imports(graph, modules, tmp_path) == {"diffalign/data/c.py": {"diffalign.toy.world"}}
    assert cycles(graph) == [["diffalign.data.a", "diffalign.data.b", "diffalign.data.c", "diffalign.data.a"]]
    assert cycles(without(graph, {("diffalign.data.c", "diffalign.data.a")})) == []


def test_lower_layers_list_toy_entries_without_importing_the_toy():
    code = (
        "import sys\n"
        "from diffalign.rewards import available_scorers\n"
        "from diffalign.synpic.config import load_config\n"
        "import diffalign.synpic.run, diffalign.evaluation.cli\n"
        "assert {'toy', 'toy_correct'} <= set(available_scorers())\n"
        "load_config(raw={'generators': [{'type': 'toy_render'}, {'type': 'toy_sampler'}], 'scorers': ['toy']})\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('diffalign.toy'))\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
