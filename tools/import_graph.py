"""The import graph of the tipstorch package, and every import that goes up or across its layers.

    python tools/import_graph.py                 # package edges, module edges, then the violations
    python tools/import_graph.py --packages      # package edges and violations only
    python tools/import_graph.py --root OTHER/src/tipstorch   # another checkout (e.g. an old commit)

Every ``import`` / ``from ... import`` anywhere in a module counts, also inside functions (a lazy
import is still a dependency). Layers, lowest first; a package may import its own modules and those
of lower layers, never a package of its own or of a higher layer:

    0  models
    1  weights, data, viz
    2  train, eval, engine
    3  cli, tipstorch (the package root: the public API)

Exits with status 1 when an import breaks the layers (or a package is in no layer), else 0.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "tipstorch"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE
LAYERS: dict[str, int] = {
    "models": 0,
    "weights": 1, "data": 1, "viz": 1,
    "train": 2, "eval": 2, "engine": 2,
    "cli": 3, PACKAGE: 3,
}  # fmt: skip


@dataclass(frozen=True)
class Edge:
    """``importer`` (a module) imports ``imported`` (a module or package), at ``line`` of its file."""

    importer: str
    imported: str
    line: int


def module_name(path: Path, root: Path) -> str:
    """``<root>/eval/quick.py`` -> ``tipstorch.eval.quick``; ``<root>/cli/__init__.py`` -> ``tipstorch.cli``."""
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against the importer's package
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    # ``from tipstorch.weights import cache`` imports the module tipstorch.weights.cache
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def import_edges(root: Path = ROOT) -> list[Edge]:
    """Every import of a tipstorch module by a tipstorch module under ``root``."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(path, root) for path in files}
    edges = []
    for path in files:
        importer = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = _imported_names(node, importer, path.name == "__init__.py")
            # the most specific known module each statement names (a package, or a module in it)
            targets = {name for name in names if name in known}
            targets -= {t for t in targets if any(other.startswith(t + ".") for other in targets)}
            edges.extend(Edge(importer, target, node.lineno) for target in sorted(targets) if target != importer)
    return edges


def package_of(module: str) -> str:
    """``tipstorch.eval.quick`` -> ``eval``; ``tipstorch.viz`` -> ``viz``; ``tipstorch`` -> ``tipstorch``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def violations(edges: list[Edge]) -> list[str]:
    """One line per import that goes up or across the layers, or touches a package in no layer."""
    found = []
    for edge in edges:
        source, target = package_of(edge.importer), package_of(edge.imported)
        if source == target:
            continue
        if source not in LAYERS or target not in LAYERS:
            unlayered = sorted({p for p in (source, target) if p not in LAYERS})
            found.append(f"{edge.importer}:{edge.line} imports {edge.imported}: {', '.join(unlayered)} in no layer")
        elif LAYERS[target] >= LAYERS[source]:
            kind = "upward" if LAYERS[target] > LAYERS[source] else "across a layer"
            found.append(f"{edge.importer}:{edge.line} imports {edge.imported}: {kind} "
                         f"({source} is layer {LAYERS[source]}, {target} layer {LAYERS[target]})")
    return found


def package_edges(edges: list[Edge]) -> Counter:
    """(importing package, imported package) -> number of import statements."""
    return Counter((package_of(e.importer), package_of(e.imported)) for e in edges
                   if package_of(e.importer) != package_of(e.imported))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help=f"the {PACKAGE} package folder (default: {ROOT})")
    parser.add_argument("--packages", action="store_true", help="only package edges and violations")
    args = parser.parse_args(argv)
    edges = import_edges(args.root)
    print("package edges (importer -> imported: import statements):")
    for (source, target), count in sorted(package_edges(edges).items()):
        print(f"  {source:<10} -> {target:<10} {count}")
    if not args.packages:
        print("\nmodule edges:")
        for importer, imported in sorted({(e.importer, e.imported) for e in edges}):
            print(f"  {importer} -> {imported}")
    found = violations(edges)
    print(f"\n{len(found)} import(s) against the layers" + (":" if found else ""))
    for line in found:
        print(f"  {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
