"""The README's commands and example stay true."""
import re
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_two_commands_and_ci_runs_the_second():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert "batchgap run default" in block[0] and "pytest" in block[1]
    assert block[1] in (ROOT / ".ci" / "run").read_text()


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


def test_public_api_is_importable_from_the_package_root():
    import batchgap

    for name in batchgap.__all__:
        assert getattr(batchgap, name) is not None, name
    from batchgap import eps_sharpness, hessian_eigenvalues, hessian_trace, interpolate, loss_curve  # noqa: F401
    import batchgap.train as train_module  # the module, not hidden by a root export of the same name

    assert hasattr(train_module, "sgd_step")


def test_each_experiment_study_has_a_readme_section_with_its_command_time_and_figure():
    """Issue 4: the question, the command, the time here and one of its figures, per study."""
    from batchgap.studies import builtin_names

    experiments = [n for n in builtin_names() if not n.startswith(("keskar", "seed-")) and n != "default"]
    assert len(experiments) == 6
    for name in experiments:
        section = re.search(rf"#### `{name}`: (.*?)(?=\n####|\n### |\n## )", README, re.S)
        assert section, name
        text = section.group(1)
        assert "?" in text.splitlines()[0] and f"`batchgap run {name} --jobs 2`" in text, name
        assert re.search(r"\*\*[\d.]+ minutes\*\*", text), name
        figures = re.findall(r"!\[[^\]]*\]\((docs/figures/[^)]+\.png)\)", text)
        assert figures, name
        for f in figures:
            assert (ROOT / f).read_bytes()[:4] == b"\x89PNG", f


def test_the_architecture_section_names_every_module():
    """The README's module table lists exactly the modules and packages of src/batchgap."""
    section = README.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))`", section.split("| module |", 1)[1].split("\n\n", 1)[0]))
    pkg = ROOT / "src" / "batchgap"
    present = {p.name + ("/" if p.is_dir() else "") for p in pkg.iterdir()
               if (p.suffix == ".py" or p.is_dir() and p.name != "__pycache__") and p.name not in ("__init__.py", "__main__.py")}
    assert named == present
    for module, fn in (("config", "parse_batch_size"), ("plan", "resolve_batch_size")):  # the batch size's path
        assert f"`{module}.{fn}`" in section and hasattr(__import__(f"batchgap.{module}", fromlist=[fn]), fn)


def test_the_own_model_example_in_the_readme_is_the_example_directory():
    """The README's study file is examples/own-model/study.toml; its nets.py block builds the same network."""
    example = ROOT / "examples" / "own-model"
    toml_block = re.search(r"```toml\n# examples/own-model/study.toml\n(.*?)```", README, re.S).group(1)
    assert toml_block == (example / "study.toml").read_text()
    nets_block = re.search(r"```python\n# examples/own-model/nets.py\n(.*?)```", README, re.S).group(1)
    ns, file_ns = {}, {}
    exec(compile(nets_block, "README.md", "exec"), ns)
    exec(compile((example / "nets.py").read_text(), str(example / "nets.py"), "exec"), file_ns)
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert shapes(ns["small_cnn"]((1, 8, 8), 4, width=8)) == shapes(file_ns["small_cnn"]((1, 8, 8), 4, width=8))
    assert "python examples/own-model/make_data.py" in README and "batchgap run examples/own-model/study.toml" in README
