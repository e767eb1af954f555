"""The search as Optuna and DVC see it: per-trial seeding (same seed, fresh storage -> same first
trials, for any number of workers), the -S arguments read back by DVC's own override code, and
the experiment names git accepts."""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from chexops.config import load_params, params_from_dict
from chexops.tuning import space as tune_space
from chexops.tuning.storage import load_study, open_storage

REPO = Path(__file__).resolve().parents[2]
SPACE = {"lr": {"log_uniform": [1e-4, 1e-2]},
         "rounds.r2.lr": {"uniform": [1e-5, 1e-3]},
         "train.batch_size": {"integer": [8, 32]},
         "train.augment.preset": {"choice": ["none", "lighting", "light"]}}


def params_with(seed: int = 42, sampler: str = "tpe", startup: int = 10):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["seed"] = seed
    raw["tune"]["space"] = SPACE
    raw["tune"]["sampler"] = {"kind": sampler, "seed": None, "startup_trials": startup}
    return params_from_dict(raw)


def proposals(params, db: Path, n: int, workers: int = 1) -> list[dict]:
    """The first n trials' values on a fresh SQLite storage, asked by `workers` study handles
    in turn (as workers sharing the storage would), each told a value so TPE has a history."""
    url = f"sqlite:///{db}"
    storage = open_storage(url)
    studies = [load_study(params, url, "s", storage, sampler=tune_space.make_sampler(params))
               for _ in range(workers)]
    out = []
    for i in range(n):
        study = studies[i % workers]
        trial = study.ask()
        out.append(tune_space.suggest(trial, params.tune.space))
        study.tell(trial, 0.5 + 0.1 * ((i * 7) % 3))
    return out


def test_the_same_seed_on_a_fresh_storage_proposes_the_same_first_trials(tmp_path):
    params = params_with(seed=42, startup=2)  # trials 3 and 4 come from TPE's model
    first = proposals(params, tmp_path / "a.db", 4)
    assert first == proposals(params, tmp_path / "b.db", 4)
    # two workers taking turns get the very trials one worker would: a trial's values depend
    # on its number (and the history), never on who asks
    assert first == proposals(params, tmp_path / "c.db", 4, workers=2)
    assert first != proposals(params_with(seed=7, startup=2), tmp_path / "d.db", 4)
    assert len({repr(p) for p in first}) == 4  # one seed never proposes twins
    for values in first:
        assert 1e-4 <= values["lr"] <= 1e-2 and isinstance(values["train.batch_size"], int)
        assert values["train.augment.preset"] in ("none", "lighting", "light")


def test_tune_sampler_seed_overrides_the_top_level_seed(tmp_path):
    base = params_with(seed=1, sampler="random")
    pinned = dataclasses.replace(base, tune=dataclasses.replace(
        base.tune, sampler=dataclasses.replace(base.tune.sampler, seed=42)))
    assert proposals(pinned, tmp_path / "a.db", 2) == proposals(
        dataclasses.replace(pinned, seed=2), tmp_path / "b.db", 2)
    assert proposals(pinned, tmp_path / "c.db", 2) != proposals(base, tmp_path / "d.db", 2)


@pytest.mark.parametrize("values", [
    {"lr": 0.0007906468268113815, "rounds.r2.lr": 1.7296512117880812e-05},
    {"train.augment.preset": "none", "train.batch_size": 24, "model.bn_final": False},
    {"train.pos_weight": None, "clean.uncertainty.Edema": "ones", "model.ps": 0.25},
    {"rounds.r5.resample.seed": 3},
])
def test_set_args_are_read_back_exactly_by_dvcs_own_override_code(tmp_path, values):
    """`dvc exp run -S` applies the overrides with dvc.utils.hydra.apply_overrides: the params
    file it writes loads (through chexops' config) to exactly the sampled values."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    args = tune_space.set_args(values)
    assert args[::2] == ["-S"] * len(values)
    apply_overrides(path, to_path_overrides(args[1::2])["params.yaml"])
    loaded = load_params(path)
    for name, value in values.items():
        node = loaded
        for part in name.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == value and type(node) is type(value), (name, node)


def test_experiment_names_are_git_ref_names(tmp_path):
    name = tune_space.experiment_name("lr-search_2", 17)
    assert name == "lr-search_2-t17"
    ok = subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cdef/{name}"])
    assert ok.returncode == 0


def test_override_quotes_text_and_keeps_every_digit():
    assert tune_space.override("none") == "'none'"
    assert tune_space.override("it's") == "'it\\'s'"
    assert tune_space.override(1e-05) == "1e-05" and tune_space.override(0.1 + 0.2) == "0.30000000000000004"
    assert tune_space.override(None) == "null" and tune_space.override(True) == "true"


def test_a_trial_seed_depends_on_the_seed_and_the_number_only():
    seeds = {tune_space.trial_seed(s, n) for s in (0, 1) for n in range(50)}
    assert len(seeds) == 100
    assert tune_space.trial_seed(42, 3) == tune_space.trial_seed(42, 3)
    assert optuna.samplers.RandomSampler(seed=tune_space.trial_seed(42, 3)) is not None
