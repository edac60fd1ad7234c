"""The shape of the package (issue 13): no import cycle, short modules, the report above the results only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
           for p in (ROOT / "batchgap").rglob("*.py")}


def imports(module: str, lazy: bool = True) -> set[str]:
    """The batchgap modules ``module`` imports (relative imports; with ``lazy``, those inside functions too)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in (ast.walk(tree) if lazy else tree.body):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` imports the module x, else the package's attribute
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {m for m in out if m in MODULES and m != module}


def cycles(graph: dict) -> list[list[str]]:
    found, state = [], {}

    def visit(u, stack):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    assert "batchgap.study" in imports("batchgap") and "batchgap.plan" in imports("batchgap.study")
    for lazy in (False, True):
        assert cycles({m: imports(m, lazy) for m in MODULES}) == []


def test_no_module_over_450_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long


def test_the_report_reads_results_and_never_the_training_loop():
    report = [m for m in MODULES if m.startswith("batchgap.report")]
    used = set().union(*(imports(m) for m in report))
    assert "batchgap.results" in used and not used & {"batchgap.train", "batchgap.study", "batchgap.stacked"}


def test_run_directories_are_laid_out_in_one_place():
    """`OUT/runs/<id>` is built by rundir alone; train, study and report go through it."""
    builders = [m for m, p in MODULES.items() if '/ "runs" /' in p.read_text()]
    assert builders == ["batchgap.rundir"]
    for m in ("batchgap.train", "batchgap.study", "batchgap.report.figures"):
        assert "batchgap.rundir" in imports(m)


def private_imports(module: str) -> list[str]:
    """``from .other import _name`` in ``module``: a private name taken across a module border."""
    tree = ast.parse(MODULES[module].read_text())
    return [f"{module}: from {'.' * node.level}{node.module or ''} import {alias.name}"
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_private_name_crosses_a_module_border_inside_landscape():
    """What landscape/'s modules share, they share under public names (issue 24/25)."""
    found = [line for m in MODULES if m.startswith("batchgap.landscape") for line in private_imports(m)]
    assert found == []


def test_the_private_import_check_sees_one(tmp_path, monkeypatch):
    planted = tmp_path / "planted.py"
    planted.write_text("from .hessian import _secret, public\nfrom . import __version__\n")
    monkeypatch.setitem(MODULES, "batchgap.landscape.planted", planted)
    assert private_imports("batchgap.landscape.planted") == ["batchgap.landscape.planted: from .hessian import _secret"]


def test_track_reads_landscape_and_never_the_study_machinery():
    """track/ (issue 25) measures a user's model: landscape/ and the record format, not study/plan/config/train;
    report/track.py reads the records through tracklog alone."""
    track = [m for m in MODULES if m.startswith("batchgap.track")]
    used = set().union(*(imports(m) for m in track))
    assert "batchgap.tracklog" in used and any(m.startswith("batchgap.landscape") for m in used)
    assert not used & {"batchgap.study", "batchgap.plan", "batchgap.config", "batchgap.train", "batchgap.measure"}
    assert not any(m.startswith(("batchgap.integrations", "batchgap.report")) for m in used)
    assert imports("batchgap.report.track") <= {"batchgap.tracklog", "batchgap.util", "batchgap.errors"}
