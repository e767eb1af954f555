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
    ("runtime.channels_last", "yes please", "runtime.channels_last: 'yes please' must be auto, on or off"),
    # data
    ("data.sha256", "abc123", "data.sha256: 'abc123' is not a sha256 (64 hex digits)"),
    ("data.sha256", "g" * 64, "is not a sha256 (64 hex digits); copy it from `sha256sum`"),
    ("data.sha256", "a" * 63, "is not a sha256"),
    ("data.retries", -1, "data.retries: -1 must be >= 0"),
    ("data.timeout_s", 0, "data.timeout_s: 0.0 must be > 0 seconds"),
    ("data.url_env", "MY-URL", "data.url_env: 'MY-URL' must be an environment variable name"),
    ("data.source", "", "data.source: empty"),
    ("data.synthetic.train_patients", 0, "data.synthetic.train_patients: 0 must be >= 1"),
    ("data.synthetic.valid_patients", -3, "data.synthetic.valid_patients: -3 must be >= 1"),
    ("data.synthetic.width", 0, "data.synthetic.width: 0 px is too small; use at least 16"),
    ("data.synthetic.height", -1, "data.synthetic.height: -1 px is too small"),
    ("data.synthetic.studies_per_patient", 0.5, "data.synthetic.studies_per_patient: 0.5 is a mean"),
    ("data.synthetic.lateral_fraction", 1.5, "data.synthetic.lateral_fraction: 1.5 must be within [0, 1]"),
    ("data.synthetic.lateral_fraction", -0.1, "lateral_fraction: -0.1 must be within [0, 1]"),
    ("data.synthetic.jpeg_quality", 0, "data.synthetic.jpeg_quality: 0 must be within 1..100"),
    ("data.synthetic.jpeg_quality", 101, "jpeg_quality: 101 must be within 1..100"),
    ("data.synthetic.seed", -1, "data.synthetic.seed: -1 must be >= 0"),
    ("data.synthetic.sed", 1, "unknown key data.synthetic.sed"),
    ("clean.image_check", "deep", "clean.image_check: 'deep' must be header or full"),
    # train
    ("train.pos_weight", 0, "train.pos_weight: 0.0 must be > 0 (or null"),
    ("train.pos_weight", -2.0, "train.pos_weight: -2.0 must be > 0"),
    ("train.augment", {"preset": "custom", "rotate_deg": 45}, "train.augment.rotate_deg: 45.0 is outside 0..30"),
    ("train.augment", {"preset": "custom", "translate": 1.0}, "train.augment.translate: 1.0 is outside 0..0.25"),
    ("train.augment", {"preset": "custom", "scale": 1.0}, "train.augment.scale: 1.0 is outside 0..0.5"),
    ("train.augment", {"preset": "custom", "contrast": 1.0}, "train.augment.contrast: 1.0 is outside 0..0.5"),
    ("train.augment", {"preset": "custom", "brightness": 2}, "train.augment.brightness: 2.0 is outside 0..0.5"),
    ("train.augment", {"preset": "custom", "rotate_deg": -5}, "train.augment.rotate_deg: -5.0 is outside 0..30"),
    # evaluate
    ("evaluate.bootstrap", 200, "evaluate.bootstrap: 200 resamples give unstable 95 % intervals; use at least 1000"),
    ("evaluate.threshold", 0.0, "evaluate.threshold: 0.0 must be strictly between 0 and 1"),
    ("evaluate.threshold", 1.0, "evaluate.threshold: 1.0 must be strictly between 0 and 1"),
    ("evaluate.target_sensitivity", 1.2, "evaluate.target_sensitivity: 1.2 must be strictly between 0 and 1"),
    ("evaluate.target_sensitivity", 0, "evaluate.target_sensitivity: 0.0 must be strictly"),
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


def test_url_in_data_source_is_refused_with_the_query_redacted():
    raw = with_change("data.source", "https://host.example/CheXpert-v1.0-small.zip?token=SECRET&sig=x")
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    msg = str(info.value)
    assert msg.startswith("data.source: a URL (https://host.example/CheXpert-v1.0-small.zip?***)")
    assert "export CHEXPERT_URL='<the link>'" in msg and "set data.source: url" in msg
    assert "SECRET" not in msg and "sig=" not in msg and "\n" not in msg


def test_data_checks_accept_good_values():
    sha = "0123456789abcdefABCDEF" + "0" * 42
    params = params_from_dict(with_change("data.sha256", sha))
    assert params.data.sha256 == sha
    assert params_from_dict(with_change("train.pos_weight", 3.0)).train.pos_weight == 3.0
    edge = params_from_dict(with_change("train.augment", {"preset": "custom", "rotate_deg": 30,
                                                          "translate": 0.25, "scale": 0.5,
                                                          "contrast": 0.5, "brightness": 0.5}))
    assert edge.train.augment.rotate_deg == 30
    synthetic = params_from_dict(with_change("data.synthetic.lateral_fraction", 0)).data.synthetic
    assert synthetic.lateral_fraction == 0 and synthetic.seed == 42


def test_augment_presets_are_within_the_bounds():
    from chexops.data.augment import PRESETS
    from chexops.config import AUGMENT_BOUNDS

    for cfg in PRESETS.values():
        for name, top in AUGMENT_BOUNDS.items():
            assert 0 <= getattr(cfg, name) <= top


def test_default_and_profile_synthetic_seed_is_42():
    for path in ("params.yaml", "profiles/chexpert-seed.yaml"):
        assert load_params(REPO / path).data.synthetic.seed == 42
