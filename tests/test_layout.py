"""House layout rules that code review would otherwise have to catch: no import cycle among llmq modules
(imports inside functions included), no module over 300 lines, no script over 400."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "llmq"


def _imports(path: Path) -> set[str]:
    """llmq modules imported anywhere in `path` (top level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("llmq."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("llmq."))
    modules = {p.stem for p in PKG.glob("*.py")}
    return {m for m in out if m in modules and m != path.stem} - {"__init__"}


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_plan_imports_neither_driver():
    assert not _imports(PKG / "plan.py") & {"run", "sequential"}


def test_module_and_script_sizes():
    long = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    long |= {p.name: n for p in (ROOT / "scripts").glob("*") if p.is_file()
             and (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
