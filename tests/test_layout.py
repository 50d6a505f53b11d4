"""The package follows the data flow: each part imports only from the parts before it (README, Layout)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bayesprune"
LAYERS = ["core", "inputs", "cut", "evaluation", "baselines", "routing", "speculative", "prune", "run",
          "__main__", "__init__"]


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path: Path) -> set[str]:
    """The parts of the package that ``path`` imports, relative or absolute, at any depth in the file."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1]
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [a.name for a in node.names] if not node.module else []
            else:
                target, names = (node.module or "").split("."), []
            if target[0] != "bayesprune":
                continue
            if len(target) > 1:
                parts.add(target[1])
            parts.update(n for n in names if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").is_file())
        elif isinstance(node, ast.Import):
            parts.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bayesprune."))
    return parts


def test_every_part_imports_only_from_the_parts_before_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        assert part in LAYERS, f"{path.relative_to(PACKAGE)} is in no part of the layout: add it to LAYERS and README"
        later = {p for p in imported_parts(path) - {part} if LAYERS.index(p) > LAYERS.index(part)}
        wrong += [f"{path.relative_to(PACKAGE)} imports {p}" for p in sorted(later)]
    assert not wrong, wrong


def test_the_check_sees_imports():
    assert imported_parts(PACKAGE / "run" / "fit_job.py") >= {"core", "inputs", "cut", "evaluation", "prune"}
    assert imported_parts(PACKAGE / "core" / "fit.py") == {"core"}
