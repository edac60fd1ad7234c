"""The shape of benchmarks/ (issue 27): its imports form no cycle, its frozen baselines stand alone, its
documented commands parse, and the frozen train() still computes what it was copied from."""
import ast
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from test_architecture import cycles  # the one cycle finder, tested there

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
FROZEN = "frozen"


def modules(root: Path) -> dict[str, Path]:
    """Every benchmark module by the name it is imported under (benchmarks/ is on sys.path)."""
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(root.rglob("*.py"))}


def imported_names(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``, inside functions too: ``import m``, ``from m import
    a, b``, and the constant-string ``importlib.import_module("m")`` / ``__import__("m")``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                out.append((node.args[0].value, []))
    return out


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the benchmark modules it imports (``from frozen import x`` counts as frozen.x)."""
    edges = {}
    for name, path in mods.items():
        found = set()
        for module, names in imported_names(path):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in mods and target != name:
                    found.add(target)
        edges[name] = found
    return edges


def frozen_violations(mods: dict[str, Path]) -> list[str]:
    """What a frozen baseline may not import: anything of batchgap (a private name flagged as such) and
    any other benchmark module. Standard library, torch, numpy, scipy: allowed."""
    bad = []
    for name, path in mods.items():
        if not (name == FROZEN or name.startswith(FROZEN + ".")):
            continue
        for module, names in imported_names(path):
            if module.split(".")[0] == "batchgap":
                private = [n for n in [*module.split("."), *names] if n.startswith("_") and not n.startswith("__")]
                what = f"private {', '.join(private)}" if private else "batchgap"
                bad.append(f"{name}: imports {module} {' '.join(names)} ({what})".rstrip())
            elif any(t in mods and not t.startswith(FROZEN) for t in [module, *(f"{module}.{n}" for n in names)]):
                bad.append(f"{name}: imports the benchmark module {module}")
    return bad


def test_the_checks_see_a_planted_cycle_and_a_planted_private_import(tmp_path):
    (tmp_path / "run.py").write_text("def f():\n    import importlib\n    return importlib.import_module('peers')\n")
    (tmp_path / "peers.py").write_text("from run import row\n")
    (tmp_path / "harness.py").write_text("import os\n")
    (tmp_path / FROZEN).mkdir()
    (tmp_path / FROZEN / "__init__.py").write_text("")
    (tmp_path / FROZEN / "old.py").write_text("import torch\nfrom batchgap.train import _parallel, lr_at\n")
    (tmp_path / FROZEN / "older.py").write_text("def f():\n    from harness import row\n")
    mods = modules(tmp_path)
    assert cycles(graph(mods)) == [["peers", "run", "peers"]]
    assert frozen_violations(mods) == ["frozen.old: imports batchgap.train _parallel lr_at (private _parallel)",
                                       "frozen.older: imports the benchmark module harness"]


def test_benchmarks_import_no_cycle_even_inside_functions():
    mods = modules(BENCH)
    edges = graph(mods)
    assert {"run", "peers", "harness", f"{FROZEN}.train_976ebaa"} <= set(mods)
    assert "harness" in edges["run"] and "peers" in edges["run"] and "harness" in edges["peers"]
    assert cycles(edges) == []


def test_frozen_baselines_import_nothing_of_batchgap_or_of_the_other_benchmarks():
    mods = modules(BENCH)
    assert [m for m in mods if m.startswith(FROZEN + ".")], "no frozen baseline found"
    assert frozen_violations(mods) == []


def documented_commands(script: str) -> list[list[str]]:
    """The arguments of every ``python benchmarks/SCRIPT ...`` in the docs (a trailing comment dropped)."""
    out = []
    for doc in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        for match in re.finditer(rf"python benchmarks/{re.escape(script)}([^`\n#]*)", doc.read_text()):
            out.append(shlex.split(match.group(1)))
    return out


def test_the_documented_benchmark_commands_parse():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_times
        import run
    finally:
        sys.path.remove(str(BENCH))
    commands = documented_commands("run.py")
    assert len(commands) >= 8 and ["--studies", "--keep", "DIR"] in commands
    for argv in commands:
        args = run.parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown benchmark name
        assert all(n in {**run.BENCHMARKS, **run.EXTRA, **run.STUDIES} for n in args.names)
    with pytest.raises(SystemExit):
        run.parser().parse_args(["no-such-benchmark"])
    commands = documented_commands("gpu_times.py")
    assert ["--device", "cuda"] in commands
    for argv in commands:
        gpu_times.parser().parse_args(argv)


def test_the_frozen_train_is_the_train_it_was_copied_from_on_a_tiny_net():
    """train_976ebaa (frozen) and today's train() give the same weights bit for bit: the training row's
    'bitwise equal' note. If train()'s arithmetic changes on purpose, this fails, and the row's note with it."""
    sys.path.insert(0, str(BENCH))
    try:
        from frozen.train_976ebaa import train as frozen_train
    finally:
        sys.path.remove(str(BENCH))
    from batchgap.config import TrainConfig
    from batchgap.data.base import TensorData
    from batchgap.models import init_model
    from batchgap.train import train

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))
    for cfg in (TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0.5), TrainConfig(epochs=2, optimizer="sgd", lr=0.1)):
        a, b = (init_model("mlp", (6,), 3, 0, width=16, depth=2) for _ in range(2))
        ours = train(a, data, data, cfg, 16, seed=1, progress=False)
        old = frozen_train(b, data, data, cfg, 16, seed=1)
        assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
        keys = ("epoch", "steps", "lr", "batch_loss", "train_loss", "train_accuracy", "test_loss")
        assert [{k: r[k] for k in keys} for r in ours.history] == [{k: r[k] for k in keys} for r in old.history]


def test_the_frozen_976ebaa_hvps_are_the_exact_hessian_times_v_on_a_tiny_net():
    """Both frozen HVPs (976ebaa's reverse-over-reverse, and forward-over-reverse before it) against H v from
    the dense Hessian of torch.func.hessian over all the data, float64, a batch size that does not divide n."""
    sys.path.insert(0, str(BENCH))
    try:
        from frozen.hvp_976ebaa import FullDataLoss
    finally:
        sys.path.remove(str(BENCH))
    from torch.func import functional_call, hessian

    from batchgap.models import init_model

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,), generator=g)
    model = init_model("mlp", (6,), 3, 0, width=8, depth=2).double().eval()
    f = FullDataLoss(model, x, y, batch_size=16)
    shapes = [(n, p.shape) for n, p in model.named_parameters()]

    def loss(theta):
        parts = torch.split(theta, [s.numel() for _, s in shapes])
        params = {n: p.view(s) for (n, s), p in zip(shapes, parts)}
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    H = hessian(loss)(f.x0)
    V = torch.randn(3, f.num_params, generator=g, dtype=torch.float64)
    exact = V @ H.T
    assert torch.allclose(f.hvp(V), exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(f.hvp(V[1]), exact[1], rtol=1e-10, atol=1e-12)
    assert torch.allclose(f.forward_over_reverse(V[2]), exact[2], rtol=1e-10, atol=1e-12)


def test_trace_accuracy_interpolates_the_hvps_a_target_width_needs():
    """benchmarks/trace_accuracy.needed: on a ladder that follows a power law w = a m^-p it finds the exact
    crossing, between rungs and past the last (extrapolated, and said so)."""
    sys.path.insert(0, str(BENCH))
    from trace_accuracy import needed

    for p, targets in ((0.5, (0.2, 0.05)), (0.8, (0.05, 0.01))):
        ladder = [(m, 2.0 * m ** -p) for m in (32, 64, 128, 256)]
        for target in targets:
            m, note = needed(ladder, target)
            assert m == pytest.approx((2.0 / target) ** (1 / p), rel=1e-9)
            assert ("extrapolated" in note) == ((2.0 / target) ** (1 / p) > 256)
    assert needed([(32, 0.01), (64, 0.008)], 0.05) == (32.0, "")
