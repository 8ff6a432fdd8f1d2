"""edgekd's modules import one way: no import cycle, and no module imports from a layer above its own.

The graph is read from the source (every import statement, also those inside functions), so an import that
only runs on some code path counts as well. Importing `a.b.c` also runs the packages `a.b` and `a`, and those
edges count too (except into a package the importer itself belongs to: a package's __init__ importing its
own modules is how packages work). Imports under `if TYPE_CHECKING:` never run: they count for the layer
order but not for cycles.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgekd"

# lowest first; a module belongs to the entry with the longest matching prefix, and imports only from its own
# layer or the ones before it. A new top-level module must be placed here.
LAYERS: list[tuple[str, ...]] = [
    # foundation; edgekd.agent runs on devices: standard library + numpy, it imports nothing else of edgekd
    ("edgekd", "edgekd.errors", "edgekd.registry", "edgekd.resources", "edgekd.distributed", "edgekd.validate",
     "edgekd.agent"),
    ("edgekd.data",),
    ("edgekd.models",),
    ("edgekd.config",),  # TrainConfig validates model edits and init schemes (edgekd.models)
    ("edgekd.distill",),  # methods, their phases (distill.phase.Phase) and the teacher-output cache
    ("edgekd.train",),
    ("edgekd.quantize",),  # PTQ/QAT of a trained run (QAT runs through the trainer); export loads its models
    ("edgekd.targets", "edgekd.export"),  # a target is what an export must fit: format, precision, memory
    ("edgekd.profile",),
    ("edgekd.api", "edgekd.run", "edgekd.cli"),  # edgekd.run: the orchestration api.run hands its stages to
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: modules it imports at run time}, {module: modules imported only for type checking})."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    runtime: dict[str, set[str]] = {m: set() for m in modules}
    typing_only: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        guarded = _type_checking_lines(tree)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                if target not in modules:
                    continue  # not edgekd's (or a name that is no module)
                # importing a.b.c runs a.b and a first, unless the importer is inside that package already
                parts = target.split(".")
                chain = {".".join(parts[:i]) for i in range(1, len(parts))}
                chain = {p for p in chain if p in modules and not (name == p or name.startswith(p + "."))}
                edges = typing_only if node.lineno in guarded else runtime
                edges[name].update({target, *chain} - {name})
    return runtime, typing_only


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "edgekd" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_imports.py")
    return best[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_the_checks_catch_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert upward_imports({"edgekd.distill.base": {"edgekd.train.phases"}, "edgekd.train.trainer": {"edgekd.data"}}) \
        == ["edgekd.distill.base -> edgekd.train.phases"]


def test_the_graph_sees_relative_local_and_type_checking_imports(tmp_path):
    root = tmp_path / "edgekd"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "low.py").write_text("def f():\n    from .sub import high\n")
    (root / "sub" / "__init__.py").write_text("from . import high\n")
    (root / "sub" / "high.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .. import low\nif TYPE_CHECKING:\n    from ..low import f\n")
    runtime, typing_only = import_graph(root)
    assert runtime["edgekd.low"] == {"edgekd.sub.high", "edgekd.sub"}
    assert runtime["edgekd.sub"] == {"edgekd.sub.high"} and runtime["edgekd.sub.high"] == {"edgekd.low"}
    assert typing_only["edgekd.sub.high"] == {"edgekd.low"}
    assert find_cycle(runtime) == ["edgekd.low", "edgekd.sub", "edgekd.sub.high", "edgekd.low"]


def test_edgekd_has_no_import_cycle():
    runtime, _ = import_graph()
    assert len(runtime) > 50
    cycle = find_cycle(runtime)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_from_a_layer_above_its_own():
    runtime, typing_only = import_graph()
    combined = {m: runtime[m] | typing_only[m] for m in runtime}
    assert upward_imports(combined) == []


@pytest.mark.parametrize("module", ["edgekd.distill.base", "edgekd.distill.multiphase", "edgekd.models.layers"])
def test_the_former_cycles_stay_broken(module):
    """distill.base <-> train.phases, models.registry -> pretrained -> layers -> registry (issue 16)."""
    runtime, _ = import_graph()
    assert not any(t.startswith(("edgekd.train", "edgekd.models.registry")) for t in runtime[module])


def test_the_agent_imports_nothing_of_edgekd_beyond_itself():
    """It is copied to boards that have only numpy and a runtime: no edgekd module outside edgekd.agent."""
    runtime, typing_only = import_graph()
    for module in (m for m in runtime if m.startswith("edgekd.agent")):
        outside = {t for t in runtime[module] | typing_only[module] if not t.startswith("edgekd.agent") and t != "edgekd"}
        assert not outside, f"{module} imports {sorted(outside)}"
