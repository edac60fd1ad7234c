"""The API reference (docs/api.md) is current, and every public function documents its arguments (issue 24)."""
from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import batchgap
import batchgap.train

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "scripts" / "api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_docs = _load_script()


SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")  # a Google-style section header: "Args:", "Returns:", "Cost:"
ARG = re.compile(r"^ {4}\*{0,2}(\w+)( \([^)]*\))?:")  # "    name: ..." or "    name (type): ..." under Args:


def sections(doc: str) -> dict[str, list[str]]:
    """``{header: the lines under it}`` of a cleaned docstring's Google-style sections."""
    out, current = {}, None
    for line in doc.splitlines():
        if m := SECTION.match(line):
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def undocumented(func) -> list[str]:
    """What the docstring of ``func`` lacks: a missing Args or Returns section, parameters not named under Args.

    Parameters with a leading underscore are private switches (e.g. ``_vmap``) and need no entry.
    """
    doc = inspect.getdoc(func) or ""
    found = sections(doc)
    missing = [f"no {name}: section" for name in ("Args", "Returns") if name not in found]
    named = {m.group(1) for line in found.get("Args", []) if (m := ARG.match(line))}
    params = [p for p in inspect.signature(func).parameters if not p.startswith("_")]
    missing += [f"parameter {p!r} not under Args" for p in params if p not in named]
    return missing


def public_functions() -> dict[str, object]:
    names = {name: getattr(batchgap, name) for name in batchgap.__all__}
    names["train"] = batchgap.train.train
    return {name: obj for name, obj in names.items() if inspect.isfunction(inspect.unwrap(obj))}


def test_api_md_is_current():
    expected = api_docs.render()
    path = ROOT / "docs" / "api.md"
    current = path.read_text() if path.exists() else ""
    assert current == expected, f"docs/api.md is out of date: run `{api_docs.COMMAND}` and commit the result"


def test_api_md_has_every_public_name_and_no_machine_detail():
    text = api_docs.render()
    for name in [*batchgap.__all__, "train"]:
        assert f"### `{name}`" in text, name
    assert " at 0x" not in text  # a default's repr with a memory address would change on every run
    assert str(ROOT) not in text  # nor a path of this checkout
    assert "torch.nn.functional.cross_entropy" in text  # train's default loss_fn, named by its import path


def test_check_mode_fails_on_a_stale_file_and_passes_on_a_current_one(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "api.md"
    stale.write_text("# API reference\n")
    monkeypatch.setattr(api_docs, "OUTPUT", stale)
    assert api_docs.main(["--check"]) == 1
    assert "python scripts/api_docs.py" in capsys.readouterr().err
    stale.write_text(api_docs.render())
    assert api_docs.main(["--check"]) == 0


def test_a_name_in_no_group_is_still_documented(monkeypatch):
    monkeypatch.setattr(api_docs, "GROUPS", [g for g in api_docs.GROUPS if "evaluate" not in g[2]])
    text = api_docs.render()
    assert "## Other names" in text and "### `evaluate`" in text


def test_the_docstring_check_sees_what_is_missing():
    def documented(model, data, *, seed=0, _private=True, **options):
        """f.

        Args:
            model: m.
            data (tensor pair): d.
            seed: s.
            **options: o.

        Returns:
            r.
        """

    def partial(model, data, seed=0):
        """f.

        Args:
            model: m.
        Returns:
            r.

        Cost:
            data: a word in another section is no entry.
        """

    assert undocumented(documented) == []
    assert undocumented(partial) == ["parameter 'data' not under Args", "parameter 'seed' not under Args"]
    assert undocumented(lambda x: None) == ["no Args: section", "no Returns: section",
                                            "parameter 'x' not under Args"]


@pytest.mark.parametrize("name", sorted(public_functions()))
def test_public_function_documents_args_and_returns(name):
    assert undocumented(public_functions()[name]) == []
