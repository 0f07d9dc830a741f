"""The layers of docs/architecture.md, checked against the code's imports.

docs/architecture.md section 0 holds the one table of layers: each row names a layer (a number and a
word), the rooms it holds (package folders ending in ``/`` or single files) and the concepts it owns. The
import graph is derived here from the source with ``ast`` (every ``import`` and ``from ... import``,
including the lazy ones inside functions), and must:

* cover every module: each file of ``kandinsky/`` and ``weights_convert/`` sits in exactly one room;
* run one way: a module imports only from its own layer or the layers below;
* have no cycle: no two modules import each other, directly or through others (a package's
  ``__init__`` is a module like any other).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kandinsky", "weights_convert")
ROW = re.compile(r"^\|\s*(\d+)\s+([a-z ,]+?)\s*\|(.*?)\|(.*)\|\s*$")


def layer_table() -> list[tuple[int, str, list[str], str]]:
    """(number, name, rooms, owns) of each row of the table in docs/architecture.md section 0."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## 0. Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            rooms = re.findall(r"`([^`]+)`", m.group(3))
            rows.append((int(m.group(1)), m.group(2), rooms, m.group(4).strip()))
    return rows


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports (a name imported from a package that is itself a
    module counts as an import of that module, not of the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import kandinsky.sampling.x.y` -> the module it names
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


@pytest.fixture(scope="module")
def layer_of() -> dict[str, int]:
    rooms = {}
    for number, _, names, _ in layer_table():
        for room in names:
            rooms[room] = number
    out = {}
    for name, path in modules().items():
        rel = path.relative_to(ROOT).as_posix()
        owners = [room for room in rooms if rel == room or (room.endswith("/") and rel.startswith(room))]
        if owners:
            out[name] = rooms[max(owners, key=len)]  # the most specific room
    return out


def test_the_table_is_there_and_numbered_bottom_up():
    rows = layer_table()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), rows
    assert len(rows) >= 6
    for number, name, rooms, owns in rows:
        assert rooms, f"layer {number} {name} names no rooms"
        assert owns, f"layer {number} {name} says nothing it owns"
        for room in rooms:
            assert (ROOT / room).exists(), f"docs/architecture.md names {room}, which does not exist"


def test_every_module_sits_in_a_layer(layer_of):
    missing = sorted(set(modules()) - set(layer_of))
    assert not missing, f"modules in no room of docs/architecture.md's layer table: {missing}"


def test_imports_run_down_the_layers(graph, layer_of):
    upward = [f"{a} (layer {layer_of[a]}) imports {b} (layer {layer_of[b]})"
              for a, targets in graph.items() for b in targets
              if a in layer_of and b in layer_of and layer_of[b] > layer_of[a]]
    assert not upward, "imports that run up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other (directly or in a loop): {cycles}"


def test_the_graph_is_read_right(tmp_path):
    """The reader itself: a relative import, a lazy import and a submodule imported from its package."""
    known = {"kandinsky", "kandinsky.a", "kandinsky.b", "kandinsky.pkg", "kandinsky.pkg.c"}
    probe = tmp_path / "x.py"
    probe.write_text("from . import a\ndef f():\n    from kandinsky.pkg import c\n    import kandinsky.b as b\n")
    # `from . import a` in kandinsky/x.py -> the package kandinsky -> its submodule kandinsky.a
    assert imports_of("kandinsky.x", probe, known) == {"kandinsky.a", "kandinsky.pkg.c", "kandinsky.b"}


def test_library_code_does_not_import_the_reference():
    """The design card: no diffusers and no transformers model class in kandinsky/ or weights_convert/."""
    bad = re.compile(r"^\s*(from|import)\s+diffusers|^\s*from\s+transformers[\w.]*\s+import\s+.*"
                     r"(Model|Config|Processor|FeatureExtractor)|^\s*import\s+transformers\.models", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in modules().values() if bad.search(p.read_text())]
    assert not offenders, offenders
