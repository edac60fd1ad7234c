"""What the experiment studies' tests (critical-batch, edge-of-stability) check alike, written once::

    from experiment_checks import assert_documented, assert_other_output_refused, assert_refused_in_one_line, run_cli

``run_cli`` is ``batchgap run ...``; the ``assert_*`` helpers are the shared bodies of a bad setting refused in one
line before anything is written, another study's output refused without ``--force``, and every public function
documenting its arguments and return.
"""
from __future__ import annotations

import inspect
import json


def run_cli(*args) -> int:
    """``batchgap run ARGS``; its exit code."""
    from batchgap.cli import main

    return main(["run", *args])


def assert_refused_in_one_line(kind: str, setting: str, needle: str, out, capsys) -> None:
    """``batchgap run KIND --quick --set SETTING`` exits 2 with one line naming ``needle``, no traceback, and
    without making ``out``."""
    assert run_cli(kind, "--quick", "--out", str(out), "--set", setting) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def assert_other_output_refused(kind: str, other: dict, out, capsys) -> None:
    """``batchgap run KIND --quick`` into ``out`` holding another study's results ``other`` exits 2, points to
    ``--force`` and leaves that results.json as it was."""
    out.mkdir()
    (out / "results.json").write_text(json.dumps(other))
    before = (out / "results.json").read_text()
    assert run_cli(kind, "--quick", "--out", str(out)) == 2
    assert "--force" in capsys.readouterr().err and (out / "results.json").read_text() == before


def assert_documented(modules) -> None:
    """Every public function defined in ``modules`` has ``Args:`` (naming each parameter) and ``Returns:``."""
    for module in modules:
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(fn) or ""
            assert "Args:" in doc and "Returns:" in doc, f"{module.__name__}.{name}"
            args = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
            for p in inspect.signature(fn).parameters:
                assert f"{p}:" in args, f"{module.__name__}.{name}: {p}"
