"""The package reads in one sitting: functions of at most ~40 lines, files of at most ~300, no import cycles.

Counted without docstrings (a long explanation is welcome) and without blank lines; the bounds are the project's
style (STYLE.md), checked so that they hold as the code grows.
"""

import ast
from pathlib import Path

import qwen2audio

PACKAGE = Path(qwen2audio.__file__).parent
MAX_FUNCTION_LINES = 40
MAX_FILE_LINES = 300


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def code_lines(node: ast.AST, source: list[str]) -> int:
    """Non-blank lines of a function, its docstring left out."""
    first = node.body[0]
    skip = set()
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and \
            isinstance(first.value.value, str):
        skip = set(range(first.lineno, first.end_lineno + 1))
    return sum(1 for n in range(node.lineno, node.end_lineno + 1) if n not in skip and source[n - 1].strip())


def test_functions_fit_on_a_screen():
    long = []
    for path in sources():
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node, text.splitlines())
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over ~40 lines: " + ", ".join(long)


def test_files_hold_one_thing():
    big = [f"{p.relative_to(PACKAGE.parent)} ({n} lines)" for p in sources()
           if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not big, "files over ~300 lines: " + ", ".join(big)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The package modules a file imports, anywhere in it (inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p) if node.level else node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x` may name a module
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("qwen2audio")}


def test_no_import_cycles():
    """Data flows one way (cli/serve/eval/finetune -> pipeline -> model -> kernels): no module imports, directly or
    through others, a module that imports it. The package's __init__ (the public API) is left out."""
    modules = {module_name(p): p for p in sources() if p.name != "__init__.py" or p.parent != PACKAGE}
    graph = {m: {i for i in imports(p) if i in modules and i != m} for m, p in modules.items()}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in graph:
        if start not in done:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(sorted(set(cycles)))
