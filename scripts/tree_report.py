"""The package's shape in numbers, and its import graph: what issue #31 reports before and after a move.

    python scripts/tree_report.py                 # files, lines, the longest function and class, circles
    python scripts/tree_report.py --root OTHER    # another checkout's package (e.g. a git worktree of an old commit)

Every import counts, those inside functions too (a circle kept legal by an import inside a function is still a
circle). ``tests/test_imports.py`` runs the same walk and fails on a circle.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffunet"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name (``diffunet.model.unet``; a package by its ``__init__``) -> file."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (``from ..data import x`` in ``diffunet.train.loop``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body. ``from . import x`` names module ``x``;
    ``from .x import name`` names ``x`` (and ``x.name`` where that is a module)."""
    known = modules(root)
    top = root.name
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                named = [f"{base}.{alias.name}" for alias in node.names]
                # `from . import cells` imports module cells; `from . import image_path` the package itself
                targets = [t for t in named if t in known] + ([base] if any(t not in known for t in named) else [])
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target.split(".")[0] != top:
                    continue
                if target in known and target != name:
                    graph[name].add(target)
                # importing a.b.c runs package a.b's __init__ first, unless this module is inside a.b (then it
                # runs already); the top package's runs before anything of the package, so it is no edge of a circle
                parts = target.split(".")
                for depth in range(2, len(parts)):
                    ancestor = ".".join(parts[:depth])
                    if ancestor in known and not name.startswith(ancestor + "."):
                        graph[name].add(ancestor)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted. A package's ``__init__``
    counts as a module: one that imports its own modules, which import it back, is a circle too."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def longest(path: Path, kind) -> tuple[int, str]:
    """(lines, name) of the longest top-level-or-nested ``kind`` definition in ``path``."""
    best = (0, "-")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, kind):
            best = max(best, (node.end_lineno - node.lineno + 1, node.name))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=PACKAGE, help="the package folder (default: this checkout's)")
    args = parser.parse_args(argv)
    found = modules(args.root)
    rows, total = [], 0
    for name, path in found.items():
        lines = len(path.read_text().splitlines())
        total += lines
        rows.append((name, lines, longest(path, (ast.FunctionDef, ast.AsyncFunctionDef)), longest(path, ast.ClassDef)))
    folders = sorted({p.parent.relative_to(args.root.parent).as_posix() for p in found.values()})
    print(f"{len(found)} modules, {total} lines, in {len(folders)} folders: {', '.join(folders)}")
    print(f"{'module':<34} {'lines':>5}  {'longest function':<34} {'longest class':<30}")
    for name, lines, (flines, fname), (clines, cname) in rows:
        print(f"{name:<34} {lines:>5}  {fname + f' ({flines})':<34} {cname + f' ({clines})' if clines else '-':<30}")
    fn = max((r[2] + (r[0],) for r in rows))
    cl = max((r[3] + (r[0],) for r in rows))
    print(f"longest function: {fn[2]}.{fn[1]} ({fn[0]} lines); longest class: {cl[2]}.{cl[1]} ({cl[0]} lines)")
    circles = cycles(import_graph(args.root))
    print("import circles (every import, those inside functions too): "
          + ("; ".join("{" + ", ".join(c) + "}" for c in circles) if circles else "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
