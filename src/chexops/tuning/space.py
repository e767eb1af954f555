"""The search of params.tune as Optuna sees it: the suggestions for a trial, the `dvc exp run -S`
arguments that set them, the trial's experiment name, and the sampler.

The sampler is made afresh for each trial with a seed drawn from (tune.sampler.seed, trial
number): a trial's proposals then depend on its number and the study's history only, not on
which worker asks or in which order, so the same seed on a fresh storage proposes the same first
trials for any number of workers (and two workers never propose twins from one seed).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from chexops.config import Params, TuneDistribution


def experiment_name(study: str, number: int) -> str:
    """The DVC experiment of trial `number`: '<study>-t<number>' (a valid git ref name: the
    study name is checked by config)."""
    return f"{study}-t{number}"


def suggest(trial: Any, space: dict[str, TuneDistribution]) -> dict[str, Any]:
    """{param: value} sampled for an Optuna trial, in the order of the space."""
    values: dict[str, Any] = {}
    for name, dist in space.items():
        if dist.choice is not None:
            values[name] = trial.suggest_categorical(name, list(dist.choice))
        elif dist.integer is not None or dist.log_integer is not None:
            lo, hi = dist.integer or dist.log_integer  # type: ignore[misc]
            values[name] = trial.suggest_int(name, lo, hi, log=dist.log_integer is not None)
        else:
            lo, hi = dist.uniform or dist.log_uniform  # type: ignore[misc]
            values[name] = trial.suggest_float(name, lo, hi, log=dist.log_uniform is not None)
    return values


def override(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): text is quoted so that it
    stays text ('1.0', 'none'), numbers keep every digit."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def set_args(values: dict[str, Any]) -> list[str]:
    """['-S', '++param=value', ...] for `dvc exp run`: `++` sets a value that params.yaml may
    not spell out yet (clean.uncertainty.Edema, a round's resample), as Hydra's grammar wants."""
    return [arg for name, value in values.items() for arg in ("-S", f"++{name}={override(value)}")]


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number` (NumPy SeedSequence of the pair)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeeded(BaseSampler):
    """Delegates to a sampler made for each trial by make(trial_seed(seed, trial number))."""

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        return self._inner.sample_independent(study, trial, name, dist)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(params: Params) -> BaseSampler:
    """tune.sampler (TPE or random), seeded per trial from tune.sampler.seed, else `seed`."""
    cfg = params.tune.sampler

    def make(seed: int) -> BaseSampler:
        if cfg.kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials)

    return PerTrialSeeded(make, params.seed if cfg.seed is None else cfg.seed)
