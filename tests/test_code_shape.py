"""Shape rules for the package's code: short functions, no reaching into private names.

`python -m tests.test_code_shape` prints the longest functions in rlhf/.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf"
MAX_FUNCTION_LINES = 80
# Built on TRL's Trainer and edited on another branch while this rule came in: its `run`
# (135 lines) is left for that branch to split, so that the two changes merge cleanly.
NOT_YET = {"rlhf/stages/dpo.py"}


def function_lengths(root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(lines from `def` to the last line of the body, "path:line name") for every function."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                out.append((node.end_lineno - first + 1, where))
    return sorted(out, reverse=True)


def private_imports(root: Path = PACKAGE) -> list[str]:
    """`from rlhf.x import _name` anywhere in the package: another module's private name."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                found += [f"{path.name}: {name}" for name in private if not name.endswith("__")]
    return found


def test_no_function_in_the_package_is_longer_than_80_lines():
    too_long = [
        f"{n} lines: {where}"
        for n, where in function_lengths()
        if n > MAX_FUNCTION_LINES and where.split(":")[0] not in NOT_YET
    ]
    assert not too_long, "\n".join(too_long)


def test_the_length_count_includes_decorators_and_the_whole_body(tmp_path):
    (tmp_path / "m.py").write_text("@dec\ndef f():\n    x = 1\n\n    return x\n\n\ndef g(): pass\n")
    here = tmp_path.name
    assert function_lengths(tmp_path) == [(5, f"{here}/m.py:2 f"), (1, f"{here}/m.py:8 g")]


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


if __name__ == "__main__":
    for n, where in function_lengths()[:3]:
        print(f"{n:4d}  {where}")
