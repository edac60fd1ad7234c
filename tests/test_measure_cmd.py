"""`batchgap measure`: a saved model's geometry without a study, equal to the notebook API's numbers."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import batchgap
from batchgap import (
    adaptive_sharpness, eps_sharpness, evaluate, filter_normalized_direction, hessian_eigenvalues, loss_curve,
    loss_surface, plugins,
)
from batchgap.cli import main
from batchgap.config import TrainConfig
from batchgap.errors import UserError
from batchgap.landscape import exact_gradient_noise_scale
from batchgap.train import train

NETS = '''
from torch import nn

WIDTH = 8


def mlp(input_shape, num_classes, width=WIDTH):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def plain(input_shape, num_classes, width=WIDTH):
    return nn.Sequential(nn.Linear(input_shape[0], width), nn.Tanh(), nn.Linear(width, num_classes))


def deeper(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, num_classes))


class _OneLogit(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.lin = nn.Linear(d, k)

    def forward(self, x):
        return self.lin(x)[:, :1]


def bad_output(input_shape, num_classes):
    return _OneLogit(input_shape[0], num_classes)


def raises(input_shape, num_classes):
    raise ValueError("no model today")


def load():
    """A data loader of the user's: the four arrays."""
    import numpy as np

    with np.load("data.npz") as f:
        return {k: f[k] for k in f.files}
