"""The module graph of the two packages, read from the source (top-level and function-level imports alike):
acyclic, `crosscoders` never imports `evolution`, and every import flows with the data (a stage imports only
stages before it: docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crosscoders", "evolution")

# the data flow, upstream first; a module may import its own layer or any layer before it
LAYERS = [
    ("crosscoders",),
    ("evolution.figures", "evolution.sources"),
    ("evolution.context",),
    ("evolution.sources.stages",),
    ("evolution.harvest",),
    ("evolution.crosscoder",),
    ("evolution.features", "evolution.geometry", "evolution.evaluate", "evolution.numbers", "evolution.interventions"),
    ("evolution.phases",),
    ("evolution.report",),
    ("evolution.recipe", "evolution.memory"),
    ("evolution.pipeline",),
    ("evolution.plan", "evolution.api", "evolution.cli", "evolution"),
]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the two packages that `name` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer(name: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    assert best is not None, f"{name} is in no layer of the data flow: add it to LAYERS and docs/architecture.md"
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_the_library_never_imports_the_study():
    bad = [(m, t) for m, ts in graph().items() if m.startswith("crosscoders") for t in ts if t.startswith("evolution")]
    assert bad == []


def test_imports_flow_with_the_data():
    g = graph()
    back = sorted((m, t) for m, ts in g.items() for t in ts
                  if layer(t) > layer(m) and not (m == "evolution" or m.startswith(t + ".")))
    assert back == [], "imports against the data flow:\n" + "\n".join(f"  {m} -> {t}" for m, t in back)


def test_no_import_cycle():
    g = graph()
    # a package's __init__ only hands on its modules' names; its edges to them are not a cycle through it
    g = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_graph_sees_function_level_imports():
    """The check reads imports inside functions too (a lazy import that closes a cycle is still one)."""
    g = graph()
    assert "evolution.features.hierarchy" in g["evolution.features.analyze"]  # imported inside analyze()
    assert "crosscoders.store" in g["crosscoders.train"]  # imported inside main()


def test_modules_stay_under_400_lines():
    assert not [(m, n) for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400]
