"""The command line: every mistake is one line on stderr, exit code 2, nothing written or damaged."""
import json
import subprocess
import sys

import pytest

from batchgap.cli import main
from data_fixtures import write_fake_cifar10

FAST = ["--set", "train.epochs=1", "--set", "data.train_subset=200", "--set", "data.test_subset=100",
        "--set", "seeds=[0]"]


def corrupt_cifar(tmp_path):
    [archive] = write_fake_cifar10(tmp_path / "data", n_train=20, n_test=10)
    blob = bytearray(archive.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    archive.write_bytes(bytes(blob))
    return ["--data-dir", str(tmp_path / "data")]


def a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return str(tmp_path / "f")


def bad_toml(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return str(p)


# (name, argv builder, text the one line must contain)
CASES = [
    ("unknown study", lambda t: ["run", "defualt"], 'did you mean "default"'),
    ("missing study file", lambda t: ["run", str(t / "no.toml")], "no such study file"),
    ("invalid toml", lambda t: ["run", bad_toml(t, "name = [\n")], "not valid TOML"),
    ("unknown top-level key",
     lambda t: ["run", bad_toml(t, 'name="x"\nseed=[1]\n[[regimes]]\nname="A"\nbatch_size=8\n')],
     'did you mean "seeds"'),
    ("no regimes", lambda t: ["run", bad_toml(t, 'name="x"\n')], "regimes: expected at least one"),
    ("unknown train key", lambda t: ["run", "--set", "train.epoch=3"], 'did you mean "epochs"'),
    ("wrong type", lambda t: ["run", "--set", "train.epochs=three"], "train.epochs: expected an integer"),
    ("zero epochs", lambda t: ["run", "--set", "train.epochs=0"], "train.epochs: must be at least 1"),
    ("negative lr", lambda t: ["run", "--set", "train.lr=-0.1"], "train.lr: must be greater than 0"),
    ("infinite lr", lambda t: ["run", "--set", "train.lr=inf"], "train.lr: must be a finite number"),
    ("unknown optimizer", lambda t: ["run", "--set", "train.optimizer=lamb"], "train.optimizer: unknown value 'lamb'"),
    ("batch larger than data", lambda t: ["run", *FAST, "--set", "regimes.LB.batch_size=5000"],
     "larger than the training set"),
    ("zero batch", lambda t: ["run", "--set", "regimes.SB.batch_size=0"], "regimes.SB.batch_size: must be at least 1"),
    ("batch of one with BN", lambda t: ["run", *FAST, "--set", "regimes.SB.batch_size=1"],
     "BatchNorm needs at least 2"),
    ("percent over 100", lambda t: ["run", "--set", 'regimes.LB.batch_size="120%"'], "percentage"),
    ("unknown model", lambda t: ["run", "--set", "model.name=resnet50"], "model.name: unknown value 'resnet50'"),
    ("unknown model option", lambda t: ["run", *FAST, "--set", "model.options={widht=3}"], "widht"),
    ("unknown bn", lambda t: ["run", "--set", "model.bn=keras"], "model.bn: unknown value 'keras'"),
    ("unknown dataset", lambda t: ["run", "--set", "data.name=imagenet"], "data.name: unknown value 'imagenet'"),
    ("image augment on 1-D data", lambda t: ["run", *FAST, "--set", "data.augment=paper"], "augment"),
    ("set without =", lambda t: ["run", "--set", "train.epochs"], "expected KEY=VALUE"),
    ("set unparsable value", lambda t: ["run", "--set", "seeds=[1,"], "cannot read the value"),
    ("set unknown regime", lambda t: ["run", "--set", "regimes.XL.batch_size=3"], "no regime named 'XL'"),
    ("seeds not a list", lambda t: ["run", "--set", "seeds=3"], "seeds: expected a non-empty list"),
    ("compare unknown regime", lambda t: ["run", "--set", 'compare=["SB", "XB"]'], "compare: unknown regime 'XB'"),
    ("missing data files", lambda t: ["run", "keskar-f1", "--data-dir", str(t / "empty")],
     "batchgap data download mnist"),
    ("corrupt archive", lambda t: ["run", "keskar-c1", *corrupt_cifar(t)], "corrupt"),
    ("output is a file", lambda t: ["run", *FAST, "--out", a_file(t)], "is a file"),
    ("output under a file", lambda t: ["run", *FAST, "--out", a_file(t) + "/sub"],
     "cannot create the output directory"),
    ("report without results", lambda t: ["report", str(t)], "no results here"),
    ("download unknown data set", lambda t: ["data", "download", "imagenet", "--data-dir", str(t)],
     "dataset: unknown value 'imagenet'"),
    ("unknown command", lambda t: ["train"], "invalid choice"),
    ("unknown flag", lambda t: ["run", "--epochs", "3"], "unrecognized arguments"),
]


@pytest.mark.parametrize("name, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(name, argv, needle, tmp_path, mnist1d_dir, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("batchgap"), err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_at_least_25_bad_inputs_are_covered():
    assert len(CASES) >= 25


def test_edited_results_json_is_refused_and_left_alone(tmp_path, mnist1d_dir, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"runs": "what"')
    assert main(["run", *FAST, "--out", str(out)]) == 2
    assert "not a batchgap results file" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"runs": "what"'
    assert main(["report", str(out)]) == 2


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "batchgap", "run", "--set", "train.epochs=x"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_list_shows_models_datasets_and_studies(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("F1", "C1", "C4", "simplevgg", "mlp", "cnn1d", "mnist1d", "cifar100", "default", "keskar-c2",
                 "seed-simplevgg"):
        assert name in out


def test_show_prints_the_resolved_study(capsys):
    assert main(["show", "default", "--quick", "--set", "train.lr=0.01"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["epochs"] == 3 and cfg["name"] == "default"


def test_report_regenerates_from_results(tmp_path, mnist1d_dir, monkeypatch, capsys):
    monkeypatch.setenv("BATCHGAP_DATA", str(mnist1d_dir))
    out = tmp_path / "out"
    assert main(["run", *FAST, "--out", str(out), "--no-report"]) == 0
    assert not (out / "report.md").exists()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").exists() and (out / "figures" / "accuracy_curves.png").exists()


def test_version_and_help_that_lists_the_valid_names(capsys):
    from batchgap import __version__
    from batchgap.studies import builtin_names
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"batchgap {__version__}"
    for argv, names in ((["show", "--help"], builtin_names()), (["run", "--help"], builtin_names()),
                        (["data", "download", "--help"], ["mnist", "cifar10", "cifar100"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
        assert all(n in text for n in names), argv
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "output directory" in capsys.readouterr().out
