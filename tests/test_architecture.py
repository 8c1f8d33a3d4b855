"""The layout keeps its promises: imports run one way, modules stay small, `import transferkit` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import transferkit

SRC = Path(transferkit.__file__).parent
MAX_MODULE_LINES = 600
MAX_CLASSIFIER_LINES = 450  # ruff-format lines: the constructors list one parameter per line (350 before formatting)
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """Every transferkit module `name` imports, at the top or inside functions (TYPE_CHECKING blocks too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from transferkit import distributed` imports the module transferkit.distributed
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    if name == "transferkit":  # the package's lazy re-exports are imports too
        found |= set(transferkit.LAZY.values())
    return {m for m in found if m in MODULES and m != name}


def test_the_imports_form_a_dag():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_a_cycle_is_detected_by_the_same_walk(tmp_path):
    """The DAG check can fail: two modules importing each other are reported."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from transferkit.report import comparison\n")
    b.write_text("import transferkit.compare.run\n")
    assert "transferkit.report.comparison" in imported_modules("x", a) and "transferkit.compare.run" in imported_modules("x", b)


# The layer contract, top to bottom: a module may import modules of its own layer or of a layer below, never above
# (inside functions too). A module's layer is that of the longest prefix listed; a package's orchestration module
# (compare.run, doctor.diagnose) sits above the estimator it drives, its records and algorithms below training,
# which computes them (the fit-time doctor) and the report, which renders them.
LAYERS = [
    ("cli", ("transferkit.cli", "transferkit.__main__")),
    ("serve", ("transferkit.serve",)),
    ("export", ("transferkit.export",)),
    ("commands", ("transferkit.compare.run", "transferkit.doctor.diagnose")),
    ("estimator", ("transferkit.classifier",)),
    ("runs", ("transferkit.runs",)),
    ("report", ("transferkit.report",)),
    ("training", ("transferkit.training", "transferkit.tracking")),
    ("records", ("transferkit.compare", "transferkit.doctor", "transferkit.runs.meta")),
    ("cache", ("transferkit.cache",)),
    ("inference", ("transferkit.inference",)),
    ("backbones", ("transferkit.backbones",)),
    ("data", ("transferkit.data",)),
    ("stats", ("transferkit.stats",)),
    ("base", ("transferkit.errors", "transferkit.atomic", "transferkit.distributed", "transferkit.progress")),
]


def layer_of(module: str) -> int:
    """The index of `module`'s layer in LAYERS (0 = top): its longest listed prefix."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def upward_imports() -> list[str]:
    found = []
    for name, path in MODULES.items():
        if name == "transferkit":  # the package's lazy facade over the public names
            continue
        for dep in imported_modules(name, path) - {"transferkit"}:  # `from transferkit import __version__`
            if layer_of(dep) < layer_of(name):
                found.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    return sorted(found)


def test_nothing_imports_upward():
    assert not upward_imports(), "\n".join(upward_imports())


def test_the_layer_check_can_fail(tmp_path, monkeypatch):
    """A training module importing the report is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from transferkit.report import comparison\n")
    monkeypatch.setitem(MODULES, "transferkit.training.bad", bad)
    assert "transferkit.training.bad (training) imports transferkit.report.comparison (report)" in upward_imports()


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)


def test_modules_and_functions_stay_small():
    too_long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
    assert len((SRC / "classifier.py").read_text().splitlines()) < MAX_CLASSIFIER_LINES
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                # the signature and the docstring excluded: typer commands are specs, and documenting is not length
                first = node.body[1] if len(node.body) > 1 and _is_docstring(node.body[0]) else node.body[0]
                body = node.end_lineno - first.lineno + 1
                if body > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} ({body})")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


@pytest.mark.subprocess
def test_import_transferkit_loads_no_torch_and_names_load_lazily():
    code = (
        "import sys, transferkit\nassert 'torch' not in sys.modules, 'import transferkit loaded torch'\n"
        "import transferkit.cli.app\nassert 'torch' not in sys.modules, 'the CLI module loaded torch'\n"
        "from transferkit import ImageClassifier, TextClassifier, UsageError\nprint(ImageClassifier.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "transferkit.classifier"


def test_library_modules_do_not_print_or_touch_global_state():
    offenders = []
    for name, path in MODULES.items():
        # The CLI package (cli/) are the only places that print (rich consoles); progress draws bars.
        if name.startswith("transferkit.cli") or name in ("transferkit.__main__", "transferkit.progress"):
            continue
        text = path.read_text()
        for bad in ("print(", "console.print", "matplotlib.use(", "torch.set_num_threads", 'warnings.simplefilter("ignore'):
            if bad in text:
                offenders.append(f"{name}: {bad}")
    assert not offenders, offenders


def _private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions and methods, and attributes it sets on self."""
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_reach_ins() -> list[str]:
    """`obj._name` where `_name` is private to another transferkit module and `obj` is not self/cls."""
    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    owners: dict[str, set[str]] = {}
    for name, tree in trees.items():
        for private in _private_names(tree):
            owners.setdefault(private, set()).add(name)
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in owners or name in owners[node.attr]:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append(f"{name}:{node.lineno} uses {node.attr} of {', '.join(sorted(owners[node.attr]))}")
        for node in ast.walk(tree):  # `from transferkit.x import _private`
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transferkit"):
                found += [
                    f"{name}:{node.lineno} imports {a.name} from {node.module}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    return found


def test_no_module_touches_another_modules_private_names():
    assert not private_reach_ins(), "\n".join(private_reach_ins())
    for name, path in MODULES.items():  # the reach-ins the architecture issue found, by name
        text = path.read_text()
        for private in ("._fitted", "._validated(", "._new_backbone("):
            assert name == "transferkit.classifier" or private not in text, f"{name} uses {private}"


def test_the_private_name_check_can_fail(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(clf):\n    return clf._set_fitted(None)\n")
    monkeypatch.setitem(MODULES, "transferkit.compare.bad", bad)
    assert any(r.startswith("transferkit.compare.bad:2 uses _set_fitted") for r in private_reach_ins())
