import json
from pathlib import Path

import pytest

from sparsesr.errors import ConfigError
from sparsesr.train.config import check_resume_config, config_from_dict, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\narch = "edsr-baseline"\n[train]\niterations = 50\n[prune]\nmethod = "dup"\nsparsity = 0.9\n')
    cfg = load_config(path, ["train.iterations=7", "data.train=['a', 'b']", "prune.method=magnitude", "model.init=x.safetensors"])
    assert cfg.model.arch == "edsr-baseline"
    assert cfg.train.iterations == 7
    assert cfg.data.train == ["a", "b"]
    assert cfg.prune == {"method": "magnitude", "sparsity": 0.9}
    assert cfg.model.init == "x.safetensors"


def test_none_override_restores_the_default(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[prune]\nmethod = "dup"\nsparsity = 0.9\nend_step = 10\nshrink = 0.98\n')
    cfg = load_config(path, ["prune.shrink=none", "model.init=None"])
    assert cfg.prune == {"method": "dup", "sparsity": 0.9, "end_step": 10}
    assert cfg.model.init is None
    with pytest.raises(ConfigError, match="not a known setting"):
        load_config(path, ["prune.shrnk=none"])


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("[train]\nitrations = 5\n", [], "unknown key"),
        ("[optim]\nlr = 1\n", [], "unknown section"),
        ("[train\n", [], "invalid TOML"),
        ("", ["train.schedule=linear"], "schedule"),
        ("", ["trainiterations=5"], "section.key=value"),
        ("", ["train.iterations=0"], "iterations"),
    ],
)
def test_bad_configs(tmp_path, text, overrides, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/c.toml")


# --- every value is checked against its field's type and range (issue #15) --------------------

@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.iterations=abc"], "train.iterations: expected an integer, got 'abc'"),
        (["train.iterations=2.5"], "train.iterations: expected an integer, got 2.5"),
        (["train.iterations=true"], "train.iterations: expected an integer, got True"),
        (["train.batch_size=0"], "train.batch_size: must be >= 1, got 0"),
        (["train.val_every=0"], "train.val_every: must be >= 1"),
        (["train.lr=abc"], "train.lr: expected a number, got 'abc'"),
        (["train.lr=nan"], "train.lr: expected a finite number"),
        (["train.lr=inf"], "train.lr: expected a finite number"),
        (["train.lr=0"], "train.lr: must be > 0"),
        (["train.lr=-1e-3"], "train.lr: must be > 0"),
        (["train.betas=0.9"], "train.betas: expected a list of numbers"),
        (["train.betas=[0.9]"], "train.betas: expected two numbers"),
        (["train.betas=[0.9, 1.5]"], "train.betas: expected two numbers in"),
        (["train.betas=['a', 0.9]"], r"train.betas\[0\]: expected a number"),
        (["train.milestones=[100, 'x']"], r"train.milestones\[1\]: expected an integer"),
        (["train.milestones=[0]"], r"train.milestones\[0\]: must be >= 1"),
        (["train.gamma=0"], "train.gamma: must be > 0"),
        (["train.min_lr=-1e-6"], "train.min_lr: must be >= 0"),
        (["train.min_lr=1"], "train.min_lr: the cosine floor must not exceed train.lr"),
        (["train.ema=1"], r"train.ema: must be in \[0, 1\)"),
        (["train.ema=true"], "train.ema: expected a number, got True"),
        (["train.schedule=1"], "train.schedule: expected a string, got 1"),
        (["train.seed=-1"], "train.seed: must be >= 0"),
        (["train.threads=-2"], "train.threads: must be >= 0"),
        (["model.scale=5"], "model.scale: expected one of 2, 3, 4, got 5"),
        (["model.scale=2.0"], "model.scale: expected an integer, got 2.0"),
        (["model.arch=edsr-huge"], "model.arch: expected one of"),
        (["model.n_feats=0"], "model.n_feats: must be >= 1, got 0"),
        (["model.n_resblocks=-1"], "model.n_resblocks: must be >= 1, got -1"),
        (["model.n_feats=1e-300"], "model.n_feats: expected an integer, got 1e-300"),
        (["model.init_other_scale=1"], "model.init_other_scale: expected true or false, got 1"),
        (["model.init=''"], "model.init: expected a checkpoint path"),
        # rgb_range (and res_scale, n_colors) are the preset's: not settable, so 0, 1e-300 or a
        # negative value can never reach the network from a training config
        (["model.rgb_range=0"], r"unknown key\(s\) \['rgb_range'\] in \[model\]"),
        (["model.rgb_range=1e-300"], r"unknown key\(s\) \['rgb_range'\]"),
        (["model.rgb_range=-255"], r"unknown key\(s\) \['rgb_range'\]"),
        (["model.res_scale=0"], r"unknown key\(s\) \['res_scale'\]"),
        (["data.patch_size=0"], "data.patch_size: must be >= 4, got 0"),
        (["data.holdout=-1"], "data.holdout: must be >= 0"),
        (["data.val_crop=-5"], "data.val_crop: must be >= 0"),
        (["data.train=[]"], "data.train: expected one or more folder paths"),
        (["data.train=[1]"], r"data.train\[0\]: expected a string, got 1"),
        (["prune.sparsity=0.5"], r"\[prune\] needs a method"),
        (["prune.method=nope", "prune.sparsity=0.5"], "prune.method must be one of"),
        (["prune.method=magnitude"], "prune.sparsity is required"),
        (["prune.method=magnitude", "prune.sparsity=abc"], "prune.sparsity must be a number; got 'abc'"),
        (["prune.method=magnitude", "prune.sparsity=1.5"], r"prune.sparsity must be in \[0, 1\)"),
        (["prune.method=magnitude", "prune.sparsity=nan"], "prune.sparsity must be in"),
        (["prune.method=dup", "prune.sparsity=0.5", "prune.end_step=-1"], "prune.end_step must be an integer"),
        (["prune.method=dup", "prune.sparsity=0.5", "prune.end_step=9", "prune.regrow=1"], "prune.regrow must be true or false"),
        (["prune.method=magnitude", "prune.sparsity=0.5", "prune.sparsty=0.5"], "unknown option prune.sparsty"),
        (["prune.method=magnitude", "prune.sparsity=0.5", "train.ema=0.9"], "train.ema cannot be combined with"),
    ],
)
def test_values_are_checked_against_the_schema(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_toml_values_are_checked_too(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"c.toml: train.lr: expected a number, got 'fast'"):
        load_config(path)
    path.write_text("[data]\ntrain = 3\n")
    with pytest.raises(ConfigError, match="data.train: expected a list of strings, got 3"):
        load_config(path)


def test_ints_are_accepted_for_floats_and_stored_as_floats():
    cfg = load_config(None, ["train.lr=1", "train.betas=[0, 0]", "train.gamma=2", "data.train='one/folder'"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == [0.0, 0.0] and all(isinstance(b, float) for b in cfg.train.betas)
    assert cfg.data.train == ["one/folder"]


def test_a_config_json_written_by_the_previous_release_still_loads():
    # what `train` wrote before this release (json.dumps(cfg.to_dict(), indent=2)), e.g. for the
    # long runs/dense-x2-baseline that is resumed with the new code
    text = json.dumps({
        "model": {"arch": "edsr-baseline", "scale": 2, "init": None, "init_other_scale": False,
                  "n_resblocks": None, "n_feats": None},
        "data": {"train": ["../shared/data/train"], "holdout": 10, "patch_size": 32, "val_crop": 128},
        "train": {"iterations": 16000, "batch_size": 16, "lr": 0.0003, "betas": [0.9, 0.99], "schedule": "cosine",
                  "milestones": [], "gamma": 0.5, "min_lr": 1e-06, "ema": 0.0, "val_every": 1000, "save_every": 200,
                  "log_every": 50, "seed": 0, "threads": 1},
        "prune": None,
    }, indent=2)
    cfg = config_from_dict(json.loads(text), "config.json")
    assert cfg.to_dict() == json.loads(text)


def test_every_shipped_config_is_valid():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.toml")):
        load_config(path)


def test_cli_prints_a_bad_value_as_one_line(tmp_path, capsys):
    from sparsesr.cli import main

    quick = Path(__file__).resolve().parents[1] / "configs" / "quick.toml"
    rc = main(["train", "-q", "-c", str(quick), "-o", str(tmp_path / "run"), "--set", "train.iterations=abc"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.iterations: expected an integer, got 'abc'" in err
    assert not (tmp_path / "run").exists()


# --- resuming keeps the saved config -----------------------------------------------------------

def test_resume_config_check_names_the_differing_keys():
    saved = load_config(None, ["prune.method=dup", "prune.sparsity=0.9", "prune.end_step=40"])
    same = load_config(None, ["prune.method=dup", "prune.sparsity=0.9", "prune.end_step=40", "prune.granularity=1x1",
                              "train.threads=1"])
    check_resume_config(saved, same)  # equal values (the pruner's defaults spelled out), and threads may change
    other = load_config(None, ["prune.method=dup", "prune.sparsity=0.8", "prune.end_step=40", "train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"differs in prune.sparsity \(saved 0.9, given 0.8\), train.lr") as err:
        check_resume_config(saved, other)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"differs in prune \(saved \{.*\}, given null\)"):
        check_resume_config(saved, load_config(None))
