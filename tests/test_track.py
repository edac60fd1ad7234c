"""batchgap.track (issue 25): measures from inside a training loop, against exact oracles; training untouched
bit for bit; budgets respected; JSONL records that survive a kill; sinks; `batchgap report TRACK.jsonl`."""
import json
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import batchgap
from batchgap.cli import main
from batchgap.track.dataset import measurement_set
from batchgap.tracklog import read_records

ROOT = Path(__file__).resolve().parent.parent


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def pair(n=40, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def exact_hessian(model, x, y):
    """torch.func.hessian of the mean cross-entropy in the flat parameter vector (the oracle)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    return torch.func.hessian(f)(flat)


def test_eigenvalues_match_the_exact_hessian_and_the_warm_start_is_cheaper(tmp_path):
    model = mlp(dtype=torch.float64)
    x, y = pair(dtype=torch.float64)
    tracker = batchgap.track(model, (x, y), every=1, measures=["lambda_max", "hessian_top", "trace"],
                             options={"hessian_top": {"k": 2, "tol": 1e-10, "max_hvp": 60},
                                      "lambda_max": {"tol": 1e-10, "max_hvp": 60}, "trace": {"n_probes": 30}})
    first, second = tracker.measure(1), tracker.measure(2)  # the same parameters twice
    H = exact_hessian(model, x, y)
    top = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    for rec in (first, second):
        assert rec["measures"]["lambda_max"]["value"] == pytest.approx(top[0], rel=1e-8)
        assert np.allclose(rec["measures"]["hessian_top"]["eigenvalues"], top, rtol=1e-8)
        tr = rec["measures"]["trace"]
        assert abs(tr["value"] - float(torch.trace(H))) <= 4 * tr["stderr"] and tr["n_probes"] == 30
    for name in ("lambda_max", "hessian_top"):
        assert (first["measures"][name]["start"], second["measures"][name]["start"]) == ("cold", "warm")
        assert second["measures"][name]["lanczos_steps"] < first["measures"][name]["lanczos_steps"]
        assert "from the previous measurement's" in second["measures"][name]["method"]


def train(model, data, steps, tracker=None):
    """SGD with momentum on shuffled batches (global RNG) through dropout; tracking between backward and step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=8, shuffle=True)
    losses, it = [], iter(loader)
    model.train()
    for _ in range(steps):
        xb, yb = next(it)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        if tracker is not None:
            tracker.step()  # .grad is live here: the measurement must not touch it
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def bn_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def test_training_with_tracking_is_bitwise_the_same_as_without(tmp_path):
    data = pair(n=48)
    torch.manual_seed(7)
    plain_model = bn_net()
    torch.manual_seed(7)
    plain = train(plain_model, data, 6)
    tracked_model = bn_net()
    torch.manual_seed(7)
    tracker = batchgap.track(tracked_model, data, every=2, subset=16, out=tmp_path / "t.jsonl",
                             measures=["loss", "lambda_max", "trace", "eps_sharpness", "noise_scale"],
                             options={"trace": {"n_probes": 4}, "eps_sharpness": {"max_iter": 2},
                                      "lambda_max": {"max_hvp": 5}})
    tracked = train(tracked_model, data, 6, tracker)
    tracker.close()
    assert torch.equal(plain, tracked)
    for (n, a), (_, b) in zip(plain_model.state_dict().items(), tracked_model.state_dict().items()):
        assert torch.equal(a, b), n
    records = read_records(tmp_path / "t.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(set(r["measures"]) == {"loss", "lambda_max", "trace", "eps_sharpness", "noise_scale"} for r in records)
    assert records[0]["measurement_set"]["rows"] == 16 and records[0]["measures"]["loss"]["n"] == 16


def test_the_hvp_budget_caps_lanczos_and_probes_and_skips_what_cannot_run():
    model, data = mlp(), pair()
    t = batchgap.track(model, data, measures=["lambda_max", "trace"], budget={"hvps": 20},
                       options={"lambda_max": {"tol": 0.0, "max_hvp": 6}, "trace": {"n_probes": 30}})
    rec = t.measure(1)
    lam, tr = rec["measures"]["lambda_max"], rec["measures"]["trace"]
    assert lam["hvps"] == 7 and lam["lanczos_steps"] == 6  # 6 steps + 1 residual product
    assert tr["n_probes"] == 13 and tr["n_probes_asked"] == 30 and tr["hvps"] == 13
    assert rec["budget"]["hvps_used"] == 20 == rec["budget"]["hvps"]
    t = batchgap.track(model, data, measures=["lambda_max", "trace"], budget={"hvps": 12},
                       options={"lambda_max": {"tol": 0.0, "max_hvp": 50}})
    rec = t.measure(1)
    assert rec["measures"]["lambda_max"]["hvps"] == 12 and rec["budget"]["hvps_used"] == 12
    assert "trace" not in rec["measures"] and "HVP budget: 0 of 12" in rec["skipped"]["trace"]


def test_the_seconds_budget_skips_a_measure_between_measures(monkeypatch):
    """A fake clock (each reading one second later): no wall time in the test."""
    clock = iter(range(10_000))
    tracker_module = sys.modules["batchgap.track.tracker"]  # batchgap.track is the function
    monkeypatch.setattr(tracker_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    t = batchgap.track(mlp(), pair(), measures=["loss", "lambda_max"], budget={"seconds": 3.5})
    rec = t.measure(1)
    assert "loss" in rec["measures"] and "seconds budget spent" in rec["skipped"]["lambda_max"]
    assert rec["budget"]["seconds_used"] > 3.5 and rec["budget"]["over"] and "ran past" in rec["budget"]["note"]


def test_a_file_cut_mid_line_reads_whole_records_and_appending_repairs_it(tmp_path):
    path = tmp_path / "run.jsonl"
    with batchgap.track(mlp(), pair(), every=1, measures=["loss"], out=path) as t:
        t.measure(1), t.measure(2)
    whole = path.read_text()
    path.write_text(whole + whole.splitlines()[0][:37])  # a kill in the middle of the third line
    with pytest.warns(UserWarning, match="partial last line"):
        assert [r["step"] for r in read_records(path)] == [1, 2]
    with pytest.warns(UserWarning, match="cut a partial last line"):
        t = batchgap.track(mlp(), pair(), measures=["loss"], out=path, append=True)
    t.measure(3)
    t.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_records(path)] == [1, 2, 3]


def one_shot():
    yield pair(8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(every=0), ValueError, "every must be a positive"),
    (dict(every=2.5), ValueError, "every must be a positive"),
    (dict(budget={"hvps": 0}), ValueError, r"budget\['hvps'\] must be a positive"),
    (dict(budget={"seconds": -1.0}), ValueError, r"budget\['seconds'\] must be a positive"),
    (dict(budget=50), TypeError, "budget must be None or a dict"),
    (dict(budget={"probes": 5}), ValueError, "allowed: hvps, seconds"),
    (dict(measures=["lambda"]), ValueError, "unknown measure 'lambda'; allowed: loss, lambda_max, hessian_top"),
    (dict(options={"trace": {"n": 3}}, measures=["trace"]), ValueError, "allowed: n_probes"),
    (dict(data=one_shot()), TypeError, "one-shot iterator .* subset=N"),
    (dict(sinks=["mlflow"]), ValueError, "unknown sink 'mlflow'; allowed: jsonl, tensorboard, wandb"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, kwargs, error, match):
    args = dict(model=mlp(), data=pair(), out=tmp_path / "t.jsonl") | kwargs
    with pytest.raises(error, match=match):
        batchgap.track(**args)
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("sink, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_sink_whose_package_is_missing_names_the_extra(tmp_path, monkeypatch, sink, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    with pytest.raises(ValueError, match=rf"needs the {sink} package.*pip install batchgap\[{sink}\]"):
        batchgap.track(mlp(), pair(), out=tmp_path / "t.jsonl", sinks=[sink])
    assert not (tmp_path / "t.jsonl").exists()


def test_an_existing_file_is_refused_unless_appending(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("keep\n")
    with pytest.raises(ValueError, match="exists: pass append=True"):
        batchgap.track(mlp(), pair(), out=path)
    assert path.read_text() == "keep\n"


def test_the_measurement_set_is_a_seeded_subset_drawn_once():
    x, y = pair(40)
    (xs, ys), info = measurement_set((x, y), 10, seed=5)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:10].sort().values
    assert torch.equal(xs, x[idx]) and torch.equal(ys, y[idx]) and info["rows"] == 10 and info["seed"] == 5
    assert measurement_set((x, y), 10, seed=6)[1]["indices_sha256"] != info["indices_sha256"]
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    loader, info2 = measurement_set(shuffled, 10, seed=5)
    got = [b for b in loader]
    assert torch.equal(torch.cat([b[0] for b in got]), x[idx]) and info2["indices_sha256"] == info["indices_sha256"]
    kept, info3 = measurement_set(iter([(x[:8], y[:8]), (x[8:16], y[8:16])]), 12, seed=0)
    assert torch.equal(torch.cat([b[0] for b in kept]), x[:12]) and "first 12 rows" in info3["selection"]


def test_tensorboard_sink_writes_each_value_at_its_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with batchgap.track(mlp(), pair(), every=1, measures=["loss"], out=tmp_path / "t.jsonl",
                        sinks=["jsonl", "tensorboard"]) as t:
        recs = [t.measure(1), t.measure(5)]
    acc = EventAccumulator(str(tmp_path / "t-tensorboard"))
    acc.Reload()
    events = acc.Scalars("batchgap/loss")
    assert [(e.step, e.value) for e in events] == [(r["step"], pytest.approx(r["measures"]["loss"]["value"]))
                                                   for r in recs]


def test_wandb_sink_logs_into_an_offline_run(tmp_path, monkeypatch):
    """The real wandb, offline, in a tmp dir; what reaches ``run.log`` is recorded on the way through (the offline
    writer flushes its file asynchronously, so the file's content is no deterministic oracle)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(dir=str(tmp_path), project="batchgap-test")
    logged, log = [], run.log
    monkeypatch.setattr(run, "log", lambda values, step=None, **kw: (logged.append((values, step)),
                                                                     log(values, step=step, **kw)))
    try:
        with batchgap.track(mlp(), pair(), measures=["loss", "lambda_max"], sinks=["wandb"]) as t:
            rec = t.measure(3)
    finally:
        run.finish()
    assert logged == [({"batchgap/loss": rec["measures"]["loss"]["value"],
                        "batchgap/lambda_max": rec["measures"]["lambda_max"]["value"]}, 3)]
    assert list(tmp_path.rglob("*.wandb"))  # the offline run's log file


def test_report_draws_two_runs_with_their_protocol(tmp_path, capsys):
    paths = []
    for label, seed in (("SB", 0), ("LB", 1)):
        model, data = mlp(seed), pair()
        with batchgap.track(model, data, every=1, measures=["loss", "lambda_max"], out=tmp_path / f"{label}.jsonl",
                            options={"lambda_max": {"max_hvp": 8}}) as t:
            for step in (1, 2):
                with torch.no_grad():
                    model[0].weight.mul_(1.1)
                t.maybe_measure(step)
        paths.append(str(tmp_path / f"{label}.jsonl"))
    assert main(["report", *paths, "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "SB.md").read_text()
    assert (tmp_path / "rep" / "SB.png").stat().st_size > 1000
    assert re.search(r"\| SB \| lambda_max \| 2 \|", md) and re.search(r"\| LB \| loss \| 2 \|", md)
    assert "unit=example" in md and "Lanczos" in md and "data [LB]: 40 rows" in md
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    with open(paths[1], "a") as f:
        f.write('{"schema": "batchgap-track/1", "run": "LB", "st')  # a kill mid-line
    assert main(["report", *paths, "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("batchgap: warning: ") and "skipped a partial last line" in err and len(err.splitlines()) == 1
    assert re.search(r"\| LB \| loss \| 2 \|", (tmp_path / "rep" / "SB.md").read_text())


def doc_blocks(name: str) -> list[str]:
    page = (ROOT / "docs" / "track.md").read_text(encoding="utf8")
    return [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if b.startswith(f"# {name}")]


def test_the_loop_example_in_docs_track_md_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (block,) = doc_blocks("your own loop")
    exec(compile(block, "docs/track.md", "exec"), {})
    records = read_records(tmp_path / "track-sb.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    assert json.loads((tmp_path / "track-sb.jsonl").read_text().splitlines()[0])["measures"]["lambda_max"]["value"] > 0
    assert main(["report", "track-sb.jsonl", "track-lb.jsonl"]) == 0 and (tmp_path / "track-sb.png").exists()
