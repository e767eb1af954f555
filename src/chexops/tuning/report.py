"""A training round inside a `chexops tune` trial: it reports its best validation AUROC to the
Optuna trial as an intermediate value (step = round number) and asks the study's pruner whether
the trial falls behind; the next round of a pruned trial stops before it trains.

The decision is made after round k and recorded on the trial (user attribute PRUNED_AFTER);
round k itself ends normally, so DVC keeps its outputs (and its run cache) and a kept pruned
experiment is rounds 1..k as trained. Round k+1 then raises TrialPruned. The last round is never
pruned: only evaluate would be saved.

The trial comes from the environment the tune worker gives its `dvc exp run` (TUNE_* in
chexops.tracking.trial); outside a study every function here returns at once.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from chexops.config import N_ROUNDS, Params
from chexops.errors import TrialPruned
from chexops.tracking.trial import TUNE_STORAGE_ENV, TUNE_STUDY_ENV, TUNE_TRIAL_ENV, TUNE_TRIAL_ID_ENV
from chexops.tuning.storage import load_study, open_storage

PRUNED_AFTER = "chexops.pruned_after_round"  # trial user attribute: the round it was pruned after


def _in_trial() -> tuple[str, str, int] | None:
    """(storage URL, study name, trial id) when this round runs in a tuning trial."""
    url, study, trial_id = (os.environ.get(k, "").strip()
                            for k in (TUNE_STORAGE_ENV, TUNE_STUDY_ENV, TUNE_TRIAL_ID_ENV))
    return (url, study, int(trial_id)) if url and study and trial_id else None


def _label() -> str:
    return f"trial {os.environ.get(TUNE_TRIAL_ENV, '?')} of study {os.environ.get(TUNE_STUDY_ENV)}"


def report_round(params: Params, k: int, auroc: float) -> bool:
    """Report round k's best validation AUROC to the trial; True when its pruner gives the trial
    up (recorded for round k+1, which stops it). False outside a study."""
    found = _in_trial()
    if found is None:
        return False
    import optuna

    url, name, trial_id = found
    study = load_study(params, url, name, sampler=optuna.samplers.RandomSampler())
    trial = optuna.trial.Trial(study, trial_id)
    trial.report(float(auroc), step=k)
    if k >= N_ROUNDS or not trial.should_prune():
        return False
    trial.set_user_attr(PRUNED_AFTER, k)
    print(f"train-round-{k}: {_label()} falls behind the median of the finished trials "
          f"(validation AUROC {auroc:.4f}): pruned, it stops before round {k + 1}", file=sys.stderr)
    return True


def pruned_after(storage: Any, trial_id: int) -> int | None:
    """The round after which the trial's pruner stopped it, or None."""
    value = storage.get_trial(trial_id).user_attrs.get(PRUNED_AFTER)
    return int(value) if value is not None else None


def stop_if_pruned(k: int) -> None:
    """Before round k trains: raise TrialPruned when the trial was pruned after an earlier round."""
    found = _in_trial()
    if found is None:
        return
    url, _, trial_id = found
    after = pruned_after(open_storage(url), trial_id)
    if after is not None and after < k:
        raise TrialPruned(after, f"{_label()} was pruned after round {after} (its best validation "
                                 f"AUROC fell below the median of the finished trials)")
