from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from chexops.config import ConfigError, flatten, load_params, params_from_dict, to_dict
from chexops.config.tune_rules import validate_tune

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
    ("data.synthetic.test_seed", -2, "data.synthetic.test_seed: -2 must be >= 0"),
    ("data.synthetic.test_patients", -1, "data.synthetic.test_patients: -1 must be >= 0"),
    ("data.synthetic.train_patients", 64700,
     "train_patients + valid_patients = 64770 must stay below 64741, where the test cohort"),
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
    from chexops.config import AUGMENT_BOUNDS
    from chexops.data.augment import PRESETS

    for cfg in PRESETS.values():
        for name, top in AUGMENT_BOUNDS.items():
            assert 0 <= getattr(cfg, name) <= top


def test_default_and_profile_synthetic_seed_is_42():
    for path in ("params.yaml", "profiles/chexpert-seed.yaml"):
        assert load_params(REPO / path).data.synthetic.seed == 42


# ---------------------------------------------------------------- tune: the search

def with_space(space: dict, **tune) -> dict:
    raw = copy.deepcopy(DEFAULT)
    raw["tune"] = {**raw["tune"], **tune, "space": space}
    return raw


@pytest.mark.parametrize("space,tune,message", [
    # an unknown param, a section, a param that changes no result
    ({"train.lrr": {"uniform": [0.1, 0.2]}}, {}, "tune.space: unknown param 'train.lrr'"),
    ({"rounds.r9.lr": {"uniform": [0.1, 0.2]}}, {}, "unknown param 'rounds.r9.lr'"),
    ({"lr.x": {"uniform": [0.1, 0.2]}}, {}, "unknown param 'lr.x'"),
    ({"runtime.threads": {"integer": [1, 2]}}, {}, "unknown param 'runtime.threads'"),
    ({"tune.heartbeat_s": {"integer": [1, 2]}}, {}, "unknown param 'tune.heartbeat_s'"),
    ({"train.augment": {"choice": ["none"]}}, {}, "tune.space: 'train.augment' is a whole section"),
    # an empty or reversed range, a log range from 0
    ({"lr": {"log_uniform": [1e-3, 1e-3]}}, {},
     "tune.space.lr.log_uniform: range [0.001, 0.001] is empty or reversed"),
    ({"lr": {"uniform": [0.2, 0.1]}}, {}, "tune.space.lr.uniform: range [0.2, 0.1] is empty or reversed"),
    ({"train.batch_size": {"integer": [32, 8]}}, {}, "range [32, 8] is empty or reversed"),
    ({"lr": {"log_uniform": [0, 1e-2]}}, {}, "tune.space.lr.log_uniform: a log range needs lo > 0"),
    ({"lr": {"uniform": [0.1]}}, {}, "tune.space.lr.uniform: expected a list of 2 values"),
    # a distribution that does not exist, none or two given
    ({"lr": {"gaussian": [0.1, 0.2]}}, {},
     "unknown key tune.space.lr.gaussian in params.yaml; "
     "known keys here: choice, integer, log_integer, log_uniform, uniform"),
    ({"lr": {}}, {}, "tune.space.lr: give exactly one distribution of uniform, log_uniform, integer, "
                     "log_integer, choice; got none"),
    ({"lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}, {}, "got uniform, choice"),
    ({"lr": [1e-4, 1e-2]}, {}, "tune.space.lr: expected a mapping"),
    # values the param's own rules refuse
    ({"lr": {"uniform": [-1.0, 1.0]}}, {}, "tune.space.lr: -1.0 is not a valid value (lr: must be > 0"),
    ({"train.batch_size": {"uniform": [8, 32]}}, {}, "tune.space.train.batch_size: 8.0 is not a valid value"),
    ({"train.augment.preset": {"choice": ["none", "heavy"]}}, {},
     "tune.space.train.augment.preset: 'heavy' is not a valid value (train.augment.preset: unknown preset"),
    ({"clean.uncertainty.Edema": {"choice": ["ones", "maybe"]}}, {}, "'maybe' is not a valid value"),
    ({"train.augment.preset": {"choice": ["none", "none"]}}, {}, "give one or more distinct values"),
    ({"train.augment.preset": {"choice": ["none", "off"]}}, {},
     "tune.space.train.augment.preset.choice: 'off' would read back from YAML as False"),
    # the study's settings
    ({}, {"metric": "Cardiomegaly.test.auroc"},
     "tune.metric: 'Cardiomegaly.test.auroc' scores the held-out test cohort, which nothing may"),
    ({}, {"study": "my study"}, "tune.study: 'my study' must be 1-64 letters"),
    ({}, {"study": "a..b"}, "tune.study: 'a..b'"),
    ({}, {"storage": "optuna.db"}, "tune.storage: 'optuna.db' is not a database URL"),
    ({}, {"storage": "redis://h/0"}, "is not a database URL"),
    ({}, {"metric": "test.auroc"}, "tune.metric: 'test.auroc' is not a validation metric of evaluate"),
    ({}, {"metric": "Cardiomegaly"}, "tune.metric: 'Cardiomegaly' is not a validation metric"),
    ({}, {"metric": "mean.auroc"}, "group one of Cardiomegaly"),
    ({}, {"direction": "up"}, "tune.direction: 'up' must be maximize or minimize"),
    ({}, {"direction": "minimize"}, "pruning needs tune.direction: maximize"),
    ({}, {"sampler": {"kind": "grid"}}, "tune.sampler.kind: 'grid' must be tpe or random"),
    ({}, {"pruner": {"kind": "hyperband"}}, "tune.pruner.kind: 'hyperband' must be median or none"),
    ({}, {"pruner": {"kind": "median", "warmup_rounds": -1}}, "tune.pruner.warmup_rounds: -1 must be >= 0"),
    ({}, {"heartbeat_s": 0}, "tune.heartbeat_s: 0 must be >= 1 second"),
])
def test_a_bad_search_is_one_line_naming_the_key(space, tune, message):
    with pytest.raises(ConfigError) as info:
        validate_tune(params_from_dict(with_space(space, **tune)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_good_search_space_reaches_any_value_of_params():
    space = {"lr": {"log_uniform": [1e-4, 1e-2]},
             "rounds.r2.lr": {"log_uniform": [1e-5, 1e-3]},
             "rounds.r5.resample.seed": {"integer": [0, 9]},   # r5 draws no sample: made
             "train.batch_size": {"log_integer": [8, 32]},
             "clean.uncertainty.Edema": {"choice": ["ones", "zeros"]},
             "train.pos_weight": {"choice": [None, 2.0]},
             "model.bn_final": {"choice": [True, False]}}
    params = params_from_dict(with_space(space, direction="minimize", metric="Cardiomegaly.error_rate",
                                         pruner={"kind": "none"}))
    validate_tune(params)
    assert list(params.tune.space) == list(space)
    assert params.tune.space["rounds.r2.lr"].log_uniform == (1e-5, 1e-3)
    assert params.tune.space["train.pos_weight"].choice == (None, 2.0)
    assert params.tune.metric == "Cardiomegaly.error_rate"


def test_a_search_that_no_longer_fits_the_params_stops_the_search_not_the_pipeline():
    raw = with_change("train.augment", {"preset": "custom", "rotate_deg": 10})
    raw["tune"]["space"] = {"train.augment.preset": {"choice": ["none", "custom"]}}
    params = params_from_dict(raw)  # every stage still loads its params
    with pytest.raises(ConfigError, match="'none' is not a valid value .train.augment.rotate_deg"):
        validate_tune(params)


def test_a_password_in_the_study_storage_is_refused_for_every_stage():
    raw = copy.deepcopy(DEFAULT)
    raw["tune"]["storage"] = "postgresql://tune:s3cret@db.internal/optuna"
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)  # every stage logs its params: the password would be in MLflow
    assert str(info.value).startswith("tune.storage: postgresql://db.internal/optuna holds a password")
    assert "s3cret" not in str(info.value)
    raw["tune"]["storage"] = "postgresql://tune@db.internal/optuna"
    assert params_from_dict(raw).tune.storage == "postgresql://tune@db.internal/optuna"


def test_the_shipped_search_is_valid_and_names_no_dvc_dependency():
    params = load_params(REPO / "params.yaml")
    validate_tune(params)
    assert params.tune.space and params.tune.storage == "sqlite:///optuna.db"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = [p for s in stages.values() for p in s.get("params", [])]
    assert not [p for p in declared if str(p).startswith("tune")]  # tuning changes no result
