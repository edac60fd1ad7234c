"""The linter (issue 24): `ruff check .` is clean, so CI (which runs the README's test command) lints too.
ruff is a dev extra (pyproject.toml); the rules are pyproject.toml's [tool.ruff]."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is not installed: `pip install -e '.[dev]'` (scripts/bootstrap.sh --dev) installs it")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
