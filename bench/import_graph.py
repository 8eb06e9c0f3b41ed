"""The shape of the package, measured the same way before and after a regroup.

    python -m bench.import_graph            # the summary
    python -m bench.import_graph --list     # every module with the processes that run it

Reads every module under textstream/ with `ast` (nothing is imported) and reports:

- import circles: strongly connected groups of modules (imports inside functions
  count too: they are arrows all the same);
- which process runs each module: reachable from the API's entry point
  (textstream.api.app), the worker's (textstream.worker.main), or both;
- misplaced modules: a module in a process's folder (api/, worker/) that the other
  process also runs, and a module on the shared floor (anything else) that only
  one process runs;
- arrows running back up: an import from the shared floor into api/ or worker/.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "textstream"
ENTRIES = {"api": "textstream.api.app", "worker": "textstream.worker.main"}
# Entry points outside both processes (the CLI, `textstream serve`) are not counted
# as a process: they start the two.
LAUNCHERS = ("textstream.cli", "textstream.serve", "textstream.__main__", "textstream.devredis")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def names_used(known: set[str]) -> dict[str, dict[str, set[str]]]:
    """module -> importer -> the names it takes from the module (`from m import a`)."""
    used: dict[str, dict[str, set[str]]] = {}
    for path in ROOT.rglob("*.py"):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in known and not node.level:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" not in known:
                        used.setdefault(node.module, {}).setdefault(importer, set()).add(alias.name)
    return used


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(paths)
    edges = {name: imports_of(path, name, known) for name, path in paths.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    for name in list(edges):
        parent = name.rpartition(".")[0]
        while parent:
            if parent in known:
                edges[name].add(parent)
            parent = parent.rpartition(".")[0]
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1 (package __init__ arrows
    left out: a package importing its own modules is not a circle worth counting)."""
    plain = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in plain.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(plain):
        if v not in index:
            visit(v)
    return found


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        todo.extend(edges.get(v, ()))
    return seen


def floor(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in ("api", "worker", "engines"):
        return parts[1]
    return "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    edges = graph()
    runs = {process: reach(edges, entry) for process, entry in ENTRIES.items()}
    misplaced, back_up = [], []
    for name in sorted(edges):
        by = sorted(p for p, seen in runs.items() if name in seen)
        where = floor(name)
        if name.endswith("__init__") or name == "textstream" or name.startswith(LAUNCHERS):
            continue
        if where in ("api", "worker") and by != [where] and by:
            misplaced.append(f"{name} ({where}/, run by {'+'.join(by)})")
        if where == "shared" and len(by) == 1:
            misplaced.append(f"{name} (shared, run by {by[0]} only)")
        if where == "shared":
            back_up += [
                f"{name} -> {t}" for t in sorted(edges[name]) if floor(t) in ("api", "worker")
            ]
        if args.list:
            print(f"{name:55} {where:8} {'+'.join(by) or '-'}")
    # A shared module both processes run, but whose names each process takes are
    # disjoint: two processes' code in one file.
    known = set(edges)
    for name, importers in sorted(names_used(known).items()):
        if floor(name) != "shared" or name.startswith(LAUNCHERS):
            continue
        sides: dict[str, set[str]] = {}
        for importer, taken in importers.items():
            side = floor(importer)
            if side == "shared" or side == "engines":
                by = [p for p, seen in runs.items() if importer in seen]
                side = by[0] if len(by) == 1 else "both"
            sides.setdefault(side, set()).update(taken)
        api, worker = sides.get("api", set()), sides.get("worker", set())
        if api and worker and not sides.get("both") and not api & worker:
            misplaced.append(
                f"{name} (shared, but the API takes {sorted(api)} and the worker {sorted(worker)})"
            )
    loops = circles(edges)
    lines = sum(len(p.read_text().splitlines()) for p in ROOT.rglob("*.py"))
    print(f"modules: {len(edges)}, lines: {lines}, import arrows: {sum(map(len, edges.values()))}")
    print(f"import circles: {len(loops)}")
    for loop in loops:
        print("  " + " <-> ".join(loop))
    print(f"arrows running back up (shared -> api/worker): {len(back_up)}")
    for arrow in back_up:
        print("  " + arrow)
    print(f"modules on the wrong floor: {len(misplaced)}")
    for entry in misplaced:
        print("  " + entry)


if __name__ == "__main__":
    main()
