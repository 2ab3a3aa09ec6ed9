import pytest

from sparsesr.errors import ConfigError
from sparsesr.train.config import load_config


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
    path.write_text('[prune]\nmethod = "dup"\nsparsity = 0.9\nshrink = 0.98\n')
    cfg = load_config(path, ["prune.shrink=none", "model.init=None"])
    assert cfg.prune == {"method": "dup", "sparsity": 0.9}
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
