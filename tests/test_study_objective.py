"""Issue 25, the study machinery through an objective: a study file names a model factory, a loader of dict
batches and ``[objective] name``; training, evaluation and the measures read every batch through it."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batchgap.cli import main
from batchgap.config import TrainConfig, load_study
from batchgap.data import DictData, TensorData
from batchgap.landscape.objective import pair_objective
from batchgap.train import train

LM = '''
import torch
from torch import nn


def load():
    g = torch.Generator().manual_seed(0)
    ids = {s: torch.randint(0, 5, (n, 7), generator=g) for s, n in (("train", 24), ("test", 8))}
    return {s: {"input_ids": x, "labels": x.clone()} for s, x in ids.items()}


class Bigram(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(input_ids)))


def bigram(input_shape, num_classes, width=4):
    return Bigram(num_classes, width)


def token_loss(model, batch):
    logits = model(input_ids=batch["input_ids"])[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             reduction="none")


CONST = 3
'''

STUDY = '''name = "lm"
seeds = [0, 1]
[data]
name = "lm.py:load"
[model]
name = "lm.py:bigram"
[objective]
name = "huggingface-causal-lm"
[train]
epochs = 2
lr = 0.05
[measure]
sharpness_subspace_dim = 4
sharpness_max_iter = 2
hessian_max_hvp = 4
hessian_trace_probes = 2
curve_directions = 1
curve_points = 3
surface_points = 3
interpolation_points = 3
density_vectors = 2
density_steps = 3
flatness_samples = 2
adaptive_points = 8
[[regimes]]
name = "SB"
batch_size = 4
[[regimes]]
name = "LB"
batch_size = 12
'''


@pytest.fixture
def lm_study(tmp_path):
    (tmp_path / "lm.py").write_text(LM)
    (tmp_path / "study.toml").write_text(STUDY)
    return tmp_path / "study.toml"


def _hand_token_loss(model, ids: torch.Tensor) -> float:
    """Mean cross-entropy of every next token, written out: -log softmax(logits_t)[ids_{t+1}] over all t."""
    with torch.no_grad():
        logits = model(input_ids=ids)
        logp = logits[:, :-1].log_softmax(-1).double()
        picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(-picked.sum() / picked.numel())


def _numbers(doc):
    return [{k: v for k, v in r.items() if k not in ("wall_time_s", "measure_time_s")} for r in doc["runs"]]


def test_a_dict_batch_study_trains_and_measures_through_its_objective(lm_study, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(lm_study), "--out", str(out), "--jobs", "1"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["regime"] for r in doc["runs"]] == ["SB", "LB", "SB", "LB"] and len(doc["pairs"]) == 2
    assert doc["study"]["objective"] == {"name": "huggingface-causal-lm", "unit": ""}
    run = doc["runs"][0]
    # units are tokens: 24 windows of 7 tokens score 6 next tokens each
    assert run["train"]["n"] == 24 * 6 and run["test"]["n"] == 8 * 6
    assert run["eval_protocol"]["unit"] == "token"
    geo = run["geometry"]
    for key in ("sharpness", "hessian_eigenvalues", "hessian_trace", "noise_scale", "norms", "average_sharpness",
                "pac_bayes", "density", "adaptive_sharpness"):
        entry = geo[key][0] if isinstance(geo[key], list) else geo[key]
        proto = entry.get("protocol", entry)
        assert proto["unit"] == "token" and "causal" in proto["objective"], key
    assert geo["noise_scale"]["n"] == 24 * 6  # exact, every token's gradient
    # the measured losses are the model's next-token cross-entropy, computed here by hand from the checkpoint
    sys_path = str(lm_study.parent)
    import sys
    sys.path.insert(0, sys_path)
    try:
        import importlib.util
        spec = importlib.util.spec_from_file_location("lm_here", lm_study.parent / "lm.py")
        lm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lm)
    finally:
        sys.path.remove(sys_path)
    data = lm.load()
    for r in doc["runs"]:
        model = lm.bigram((7,), 5)
        model.load_state_dict(torch.load(out / r["checkpoint"], weights_only=True))
        assert r["train"]["loss"] == pytest.approx(_hand_token_loss(model, data["train"]["input_ids"]), rel=1e-6)
        assert r["test"]["loss"] == pytest.approx(_hand_token_loss(model, data["test"]["input_ids"]), rel=1e-6)
    # the same command again: every run found finished, the same numbers
    assert main(["run", str(lm_study), "--out", str(out), "--jobs", "1"]) == 0
    assert _numbers(json.loads((out / "results.json").read_text())) == _numbers(doc)
    # --jobs 2 in a fresh directory: the same runs, the same numbers
    out2 = tmp_path / "out2"
    assert main(["run", str(lm_study), "--out", str(out2), "--jobs", "2"]) == 0
    assert _numbers(json.loads((out2 / "results.json").read_text())) == _numbers(doc)


def test_the_objective_is_part_of_a_runs_id(lm_study):
    from batchgap.study import check_study

    ids = [r.id for r in check_study(load_study(lm_study))[1]]
    mine = [r.id for r in check_study(load_study(lm_study, sets=['objective.name="lm.py:token_loss"',
                                                                 'objective.unit="token"']))[1]]
    assert len(set(ids)) == 4 and not set(ids) & set(mine)


def test_the_default_objective_leaves_the_study_and_its_ids_as_they_were():
    from batchgap.plan import plan
    from batchgap.studies import find_study

    cfg = load_study(find_study("default"))
    assert "objective" not in cfg.to_dict()
    named = load_study(find_study("default"), sets=['objective.name="cross-entropy"'])
    assert [r.id for r in plan(named, 4000)] == [r.id for r in plan(cfg, 4000)]


def test_training_through_the_pair_objective_is_todays_training_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g))
    cfg = TrainConfig(epochs=3, lr=0.01)
    models = []
    for objective in (None, pair_objective()):
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        res = train(net, data, data, cfg, 8, seed=2, fast_step=False, progress=False, objective=objective)
        models.append((net, [(h["batch_loss"], h["train_loss"], h["test_loss"]) for h in res.history]))
    (a, ha), (b, hb) = models
    assert ha == hb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_on_dict_data_weights_the_logged_loss_by_units():
    """The epoch's batch_loss is sum_b mean_b * weight_b / sum_b weight_b: here batches of unequal token counts
    (labels -100 left out), checked against the per-step losses recomputed by hand."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 4, (6, 5), generator=g)
    labels = ids.clone()
    labels[:3, 2:] = -100  # the first rows score fewer tokens
    data = DictData({"input_ids": ids, "labels": labels})

    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 4)

        def forward(self, input_ids):
            return self.emb(input_ids)

    from batchgap.landscape.objective import huggingface_objective
    obj = huggingface_objective(causal_lm=True)
    torch.manual_seed(0)
    net = Tok()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(epochs=1, lr=0.0, optimizer="sgd", momentum=0.0)  # lr 0: every step at the same weights
    res = train(net, data, None, cfg, 2, seed=0, progress=False, objective=obj)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    sums, counts = 0.0, 0
    for s in range(3):
        rows = perm[2 * s : 2 * s + 2]
        logits, lab = start["emb.weight"][ids[rows]][:, :-1], labels[rows][:, 1:]
        keep = lab != -100
        sums += float(F.cross_entropy(logits[keep], lab[keep], reduction="sum"))
        counts += int(keep.sum())
    assert res.history[0]["batch_loss"] == pytest.approx(sums / counts, rel=1e-6)


BAD = {
    "unknown ready name": ('objective.name="hugingface-causal-lm"', 'did you mean "huggingface-causal-lm"'),
    "not callable": ('objective.name="lm.py:CONST"', "lm.py:CONST is not callable"),
    "no such callable": ('objective.name="lm.py:nothing"', "has no attribute 'nothing'"),
    "unit for a ready one": ('objective.unit="token"', "objective.unit: only for an objective of your own"),
    "dict data, default objective": ('objective.name="cross-entropy"', "dict batches need an objective"),
    "a remedy with an objective": ('train.remedy="sam"', "remedies, ghost batches, augmentation"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_objective_input_is_one_line_and_writes_nothing(case, lm_study, tmp_path, capsys):
    setting, needle = BAD[case]
    out = tmp_path / "out"
    assert main(["run", str(lm_study), "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_dict_loader_with_ragged_columns_is_refused(tmp_path, capsys):
    (tmp_path / "lm.py").write_text(LM.replace('"labels": x.clone()', '"labels": x[:-1].clone()'))
    (tmp_path / "study.toml").write_text(STUDY)
    assert main(["run", str(tmp_path / "study.toml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "columns must have one row per example" in err and err.count("\n") == 1
    assert not Path(tmp_path / "out").exists()
