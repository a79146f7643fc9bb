"""Shape rules for the package's code: short functions, no formatter markers, no reaching into
private names, no import cycles, packages in layers, and rlhf/algo/ free of everything but
tensors.

`python -m tests.test_code_shape` prints the longest functions in rlhf/ and bench/.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf"
BENCH = PACKAGE.parent / "bench"
MAX_FUNCTION_LINES = 60


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


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, at any depth of its code."""
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(root.name):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in paths else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in paths)
        graph[name] &= paths.keys() - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, each as [a, b, ..., a]."""
    cycles, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other) :] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


# The package's layers, bottom first. A package may import its own layer and those below it,
# never one above. rlhf itself (__init__: the version) is below everything; rlhf.algo imports
# nothing of the package at all (test_the_math_imports_nothing_of_the_package_but_the_math).
LAYERS: list[tuple[str, ...]] = [
    ("rlhf",),
    ("algo",),  # pure tensor math: every loss
    ("infra",),  # model-agnostic plumbing: errors, accelerate, run folders, optimizer
    ("tokens", "data"),  # chat templates and sequences; data files as canonical examples
    ("roles",),  # the models: loading, LoRA, policy / critic / reward model forwards
    ("accel",),  # the CPU fast paths, switched on over the plain path (may be absent)
    ("recipe",),  # the recipe schema (validates reward functions with roles)
    ("ppo",),  # the PPO/GRPO iteration: rollout, scoring, update
    ("evaluation",),  # a policy against a reference (may be absent)
    ("stages",),  # the stage runner and the stages
    ("tools",),  # eval, compare, curves, report, label, data check, ...
    ("cli", "__main__"),
]


def package_of(module: str) -> str:
    """rlhf.roles.models -> roles; rlhf.recipe -> recipe; rlhf -> rlhf."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """{package: the other packages its modules import}."""
    out: dict[str, set[str]] = {}
    for name, imported in graph.items():
        out.setdefault(package_of(name), set()).update(package_of(m) for m in imported)
    return {pkg: imported - {pkg} for pkg, imported in out.items()}


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS) -> list[str]:
    """`module -> module` for every import of a package in a higher layer than the importer's."""
    level = {pkg: i for i, layer in enumerate(layers) for pkg in layer}
    return [
        f"{name} -> {other}"
        for name, imported in sorted(graph.items())
        for other in sorted(imported)
        if level[package_of(other)] > level[package_of(name)]
    ]


def test_every_package_has_a_layer():
    placed = {pkg for layer in LAYERS for pkg in layer}
    assert set(package_graph(package_imports())) <= placed


def test_no_package_imports_one_above_it():
    upward = upward_imports(package_imports())
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_packages():
    cycles = import_cycles(package_graph(package_imports()))
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_layer_check_finds_an_upward_import(tmp_path):
    pkg = tmp_path / "rlhf"
    for sub in ("infra", "roles"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "infra" / "training.py").write_text("def f():\n    from rlhf.roles import models\n")
    (pkg / "roles" / "models.py").write_text("from rlhf.infra import training\n")
    graph = package_imports(pkg)
    assert upward_imports(graph) == ["rlhf.infra.training -> rlhf.roles.models"]
    assert import_cycles(package_graph(graph)) == [["infra", "roles", "infra"]]


def long_functions(roots: tuple[Path, ...] = (PACKAGE, BENCH)) -> dict[str, int]:
    """{"path name": lines} of every function over MAX_FUNCTION_LINES."""
    out = {}
    for root in roots:
        for n, where in function_lengths(root):
            if n > MAX_FUNCTION_LINES:
                path_line, name = where.split(" ")
                out[f"{path_line.split(':')[0]} {name}"] = n
    return out


def formatter_markers(roots: tuple[Path, ...] = (PACKAGE, BENCH)) -> set[str]:
    """Files with a `# fmt: skip` or `# fmt: off` comment (the formatter told to look away)."""
    marker = re.compile(r"#\s*fmt:\s*(skip|off)\b")
    return {
        str(path.relative_to(root.parent))
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if marker.search(path.read_text())
    }


def test_no_function_is_longer_than_60_lines():
    too_long = [f"{n} lines: {where}" for where, n in long_functions().items()]
    assert not too_long, "\n".join(too_long)


def test_no_formatter_markers():
    found = formatter_markers()
    assert not found, sorted(found)


def test_the_marker_finder_finds_skip_and_off(tmp_path):
    pkg = tmp_path / "rlhf"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = [1,\n  2]  # fmt: skip\n")
    (pkg / "b.py").write_text("# fmt: off\nx = 1\n# fmt: on\n")
    (pkg / "c.py").write_text('"""fmt: skip in prose is no marker."""\n')
    assert formatter_markers((pkg,)) == {"rlhf/a.py", "rlhf/b.py"}


def test_the_length_count_includes_decorators_and_the_whole_body(tmp_path):
    (tmp_path / "m.py").write_text("@dec\ndef f():\n    x = 1\n\n    return x\n\n\ndef g(): pass\n")
    here = tmp_path.name
    assert function_lengths(tmp_path) == [(5, f"{here}/m.py:2 f"), (1, f"{here}/m.py:8 g")]


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


def test_no_import_cycles():
    cycles = import_cycles(package_imports())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "rlhf"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "a.py").write_text("from rlhf.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from rlhf.sub.a import x\n")
    (pkg / "c.py").write_text("import rlhf.sub.a\n")
    graph = package_imports(pkg)
    assert graph["rlhf.c"] == {"rlhf.sub.a"}
    assert import_cycles(graph) == [["rlhf.sub.a", "rlhf.sub.b", "rlhf.sub.a"]]


def test_the_math_imports_nothing_of_the_package_but_the_math():
    outside = {
        name: sorted(m for m in imported if not m.startswith("rlhf.algo"))
        for name, imported in package_imports().items()
        if name.startswith("rlhf.algo")
    }
    assert not any(outside.values()), outside


if __name__ == "__main__":
    for n, where in sorted(function_lengths() + function_lengths(BENCH), reverse=True)[:10]:
        print(f"{n:4d}  {where}")