'''

# every measurement on, each as small as it goes
SETTINGS = {"sharpness_eps": [1e-3], "sharpness_subspace_dim": 5, "sharpness_max_iter": 2, "adaptive_rho": 0.01,
            "hessian_top_k": 2, "hessian_max_hvp": 12, "hessian_trace_probes": 2, "noise_scale_batches": 3,
            "curve_directions": 2, "curve_points": 5, "surface_points": 3, "interpolation_points": 5}
FAST = [a for k, v in SETTINGS.items() for a in ("--set", f"measure.{k}={json.dumps(v)}")]


def _arrays(n_train=120, n_test=60, d=6, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n_train + n_test, d)).astype("float32")
    y = ((x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5)).astype("int64")  # 3 classes
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with the user's model file, an npz data set and an untrained checkpoint of nets.py:mlp."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NETS)
    np.savez(tmp_path / "data.npz", **_arrays())
    ds = plugins.load_user_data("npz", "data.npz", tmp_path)
    for name in ("mlp", "plain", "deeper", "bad_output"):
        net = plugins.build_model(f"nets.py:{name}", tmp_path, ds.input_shape, ds.num_classes, {}, seed=0)
        torch.save(net.state_dict(), tmp_path / f"{name}.pt")
    return tmp_path


def _measure(argv, capsys=None):
    assert main(["measure", *argv]) == 0, capsys.readouterr().err if capsys else ""
    return json.loads((_out(argv) / "measures.json").read_text())


def _out(argv):
    from pathlib import Path

    return Path(argv[argv.index("--out") + 1])


def _trained(work, name: str, seed: int = 0):
    ds = plugins.load_user_data("npz", "data.npz", work)
    model = plugins.build_model(f"nets.py:{name}", work, ds.input_shape, ds.num_classes, {}, seed=seed)
    run_dir = work / f"trained-{name}-{seed}"
    train(model, ds.train, ds.test, TrainConfig(epochs=2, lr=1e-2), 16, seed=seed, run_dir=run_dir)
    return model, ds, run_dir / "model.pt"


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-6, atol=0)


def test_measures_equal_the_notebook_api(work, capsys):
    """A checkpoint written by train(run_dir=...): every number equals the library's on the same model."""
    model, ds, ckpt = _trained(work, "mlp")
    doc = _measure([str(ckpt), "--model", "nets.py:mlp", "--data", "data.npz", "--out", "m", *FAST], capsys)
    assert (work / "m" / "report.md").exists()
    assert {p.name for p in (work / "m" / "figures").iterdir()} == {"loss_curves.png", "loss_surface.png"}
    assert doc["schema"] == 1 and doc["threads"] == 1 and doc["seed"] == 0 and doc["parametric"] is None
    assert doc["checkpoint"]["sha256"] == plugins.sha256_file(ckpt)
    assert (doc["model"]["spec"] == "nets.py:mlp"
            and doc["model"]["source_sha256"] == plugins.sha256_file(work / "nets.py"))
    assert doc["data"]["info"]["file_sha256"] == plugins.sha256_file(work / "data.npz")
    assert doc["measure"]["sharpness_max_iter"] == 2

    data, common = (ds.train.x, ds.train.y), {"batch_size": 1000, "bn": "eval"}
    for split in ("train", "test"):
        m = evaluate(model, getattr(ds, split), **common)
        close(doc[split]["loss"], m.loss)
        assert doc[split]["accuracy"] == m.accuracy
    geo = doc["geometry"]
    full, sub = (eps_sharpness(model, data, eps=1e-3, subspace_dim=dim, max_iter=2, seed=0, **common)
                 for dim in (None, 5))
    close([s["value"] for s in geo["sharpness"]], [full.value, sub.value])
    close(geo["adaptive_sharpness"]["value"], adaptive_sharpness(model, data, rho=0.01, max_iter=2, **common).value)
    close(geo["hessian_eigenvalues"]["eigenvalues"],
          hessian_eigenvalues(model, data, k=2, max_hvp=12, seed=0, **common).eigenvalues)
    shared = batchgap.density_and_trace(model, data, n_vectors=4, steps=20, trace_probes=2, seed=0, **common)[1]
    close([geo["hessian_trace"][k] for k in ("value", "ci_low", "ci_high")],  # the trace shares the density's HVPs
          [shared.value, shared.ci_low, shared.ci_high])
    assert geo["hessian_trace"]["hvps"] == 2 and "spectral density" in geo["hessian_trace"]["method"]
    noise = exact_gradient_noise_scale(model, data, **common)  # exact: per-example norms in closed form
    for key in ("b_simple", "sq_norm_small", "grad_norm_sq"):
        close(geo["noise_scale"][key], getattr(noise, key))
    # the generalization measures (issue 15), each as the notebook call gives it

    close(geo["norms"]["fisher_rao_norm"], batchgap.norm_measures(model, data, **common).fisher_rao_norm)
    avg = batchgap.average_sharpness(model, data, sigma=0.1, magnitude_aware=True, n_samples=8, seed=0, **common)
    close(geo["average_sharpness_mag"]["value"], avg.value)
    pac = batchgap.pac_bayes_flatness(model, data, delta=0.1, n_samples=8, seed=0, rtol=0.02, **common)
    assert abs(geo["pac_bayes"]["sigma"] / pac.sigma - 1) <= 0.021  # same crossing; the study starts elsewhere
    dens = batchgap.hessian_density(model, data, n_vectors=4, steps=20, seed=0, **common)
    close(geo["density"]["lambda_max"], dens.lambda_max)
    close([geo["density"][k] for k in ("trace", "trace_ci_low", "trace_ci_high")],
          [dens.trace, dens.trace_ci_low, dens.trace_ci_high])  # the default's 4 vectors: a trace with its interval
    md = (work / "m" / "report.md").read_text()
    assert "PAC-Bayes flatness 1/σ², loss target (loss rise ≤ δ = 0.1)" in md and "Fisher-Rao norm" in md
    assert "Hessian spectrum" in md and "Hessian trace (SLQ start vectors)" in md
    alphas = np.linspace(-1, 1, 5)
    for k in range(2):
        curve = loss_curve(model, filter_normalized_direction(model, seed=k), data, alphas, **common)
        close(geo["curves"]["loss"][k], curve.loss)
    grid = np.linspace(-1, 1, 3)
    d1, d2 = (filter_normalized_direction(model, seed=s) for s in (500, 501))
    close(geo["surface"]["loss"], loss_surface(model, d1, d2, data, grid, grid, **common).loss)


def test_a_study_run_directory_is_a_checkpoint(tmp_path, mnist1d_dir, monkeypatch, capsys):
    """Model and data from the run's config.json; the numbers are the study's own."""
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    monkeypatch.chdir(tmp_path)
    small = [a for kv in ("sharpness_subspace_dim=0", "adaptive_rho=0", "hessian_top_k=0", "hessian_trace_probes=0",
                          "noise_scale_batches=0", "curve_directions=1", "curve_points=3", "sharpness_max_iter=2",
                          "sharpness_eps=[1e-3]") for a in ("--set", f"measure.{kv}")]
    study = ["--set", "seeds=[0]", "--set", "train.epochs=1", "--set", "data.train_subset=200", "--set",
             "data.test_subset=100", "--set", "measure.surface_points=0", "--set", "measure.interpolation_points=3"]
    assert main(["run", "default", "--quick", "--out", "out", "--jobs", "1", *study, *small, "--no-report"]) == 0
    first = json.loads((tmp_path / "out" / "plan.json").read_text())["runs"][0]["id"]
    result = json.loads((tmp_path / "out" / "runs" / first / "result.json").read_text())
    capsys.readouterr()
    doc = _measure([f"out/runs/{first}", "--out", "m", *small, "--set", "measure.surface_points=3"], capsys)
    assert doc["test"]["accuracy"] == result["test"]["accuracy"]
    assert doc["geometry"]["sharpness"][0]["value"] == result["geometry"]["sharpness"][0]["value"]
    assert doc["checkpoint"]["run"]["id"] == first and doc["seed"] == 0 and doc["model"]["name"] == "mlp"
    assert doc["data"]["subset"]["train"]["n"] == 200  # the run's --quick subset, from its config.json
    assert (tmp_path / "m" / "figures" / "loss_surface.png").exists()


def test_a_run_of_your_own_model_and_data_is_found_from_anywhere(work, monkeypatch, capsys):
    """A run of a study with nets.py and data.npz: the files are found beside the study file (OUT/study.json's root)."""
    measure = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SETTINGS.items())
    (work / "mine.toml").write_text(f"""name = "mine"\nseeds = [0]\n[data]\nname = "npz"\npath = "data.npz"\n
[model]\nname = "nets.py:mlp"\n[train]\nepochs = 1\n[[regimes]]\nname = "SB"\nbatch_size = 16\n"""
        f"[measure]\n{measure}\n")
    assert main(["run", "mine.toml", "--out", "out", "--jobs", "1", "--no-report"]) == 0
    run = json.loads((work / "out" / "plan.json").read_text())["runs"][0]["id"]
    result = json.loads((work / "out" / "runs" / run / "result.json").read_text())
    (work / "elsewhere").mkdir()
    monkeypatch.chdir(work / "elsewhere")
    capsys.readouterr()
    doc = _measure([f"../out/runs/{run}", "--out", "m", *FAST], capsys)
    assert doc["model"]["spec"] == "nets.py:mlp" and doc["data"]["info"]["file"] == "data.npz"
    assert doc["test"] == result["test"]
    assert [s["value"] for s in doc["geometry"]["sharpness"]] == [s["value"] for s in result["geometry"]["sharpness"]]


def test_compare_draws_the_parametric_plot_between_two_checkpoints(work, capsys):
    """alpha = 0 is checkpoint A itself, alpha = 1 checkpoint B (a model without BatchNorm)."""
    _, ds, a = _trained(work, "plain", seed=0)
    model_b, _, b = _trained(work, "plain", seed=1)
    doc = _measure([str(a), "--compare", str(b), "--model", "nets.py:plain", "--data", "data.npz", "--out", "m", *FAST],
                   capsys)
    p = doc["parametric"]
    assert doc["compare"]["sha256"] == plugins.sha256_file(b) and "x_A" in p["protocol"]["formula"]
    assert len(p["alphas"]) == 7  # 5 points on [-1, 2], and 0 and 1 added
    close(p["train"]["loss"][p["alphas"].index(0.0)], doc["train"]["loss"])
    close(p["test"]["loss"][p["alphas"].index(0.0)], doc["test"]["loss"])
    close(p["train"]["loss"][p["alphas"].index(1.0)], evaluate(model_b, ds.train, batch_size=1000, bn="eval").loss)
    assert (work / "m" / "figures" / "parametric_plot.png").exists()
    assert "parametric_plot.png" in (work / "m" / "report.md").read_text()


def test_a_built_in_model_on_a_built_in_data_set(tmp_path, mnist1d_dir, monkeypatch, capsys):
    from batchgap import init_model

    monkeypatch.chdir(tmp_path)
    net = init_model("mlp", (40,), 10, seed=3, bn="batch", width=16, depth=1)
    torch.save(net.state_dict(), tmp_path / "mlp.pt")
    doc = _measure(["mlp.pt", "--model", "mlp", "--options", '{"width": 16, "depth": 1}', "--bn", "batch", "--data",
                    "mnist1d", "--data-dir", str(mnist1d_dir), "--out", "m", *FAST,
                    "--set", "measure.geometry_examples=100", "--seed", "4"], capsys)
    assert doc["model"] == {"name": "mlp", "options": {"width": 16, "depth": 1}, "bn": "batch"}
    assert doc["seed"] == 4 and doc["geometry"]["data"] == "training subset of 100 examples (seed 10004)"
    assert doc["data"]["dataset"] == "mnist1d" and doc["data"]["train_examples"] == 4000


def test_a_pickled_module_with_trust_pickle(work, capsys):
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    torch.save(net, work / "whole.pt")
    doc = _measure(["whole.pt", "--trust-pickle", "--data", "nets.py:load", "--out", "m", "--threads", "2", *FAST],
                   capsys)
    assert doc["checkpoint"]["format"] == "pickled module" and doc["threads"] == 2
    assert doc["data"]["info"]["source"] == "nets.py:load" and "loader_source_sha256" in doc["data"]["info"]
    assert doc["model"]["name"] == "torch.nn.modules.container.Sequential"
    test = (torch.as_tensor(_arrays()["x_test"]), torch.as_tensor(_arrays()["y_test"]))
    assert doc["test"]["loss"] == pytest.approx(evaluate(net, test).loss, rel=1e-6)
    assert torch.get_num_threads() == 1  # --threads holds while measuring, then the process's own count is back


def _npz(name, **changes):
    def make(t):
        arrays = {**_arrays(), **changes}
        np.savez(t / name, **{k: v for k, v in arrays.items() if v is not None})
        return name
    return make


def _bad_labels(t):
    a = _arrays()
    a["y_train"][0] = -1
    np.savez(t / "neg.npz", **a)
    return "neg.npz"


def _nan(t):
    a = _arrays()
    a["x_test"][3, 2] = np.nan
    np.savez(t / "nan.npz", **a)
    return "nan.npz"


def _file(name, text):
    def make(t):
        (t / name).write_text(text)
        return name
    return make


def _pickled(t):
    torch.save(nn.Sequential(nn.Linear(6, 3)), t / "whole.pt")
    return "whole.pt"


def _args(ckpt="mlp.pt", model="nets.py:mlp", data="data.npz", *more):
    return [ckpt] + (["--model", model] if model else []) + (["--data", data] if data else []) + list(more)


BAD = [
    ("module does not import",
     lambda t: _args("mlp.pt", _file("broken.py", "raise RuntimeError('boom')\n")(t) + ":mlp"),
     "does not import"),
    ("module not found", lambda t: _args(model="no_such_module_xyz:mlp"), "does not import"),
    ("missing attribute", lambda t: _args(model="nets.py:nope"), "has no attribute 'nope'"),
    ("attribute not callable", lambda t: _args(model="nets.py:WIDTH"), "is not callable"),
    ("factory raises", lambda t: _args(model="nets.py:raises"), "raised ValueError: no model today"),
    ("output not (batch, num_classes)", lambda t: _args("bad_output.pt", "nets.py:bad_output"), "logits of shape"),
    ("data file missing", lambda t: _args(data="missing.npz"), "no such file"),
    ("data lacks an array", lambda t: _args(data=_npz("three.npz", y_test=None)(t)), "missing y_test"),
    ("labels not integers", lambda t: _args(data=_npz("float.npz", y_train=_arrays()["y_train"] + 0.5)(t)),
     "integer class labels"),
    ("labels below 0", lambda t: _args(data=_bad_labels(t)), "labels must lie in [0, 3)"),
    ("labels beyond --num-classes", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--num-classes", "2"),
     "labels must lie in [0, 2)"),
    ("NaN inputs", lambda t: _args(data=_nan(t)), "NaN or infinite"),
    ("train and test shapes differ", lambda t: _args(data=_npz("shapes.npz", x_test=_arrays()["x_test"][:, :5])(t)),
     "differ in shape"),
    ("state_dict keys do not fit", lambda t: _args("deeper.pt"), "unexpected: 6.weight, 6.bias"),
    ("state_dict shapes do not fit", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--options", '{"width": 4}'),
     "shape mismatch: 1.weight (8, 6) in the checkpoint, (4, 6) in the model"),
    ("--compare does not fit", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--compare", "deeper.pt"),
     "--compare deeper.pt: the state_dict does not fit"),
    ("pickled module without --trust-pickle", lambda t: _args(_pickled(t), None), "pass --trust-pickle"),
    ("checkpoint missing", lambda t: _args("nothere.pt"), "no such file"),
    ("checkpoint not a torch file", lambda t: _args(_file("junk.pt", "hello")(t)), "not a torch checkpoint"),
    ("folder that is not a run", lambda t: _args(str(t)), "not a study's run directory"),
    ("--model missing for a state_dict", lambda t: _args(model=None), "--model: missing"),
    ("--data missing", lambda t: _args(data=None), "--data: missing"),
    ("unknown built-in model", lambda t: _args(model="mlpp"), "did you mean \"mlp\""),
    ("unknown data set", lambda t: _args(data="mnist1e"), "unknown data set 'mnist1e'"),
    ("--options not JSON", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--options", "{width: 4}"),
     "--options: not JSON"),
    ("--set outside measure", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--set", "train.epochs=3"),
     "only measure.KEY"),
    ("--set unknown measure key",
     lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--set", "measure.sharpnes_eps=[1]"),
     "did you mean \"sharpness_eps\""),
    ("--set bad value", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--set", "measure.sharpness_max_iter=0"),
     "measure.sharpness_max_iter: must be at least 1"),
    # default 100 > 75 parameters
    ("subspace larger than the model", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz"),
     "measure.sharpness_subspace_dim: 100 is more than the model's"),
    ("--threads 0", lambda t: _args("mlp.pt", "nets.py:mlp", "data.npz", "--threads", "0"),
     "--threads: must be at least 1"),
]


@pytest.mark.parametrize("name,argv,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(name, argv, needle, work, capsys):
    out = work / "never"
    fast = [] if "subspace" in name else FAST  # before the case's own --set: the last one wins
    try:
        rc = main(["measure", *fast, *argv(work), "--out", str(out)])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not out.exists()


def test_the_report_reads_the_schema_the_command_writes(work, capsys):
    from batchgap import measure_cmd
    from batchgap.report import measures as report

    assert (report.SCHEMA, report.MEASURES) == (measure_cmd.SCHEMA, measure_cmd.MEASURES)
    _measure([*_args(), *FAST, "--out", "m", "--no-report"], capsys)
    assert not (work / "m" / "report.md").exists()
    doc = json.loads((work / "m" / "measures.json").read_text())
    (work / "m" / "measures.json").write_text(json.dumps({**doc, "schema": 99}))
    with pytest.raises(UserError, match="schema 99"):
        report.write_measures_report(work / "m")


def test_out_that_is_a_file_is_refused(work, capsys):
    (work / "taken").write_text("mine")
    assert main(["measure", *_args(), *FAST, "--out", "taken"]) == 2
    assert "is a file" in capsys.readouterr().err and (work / "taken").read_text() == "mine"
