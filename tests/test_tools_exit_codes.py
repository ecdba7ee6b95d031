"""One table of exit codes: seg/errors.py holds it, every tool returns its names (no other number), and the
README's table says the same. (What each tool returns for each failure: tests/test_tools_errors.py.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from seg import errors

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted((ROOT / "tools").glob("*.py"))


def _literal_exit_codes(path: Path) -> list[str]:
    """``return N``, ``sys.exit(N)`` and ``code = N`` with a non-zero integer literal, as ``file:line``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        value = None
        if isinstance(node, ast.Return):
            value = node.value
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit") and node.args:
            value = node.args[0]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
            value = node.value
        if isinstance(value, ast.BinOp):  # 128 + signal
            value = value.left
        if isinstance(value, ast.Constant) and type(value.value) is int and value.value != 0:
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_the_scan_finds_literal_codes(tmp_path: Path) -> None:
    path = tmp_path / "tool.py"
    path.write_text("import sys\ndef main():\n    code = 2\n    if code:\n        return 1\n    sys.exit(128 + 2)\n"
                    "def count():\n    return 0\n")
    assert _literal_exit_codes(path) == ["tool.py:3", "tool.py:5", "tool.py:6"]


def test_tools_return_the_named_codes() -> None:
    assert len(TOOLS) >= 9
    literal = [hit for path in TOOLS for hit in _literal_exit_codes(path)]
    assert not literal, f"exit codes as numbers (use seg.errors.EXIT_*): {literal}"


def test_the_readme_table_is_the_one_in_seg_errors() -> None:
    text = (ROOT / "README.md").read_text()
    table = text.split("### Exit codes", 1)[1].split("\n\n", 2)[2]
    codes = re.findall(r"^\| ([0-9+ N]+) \|", table, re.M)
    assert codes == [str(errors.EXIT_OK), str(errors.EXIT_FAILED), str(errors.EXIT_USER_ERROR),
                     f"{errors.EXIT_SIGNAL_BASE} + N"]
