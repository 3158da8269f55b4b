"""The package layout keeps its one-way imports (docs/architecture.md) and its modules small."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Rank of each part of the study: a module may import only parts of lower or equal rank.
RANK = {"crosscoders": 0, "evolution.figures": 1, "evolution.sources": 1, "evolution.features": 2,
        "evolution.geometry": 2, "evolution.numbers": 2.5, "evolution.phases": 3, "evolution.interventions": 3,
        "evolution.report": 4, "evolution": 5}


def _part(module: str) -> str:
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return ""


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _modules():
    for pkg in ("crosscoders", "evolution"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path


def test_no_module_imports_a_later_stage():
    bad = []
    for mod, path in _modules():
        own = RANK[_part(mod)]
        for imp in _imports(path):
            part = _part(imp)
            if part and RANK[part] > own:
                bad.append(f"{mod} imports {imp}")
    assert not bad, bad


def test_crosscoders_never_imports_evolution():
    assert not [m for m, p in _modules() if m.startswith("crosscoders") and any(
        i.startswith("evolution") for i in _imports(p))]


def test_modules_stay_under_400_lines():
    assert not [(m, n) for m, p in _modules() if (n := len(p.read_text().splitlines())) > 400]
