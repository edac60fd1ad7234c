"""Study configuration: loading, overrides, validation messages."""
import pytest
from hypothesis import given, settings, strategies as st

from batchgap.config import (
    config_hash, from_dict, load_study, parse_batch_size, parse_set,
)
from batchgap.errors import UserError
from batchgap.studies import find_study, regime_study_names

MINIMAL = {"name": "t", "regimes": [{"name": "SB", "batch_size": 8}, {"name": "LB", "batch_size": "25%"}]}


def study(**changes):
    raw = {**MINIMAL, **changes}
    return from_dict(raw)


def test_minimal_study_fills_defaults_and_inherits_train_per_regime():
    cfg = from_dict({**MINIMAL, "train": {"epochs": 7, "lr": 0.01},
                     "regimes": [{"name": "SB", "batch_size": 8},
                                 {"name": "LB", "batch_size": "25%", "lr_rule": "sqrt"}]})
    assert cfg.regime("SB").train.epochs == 7 and cfg.regime("LB").train.epochs == 7
    assert cfg.regime("LB").train.lr_rule == "sqrt" and cfg.regime("SB").train.lr_rule == "none"
    assert cfg.compare == ["SB", "LB"]
    assert cfg.to_dict()["regimes"][1] == {"name": "LB", "batch_size": "25%", "lr_rule": "sqrt"}


@pytest.mark.parametrize("raw, needle", [
    ({**MINIMAL, "train": {"epoch": 3}}, 'train.epoch: unknown key (did you mean "epochs"?)'),
    ({**MINIMAL, "train": {"epochs": "many"}}, "train.epochs: expected an integer"),
    ({**MINIMAL, "train": {"epochs": 0}}, "train.epochs: must be at least 1"),
    ({**MINIMAL, "train": {"lr": -1.0}}, "train.lr: must be greater than 0"),
    ({**MINIMAL, "train": {"optimizer": "adamw"}}, "train.optimizer: unknown value 'adamw'"),
    ({**MINIMAL, "train": {"lr_rule": "sqr"}}, 'did you mean "sqrt"'),
    ({**MINIMAL, "model": {"bn": "keras"}}, "model.bn: unknown value 'keras'"),
    ({**MINIMAL, "seeds": []}, "seeds: expected a non-empty list"),
    ({**MINIMAL, "seeds": [1, 1]}, "seeds: repeated seed"),
    ({**MINIMAL, "seeds": [0, -1]}, "seeds: expected a non-empty list of non-negative integers"),
    ({**MINIMAL, "regimes": []}, "regimes: expected at least one"),
    ({**MINIMAL, "regimes": [{"name": "SB"}]}, "regimes.SB.batch_size: missing"),
    ({**MINIMAL, "regimes": [{"name": "SB", "batch_size": 0}]}, "regimes.SB.batch_size: must be at least 1"),
    ({**MINIMAL, "regimes": [{"name": "SB", "batch_size": "150%"}]},
     "regimes.SB.batch_size: expected a positive integer or a percentage"),
    ({**MINIMAL, "regimes": [{"name": "SB", "batch_size": 8, "btach": 1}]}, "regimes.SB.btach: unknown key"),
    ({**MINIMAL, "regimes": [{"name": "A", "batch_size": 8}, {"name": "A", "batch_size": 9}]}, "repeated regime name"),
    ({**MINIMAL, "compare": ["SB", "XL"]}, "compare: unknown regime 'XL'"),
    ({**MINIMAL, "measure": {"interpolation_range": [2, 1]}}, "measure.interpolation_range"),
    ({**MINIMAL, "measure": {"hessian_trace_probes": 1}},
     "measure.hessian_trace_probes: expected 0 (off) or at least 2"),
    ({**MINIMAL, "measure": {"hessian_max_hvp": 0}}, "measure.hessian_max_hvp: must be at least 1"),
    ({**MINIMAL, "sedes": [1]}, 'sedes: unknown key (did you mean "seeds"?)'),
    ({**MINIMAL, "name": "has space"}, "name: expected a study name"),
    ({**MINIMAL, "data": {"train_subset": -3}}, "data.train_subset: must be at least 0"),
    ({**MINIMAL, "data": {"augment": "mixup"}}, "data.augment: unknown value 'mixup'"),
])
def test_bad_config_names_the_field(raw, needle):
    with pytest.raises(UserError) as e:
        from_dict(raw)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_percent_batch_sizes_resolve_against_the_training_set():
    from batchgap.plan import resolve_batch_size
    assert resolve_batch_size("10%", 4000) == 400
    assert resolve_batch_size("0.5%", 1000) == 5
    assert resolve_batch_size(32, 4000) == 32
    with pytest.raises(UserError, match="larger than the training set"):
        resolve_batch_size(5000, 4000)


