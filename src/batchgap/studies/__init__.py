"""Built-in study specs (TOML files beside this module)."""
from __future__ import annotations

from pathlib import Path

from ..config import read_toml
from ..errors import UserError, closest

HERE = Path(__file__).parent


def builtin_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def regime_study_names() -> list[str]:
    """The built-in studies of regimes and seeds (not an ``experiment = ...`` study: batchgap.experiments)."""
    return [n for n in builtin_names() if "experiment" not in read_toml(HERE / f"{n}.toml")]


def find_study(name_or_path: str) -> Path:
    """A built-in study by name, or a path to a TOML file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UserError(f"{name_or_path}: no such study file")
        return path
    builtin = HERE / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    names = builtin_names()
    raise UserError(f"study {name_or_path!r}: not a built-in study or a .toml file{closest(name_or_path, names)}; "
                    f"built-in: {', '.join(names)}")


def list_studies() -> list[tuple[str, str]]:
    return [(n, read_toml(HERE / f"{n}.toml").get("description", "")) for n in builtin_names()]
