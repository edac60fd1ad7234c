"""The README's commands and example stay true, and so do the pages in docs/ its sections moved to."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf8")
STUDIES = ROOT / "docs" / "studies"
KESKAR = ("keskar-f1", "keskar-c1", "keskar-c2", "keskar-c3", "keskar-c4")  # one page: they share every setting


def doc(name):
    return (ROOT / "docs" / name).read_text(encoding="utf8")


def study_page(name):
    """The docs/studies page of a built-in study (the paper's five studies share keskar.md)."""
    return STUDIES / ("keskar.md" if name in KESKAR else f"{name}.md")


def test_first_lines_are_the_two_commands_and_ci_runs_the_second():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert block == ["bash scripts/bootstrap.sh && .venv/bin/batchgap run default --out runs/default",
                     "bash scripts/bootstrap.sh --dev && .venv/bin/python -m pytest -q"]
    assert README.index(block[0]) < 40  # on the first screen
    assert block[1] in (ROOT / ".ci" / "run").read_text()


def test_the_first_screen_has_no_dated_measurement_or_version_history():
    """Issue 24: dates, other machines and what changed when live in CHANGELOG.md and docs/, not up top."""
    first_screen = "\n".join(README.splitlines()[:40])
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", first_screen)
    assert not re.search(r"before (it|them)|earlier version|other days|EPYC", first_screen)
    assert "## What it is" in first_screen and (ROOT / "CHANGELOG.md").exists()


def test_python_example_runs(mnist1d_dir):
    code = re.search(r"```python\n(.*?)```", README.split("### In a notebook", 1)[1], re.S).group(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4200, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long()

    class MyNet(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    ns = {"MyNet": MyNet, "x_train": x[:4100], "y_train": y[:4100], "x_test": x[4100:], "y_test": y[4100:]}
    exec(compile(code.replace("epochs=20", "epochs=2"), "README.md", "exec"), ns)
    acc = ns["curve"].curves["test"].accuracy
    assert len(acc) == 25 and 0 <= acc.min() <= acc.max() <= 1


def own_model_block(first_line):
    """The README's ```python block under "## Your own model" that starts with ``first_line``."""
    section = README.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if b.startswith(first_line)]
    assert len(blocks) == 1, first_line
    return blocks[0]


def test_the_own_loop_example_tracks_sb_and_lb_and_the_report_draws_them(tmp_path, monkeypatch):
    """Issue 25: the README's `track` loop runs as printed, writes one record per 10 steps for both runs."""
    import json

    from batchgap.cli import main

    monkeypatch.chdir(tmp_path)
    exec(compile(own_model_block("# your own loop"), "README.md", "exec"), {"__name__": "readme"})
    for name in ("sb", "lb"):
        records = [json.loads(line) for line in (tmp_path / f"track-{name}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [10, 20, 30]
        assert all(r["budget"]["hvps_used"] <= 40 for r in records)
        assert all(r["measures"]["lambda_max"]["value"] > 0 for r in records)
    assert main(["report", "track-sb.jsonl", "track-lb.jsonl"]) == 0
    assert (tmp_path / "track-sb.png").read_bytes()[:4] == b"\x89PNG"


def test_the_callback_example_trains_gpt2_and_measures_through_sdpa(tmp_path, monkeypatch):
    """Issue 25: the README's Hugging Face callback example runs as printed (a real Trainer, GPT-2 built from
    its config) and its records carry the math-backend note for the fused attention."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ns = {"__name__": "readme"}
    exec(compile(own_model_block("# the callbacks"), "README.md", "exec"), ns)
    records = ns["geometry"].records
    assert [r["step"] for r in records] == [2, 4]
    lam = records[-1]["measures"]["lambda_max"]
    assert lam["value"] > 0 and lam["attention"] and lam["unit"] == "token"


def test_public_api_is_importable_from_the_package_root():
    import batchgap

    for name in batchgap.__all__:
        assert getattr(batchgap, name) is not None, name
    from batchgap import eps_sharpness, hessian_eigenvalues, hessian_trace, interpolate, loss_curve  # noqa: F401
    import batchgap.train as train_module  # the module, not hidden by a root export of the same name

    assert hasattr(train_module, "sgd_step")


def test_every_builtin_study_has_a_docs_page_linked_from_the_readme():
    """Issue 24: the README lists each built-in study in one line linking to docs/studies/NAME.md."""
    from batchgap.studies import builtin_names

    section = README.split("## Built-in studies", 1)[1].split("\n## ", 1)[0]
    linked = set(re.findall(r"\]\((docs/studies/[\w-]+\.md)\)", section))
    for name in builtin_names():
        page = study_page(name)
        assert page.exists(), name
        assert str(page.relative_to(ROOT)) in linked, name
        assert f"`{name}`" in page.read_text(encoding="utf8"), name
    assert linked == {str(study_page(n).relative_to(ROOT)) for n in builtin_names()}


EXPERIMENTS = {"batch-sweep", "warm-start", "sharpness-trajectory", "remedies", "noise-scale", "measures",
               "edge-of-stability", "critical-batch", "reparametrization", "char-lm"}


def test_each_experiment_study_page_has_its_question_command_time_and_figure():
    """Issue 4: the question, the command, the time here and one of its figures, per study (now on its page)."""
    from batchgap.studies import builtin_names

    experiments = [n for n in builtin_names() if not n.startswith(("keskar", "seed-")) and n != "default"]
    assert set(experiments) >= EXPERIMENTS, EXPERIMENTS - set(experiments)  # none lost from the registry
    for name in experiments:
        text = (STUDIES / f"{name}.md").read_text(encoding="utf8")
        title = text.splitlines()[0]
        assert title.startswith(f"# `{name}`: ") and "?" in title, name
        assert f"`batchgap run {name} --jobs 2`" in text, name
        assert re.search(r"\*\*[\d.]+ minutes\*\*", text), name
        figures = re.findall(r"!\[[^\]]*\]\((\.\./figures/[^)]+\.png)\)", text)
        assert figures, name
        for f in figures:
            assert (STUDIES / f).resolve().read_bytes()[:4] == b"\x89PNG", f


def test_the_default_study_table_is_the_same_in_the_readme_and_on_its_page():
    """The README's findings table is the default study page's, number for number."""

    def table(text):
        """The rows of the findings table in ``text``."""
        return ("| | SB (batch 32)" + text.split("| | SB (batch 32)", 1)[1].split("\n\n", 1)[0]).splitlines()

    readme_rows = table(README.split("## What the default study shows", 1)[1])
    assert len(readme_rows) == 9 and readme_rows == table((STUDIES / "default.md").read_text(encoding="utf8"))
    assert "![" in README.split("## What the default study shows", 1)[1].split("\n## ", 1)[0]


def test_the_architecture_section_names_every_module():
    """docs/architecture.md's module list names exactly the modules and packages of src/batchgap."""
    section = doc("architecture.md").split("## Architecture", 1)[1].split("\n## ", 1)[0]
    heads = [line[2:].split("`: ", 1)[0] for line in section.splitlines() if line.startswith("- `")]
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))", " ".join(heads)))
    pkg = ROOT / "src" / "batchgap"
    present = {p.name + ("/" if p.is_dir() else "") for p in pkg.iterdir()
               if (p.suffix == ".py" or p.is_dir() and p.name != "__pycache__")
               and p.name not in ("__init__.py", "__main__.py")}
    assert named == present
    for module, fn in (("config", "parse_batch_size"), ("plan", "resolve_batch_size")):  # the batch size's path
        assert f"`{module}.{fn}`" in section and hasattr(__import__(f"batchgap.{module}", fromlist=[fn]), fn)


def test_the_own_model_example_in_the_docs_is_the_example_directory():
    """docs/own-model.md's study file is examples/own-model/study.toml; its nets.py block builds the same network;
    the README gives the example's two commands."""
    example = ROOT / "examples" / "own-model"
    page = doc("own-model.md")
    toml_block = re.search(r"```toml\n# examples/own-model/study.toml\n(.*?)```", page, re.S).group(1)
    assert toml_block == (example / "study.toml").read_text()
    nets_block = re.search(r"```python\n# examples/own-model/nets.py\n(.*?)```", page, re.S).group(1)
    ns, file_ns = {}, {}
    exec(compile(nets_block, "docs/own-model.md", "exec"), ns)
    exec(compile((example / "nets.py").read_text(), str(example / "nets.py"), "exec"), file_ns)

    def shapes(m):
        """The parameter and buffer shapes of model ``m``, by name."""
        return [(k, tuple(v.shape)) for k, v in m.state_dict().items()]

    assert shapes(ns["small_cnn"]((1, 8, 8), 4, width=8)) == shapes(file_ns["small_cnn"]((1, 8, 8), 4, width=8))
    for text in (README, page):
        assert "python examples/own-model/make_data.py" in text and "batchgap run examples/own-model/study.toml" in text
