"""The import graph of the packages: one direction (experiments -> gx -> sweeps -> gemini_core),
no cycles, no `_private` name imported from another module. Read with ast, so a lazy import
inside a function counts as much as one at the top."""

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a package may import itself and the packages after it in this order, never one before it
ORDER = ("gx", "sweeps", "gemini_core")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ORDER:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _resolve(name: str, mods) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, mods) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import statement in `path`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [a.name for a in node.names]
            found.append((base, names, node.lineno))
            found += [(f"{base}.{n}", [], node.lineno) for n in names if f"{base}.{n}" in mods]
    return found


def _upward(module: str, imported: str) -> bool:
    return ORDER.index(imported.split(".")[0]) < ORDER.index(module.split(".")[0])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_attributes(path: Path, mods) -> list[str]:
    """`lib._name` where `lib` is one of our modules imported by this file."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in mods}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and a.name in mods}
    return [f"{path.relative_to(REPO)}:{n.lineno}: {n.value.id}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in aliases and _private(n.attr)]


def _graph():
    mods = _modules()
    edges, private, against = defaultdict(set), [], []
    for module, path in mods.items():
        for target, names, line in _imports(module, path, mods):
            resolved = _resolve(target, mods)
            if resolved is None or resolved == module or module.startswith(resolved + "."):
                continue
            where = f"{path.relative_to(REPO)}:{line}: import {target}"
            edges[module].add(resolved)
            if _upward(module, resolved):
                against.append(where)
            private += [f"{where} ({n})" for n in names if _private(n)]
        private += _private_attributes(path, mods)
    return mods, edges, private, against


def _cycles(mods, edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter[0]; counter[0] += 1
                stack.append(child); on.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on:
                low[node] = min(low[node], index[child])

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return out


def test_imports_follow_the_layer_order():
    _, _, _, against = _graph()
    assert not against, "imports against experiments -> gx -> sweeps -> gemini_core:\n" + \
        "\n".join(against)


def test_no_import_cycles():
    mods, edges, _, _ = _graph()
    cycles = _cycles(mods, edges)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules():
    _, _, private, _ = _graph()
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def test_no_entry_point_plugins_inside_the_library():
    """gemini_core and sweeps load nothing through entry points: a lower layer reaching up
    through a plugin is still reaching up."""
    users = [str(p.relative_to(REPO)) for pkg in ("gemini_core", "sweeps")
             for p in (REPO / pkg).rglob("*.py") if "entry_points(" in p.read_text()]
    assert not users, users


def test_the_checker_sees_a_planted_cycle_and_an_upward_import():
    mods = {"gemini_core.a": None, "gemini_core.b": None, "sweeps.c": None}
    edges = defaultdict(set, {"gemini_core.a": {"gemini_core.b"}, "gemini_core.b": {"gemini_core.a"}})
    assert _cycles(mods, edges) == [["gemini_core.a", "gemini_core.b"]]
    assert _upward("gemini_core.a", "sweeps.c") and _upward("sweeps.c", "gx.cli")
    assert not _upward("gx.cli", "sweeps.c") and not _upward("sweeps.c", "gemini_core.a")
