"""What every notebook's cell source uses: the cell constructors and shared snippets."""

from __future__ import annotations

import textwrap

Cell = tuple[str, str]


def md(text: str) -> Cell:
    return ("markdown", textwrap.dedent(text).strip())


def code(*parts: str) -> Cell:
    """A code cell from one or more snippets, each dedented on its own."""
    return ("code", "\n\n".join(textwrap.dedent(p).strip() for p in parts))


# Defaults resolve against the repository root whether Jupyter runs in notebooks/ or in the root.
_REPO = 'REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()'

_SHOW_CONTEXTS = '''
def show_contexts(by_step: dict, n: int = 3) -> None:
    """Print a feature's top contexts per snapshot, the firing token in [[ ]]."""
    for step, ctxs in by_step.items():
        print(f"step {step}:")
        for c in ctxs[:n]:
            toks = [f"[[{t}]]" if j == c["highlight"] else t for j, t in enumerate(c["tokens"])]
            sep = "" if any(t.startswith(" ") for t in c["tokens"]) else " "  # BPE tokens carry their spaces
            print(f"  {c['activation']:7.3f}  " + sep.join(toks).replace("\\n", "⏎"))
'''
