from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from chexops.config import ConfigError, flatten, load_params, params_from_dict, to_dict

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def with_change(path: str, value) -> dict:
    raw = copy.deepcopy(DEFAULT)
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def test_default_params_load_and_round_one_inherits_top_level_lr():
    params = load_params(REPO / "params.yaml")
    assert params.round(1).lr == params.lr
    assert params.round(2).lr == (1e-4, 1e-3)
    assert params.round(3).resample.size > 0
    assert params.targets == ("Cardiomegaly",)


def test_flattened_params_name_every_leaf():
    flat = flatten(to_dict(load_params(REPO / "params.yaml")))
    assert flat["lr"] == DEFAULT["lr"]
    assert flat["rounds.r2.lr"] == "[0.0001, 0.001]"
    assert flat["model.arch"] == "densenet121"


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 reads `1e-3` as a string; `dvc exp run -S lr=1e-3` writes exactly that
    assert params_from_dict(with_change("lr", "1e-3")).lr == pytest.approx(1e-3)


@pytest.mark.parametrize("path,value,message", [
    ("model.archh", "x", "unknown key model.archh"),
    ("lr", "fast", "lr: expected a number"),
    ("lr", -1.0, "lr: must be > 0"),
    ("targets", ["Cardiomegaly", "Heart Attack"], "unknown observation 'Heart Attack'"),
    ("rounds.r2.lr", [1e-3, 1e-4], "needs 0 < lo <= hi"),
    ("rounds.r2.lr", [1e-4, 1e-3, 1e-2], "expected a list of 2 values"),
    ("rounds.r3.lr", None, "only r1 may inherit"),
    ("rounds.r1.epochs", 0, "rounds.r1.epochs: must be >= 1"),
    ("clean.default_uncertainty", "maybe", "unknown policy 'maybe'"),
    ("resample.strategy", "smote", "must be none, oversample or undersample"),
    ("train.batch_size", "big", "train.batch_size"),
    ("runtime.threads", 1.5, "expected a whole number"),
])
def test_bad_params_name_the_key(path, value, message):
    with pytest.raises(ConfigError, match=None) as info:
        params_from_dict(with_change(path, value))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_round_is_an_error():
    raw = copy.deepcopy(DEFAULT)
    del raw["rounds"]["r5"]
    with pytest.raises(ConfigError, match="define exactly r1, r2, r3, r4, r5"):
        params_from_dict(raw)


def test_missing_params_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_seed_profile_is_the_seed_studys_recipe():
    params = load_params(REPO / "profiles/chexpert-seed.yaml")
    assert params.data.source == "url" and params.model.pretrained is True
    assert params.train.image_size == 320 and params.resample.fraction == 0.3
    rounds = [params.round(k) for k in range(1, 6)]
    assert [r.epochs for r in rounds] == [5, 5, 5, 3, 3]
    assert [r.freeze for r in rounds] == [True, False, False, True, False]
    assert [r.lr for r in rounds] == [9e-3, 6.3e-7, 5e-7, 3e-6, (2.51e-7, 3e-4)]
    assert [r.resample.size if r.resample else 0 for r in rounds] == [0, 0, 40000, 40000, 0]
