"""Import floors: the longest chain of module-level imports inside attune_sse.

    python3 scripts/import_floors.py [ROOT]     # ROOT: a checkout (default: this one)

Imports inside functions and under ``if TYPE_CHECKING:`` do not count.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
MODULES: dict[str, Path] = {}
for path in (ROOT / "attune_sse").rglob("*.py"):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    MODULES[name] = path


def imports_of(name: str) -> set[str]:
    """The package's modules that ``name`` imports at module level."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


@functools.cache
def floors(name: str, below: tuple[str, ...] = ()) -> int:
    if name in below:
        return 0
    return 1 + max((floors(d, (*below, name)) for d in imports_of(name)), default=0)


deepest = max(MODULES, key=floors)
lines = sum(len(path.read_text().splitlines()) for path in MODULES.values())
print(f"{ROOT}: {len(MODULES)} modules, {lines} lines, {floors(deepest)} import floors (deepest: {deepest})")