def test_quick_does_not_hide_a_mistake_in_the_study_file(tmp_path, capsys):
    """Issue 13, fault 1: [quick] overrides train.epochs, but the file as written is checked first, so
    the smoke test refuses what the full run refuses (run and show alike, one line, exit 2)."""
    from batchgap.cli import main
    p = tmp_path / "s.toml"
    p.write_text('name = "s"\n[train]\nepochs = "ten"\n[[regimes]]\nname = "SB"\nbatch_size = 8\n'
                 '[[regimes]]\nname = "LB"\nbatch_size = 16\n')
    for quick in (False, True):
        with pytest.raises(UserError, match='train.epochs: expected an integer, got .ten.'):
            load_study(p, quick=quick)
    for cmd in (["show", str(p), "--quick"], ["run", str(p), "--quick", "--out", str(tmp_path / "out")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "train.epochs: expected an integer" in err
    assert not (tmp_path / "out").exists()
    # the overrides are checked too, after the file
    with pytest.raises(UserError, match="train.epochs: must be at least 1"):
        load_study({**MINIMAL, "quick": {"train.epochs": 0}}, quick=True)


def test_typed_sub_tables():
    """batch_schedule and init_from are dataclasses checked field by field; to_dict round-trips."""
    cfg = study(regimes=[{"name": "SB", "batch_size": 8},
                         {"name": "LB", "batch_size": 16,
                          "batch_schedule": {"kind": "switch", "small": 8, "switch_epoch": 2}},
                         {"name": "W", "batch_size": 16, "init_from": {"regime": "SB", "epoch": 1}}])
    assert cfg.regime("LB").train.batch_schedule.switch_epoch == 2 and cfg.regime("W").train.init_from.epoch == 1
    assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.to_dict()["regimes"][1]["batch_schedule"] == {"kind": "switch", "small": 8, "switch_epoch": 2}
    for bad, needle in (({"kind": "switch", "small": 1, "switch_epoch": 2}, "batch_schedule.small: must be at least 2"),
                        ({"kind": "switch", "small": 8, "epochs": 2}, "takes exactly kind, small, switch_epoch"),
                        ({"kind": "switch", "small": 8, "switch_epoch": 2, "x": 1}, "batch_schedule.x: unknown key")):
        with pytest.raises(UserError, match=needle):
            study(regimes=[{"name": "SB", "batch_size": 8, "batch_schedule": bad}])
    with pytest.raises(UserError, match="init_from.epoch: expected an integer"):
        study(regimes=[{"name": "SB", "batch_size": 8},
                       {"name": "W", "batch_size": 8, "init_from": {"regime": "SB", "epoch": "1"}}])


def test_choices_come_from_the_registries():
    """A remedy, augmentation or BN mode the registries hold is accepted, and the message lists theirs."""
    from batchgap.data.augment import AUGMENTATIONS
    from batchgap.remedies import STEPS
    for key, registry in (("remedy", STEPS), ("augment", AUGMENTATIONS)):
        with pytest.raises(UserError) as e:
            study(train={key: "nope"})
        assert all(name in str(e.value) for name in registry)


def test_set_overrides_parse_toml_values_and_address_regimes_by_name():
    cfg = load_study(dict(MINIMAL), ["train.epochs=5", 'regimes.LB.batch_size="50%"', "seeds=[3, 4]",
                                     "model.name=cnn1d", "regimes.LB.lr_rule=linear"])
    assert cfg.train.epochs == 5 and cfg.regime("LB").train.epochs == 5
    assert cfg.regime("LB").batch_size == "50%" and cfg.regime("LB").train.lr_rule == "linear"
    assert cfg.seeds == [3, 4] and cfg.model.name == "cnn1d"


@pytest.mark.parametrize("assignment, needle", [
    ("train.epochs", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("train.epochs=", "missing value"),
    ("seeds=[1,", "cannot read the value"),
])
def test_set_that_does_not_parse(assignment, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[")):
        parse_set(assignment)


def test_set_on_unknown_regime_suggests_the_closest():
    with pytest.raises(UserError, match='no regime named \'LBB\' \\(did you mean "LB"\\?\\)'):
        load_study(dict(MINIMAL), ["regimes.LBB.batch_size=3"])


def test_quick_shrinks_and_study_quick_table_wins():
    raw = {**MINIMAL, "seeds": [0, 1, 2, 3], "train": {"epochs": 50}, "quick": {"train.epochs": 4}}
    cfg = load_study(raw, quick=True)
    assert cfg.train.epochs == 4 and cfg.seeds == [0, 1]
    assert cfg.data.train_subset == 512
    assert load_study(raw).train.epochs == 50


@pytest.mark.parametrize("name", regime_study_names())
def test_every_builtin_study_validates_full_and_quick(name):
    full = load_study(find_study(name))
    quick = load_study(find_study(name), quick=True)
    assert full.name == name and len(full.regimes) >= 2
    # a smoke test's training is small: at most 12000 example-passes (3 epochs of 4000; the measures study
    # trains 30 epochs on 300 examples so that its runs fit the training set and the correlation has runs)
    assert quick.data.train_subset > 0 and quick.train.epochs * quick.data.train_subset <= 12_000


def test_builtin_default_is_the_paper_contrast():
    cfg = load_study(find_study("default"))
    assert cfg.data.name == "mnist1d" and len(cfg.seeds) >= 3
    assert cfg.regime("LB").batch_size == "10%" and cfg.regime("SB").batch_size == 32


def test_unknown_study_and_missing_file():
    with pytest.raises(UserError, match='did you mean "default"'):
        find_study("defualt")
    with pytest.raises(UserError, match="no such study file"):
        find_study("nowhere/x.toml")


def test_invalid_toml_file(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("name = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_study(p)


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


scalars = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.booleans(), st.none(), st.lists(st.integers(-2, 3), max_size=3))


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["train", "data", "model", "measure", "top", "regime"]),
       key=st.sampled_from(["epochs", "lr", "name", "bn", "batch_size", "seeds", "augment", "eval_batch_size",
                            "interpolation_points", "momentum", "zzz", "train_subset"]),
       value=scalars)
def test_loader_either_accepts_a_valid_study_or_raises_user_error(section, key, value):
    """Whatever one field holds, the loader gives a StudyConfig or a one-line UserError, never another exception."""
    raw = {**MINIMAL, "regimes": [dict(r) for r in MINIMAL["regimes"]]}
    if section == "top":
        raw[key] = value
    elif section == "regime":
        raw["regimes"][0][key] = value
    else:
        raw[section] = {key: value}
    try:
        cfg = from_dict(raw)
    except UserError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert all(isinstance(r.train.epochs, int) and r.train.epochs >= 1 for r in cfg.regimes)
    assert cfg.train.lr > 0


def test_parse_batch_size_rejects_bool():
    with pytest.raises(UserError):
        parse_batch_size(True, "x")


@pytest.mark.parametrize("raw, needle", [
    ({**MINIMAL, "model": {"name": "resnet"}}, "model.name: unknown value 'resnet'"),
    ({**MINIMAL, "data": {"name": "cifar"}}, "data.name: unknown value 'cifar'"),
])
def test_unknown_model_or_dataset_is_caught_at_load(raw, needle):
    with pytest.raises(UserError, match=needle):
        from_dict(raw)


EXPERIMENTS = ["batch-sweep", "warm-start", "sharpness-trajectory", "remedies", "noise-scale"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_has_the_papers_setting_under_paper_scale(name):
    small, paper = load_study(find_study(name)), load_study(find_study(name), paper_scale=True)
    assert (small.data.name, small.model.name) == ("mnist1d", "mlp")
    assert (paper.data.name, paper.model.name, paper.model.bn, paper.model.options) == ("cifar10", "C1", "batch", {})
    assert paper.train.epochs == 100 and paper.train.optimizer == "adam" and "CIFAR-10" in paper.description
    sizes = [r.batch_size for r in paper.regimes]
    assert paper.regime(paper.compare[0]).batch_size == 256 and 32 not in sizes
    assert all(e <= 100 for e in paper.measure.trajectory_epochs)


def test_paper_scale_batch_sweep_is_log_spaced_to_the_full_training_set():
    cfg = load_study(find_study("batch-sweep"), paper_scale=True)
    sizes = [r.batch_size for r in cfg.regimes]
    assert len(sizes) >= 7 and sizes[0] == 256 and sizes[-1] == "100%" and cfg.compare == ["B256", "B50000"]
    ints = sizes[:-1]
    assert all(b == 2 * a for a, b in zip(ints, ints[1:]))


def test_paper_scale_remedies_keep_updates_equal_and_scale_the_schedules():
    cfg = load_study(find_study("remedies"), paper_scale=True)
    sb_steps = 100 * (50000 // 256)
    lb = cfg.regime("LB-longer").train
    assert abs(lb.epochs * (50000 // 5000) - sb_steps) < 50000 // 5000
    assert cfg.regime("LB-dynamic-gradual").train.batch_schedule.small == 256
    assert cfg.regime("LB-adversarial").train.remedy_options["clamp"] == [0.0, 1.0]
    assert {r.name for r in cfg.regimes} == {r.name for r in load_study(find_study("remedies")).regimes}


def test_paper_scale_refusals():
    with pytest.raises(UserError, match="has no \\[paper_scale\\] table"):
        load_study(find_study("default"), paper_scale=True)
    with pytest.raises(UserError, match="choose one"):
        load_study(find_study("batch-sweep"), quick=True, paper_scale=True)
    raw = {**MINIMAL, "paper_scale": {"regimes.XL.batch_size": 5}}
    with pytest.raises(UserError, match=r"\[paper_scale\] regimes.XL.batch_size: no regime named 'XL'"):
        load_study(raw, paper_scale=True)
    with pytest.raises(UserError, match="paper_scale: expected a table"):
        load_study({**MINIMAL, "paper_scale": 3})
    # --set still applies on top, to shrink a paper-scale study
    cfg = load_study(find_study("warm-start"), ["train.epochs=3", "regimes.LB-k50.init_from={regime=\"SB\", epoch=2}",
                                                "regimes.LB-k25.init_from={regime=\"SB\", epoch=2}",
                                                "regimes.LB-k10.init_from={regime=\"SB\", epoch=2}",
                                                "regimes.LB-k5.init_from={regime=\"SB\", epoch=2}"], paper_scale=True)
    assert cfg.train.epochs == 3 and cfg.model.name == "C1"
