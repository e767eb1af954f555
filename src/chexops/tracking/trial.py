"""The trial run: one MLflow parent run per `dvc repro` / `dvc exp run`.

The first stage that executes under a DVC command opens it (RUNNING, with every param), each
stage run is nested under it as the stage starts, a failing stage marks it FAILED with the stage
and its one-line error, and evaluate closes it (final metrics, links to the stages DVC restored
from its cache, FINISHED). So the MLflow UI shows a trial while it trains, a failed trial as a
trial, and a trial's duration is its wall time.

The stages of one DVC command are recognised by the dvc process that runs them (DVC sets
DVC_STAGE in a stage command's environment): its host, pid and start time, the "invocation".
A trial still RUNNING whose dvc process is gone (killed, or a `dvc repro <stage>` that ran only
part of the pipeline) is ended by the next trial opened on the same host.

A trial of a `chexops tune` study learns its study, number and sampled values from the
environment the tune worker gives its `dvc exp run` (TUNE_* below) and carries them as tags; a
trial its pruner stopped ends KILLED with the tag chexops.tune.state = PRUNED.

mlflow is imported inside functions, so `chexops --help` stays fast.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chexops import paths
from chexops.config import Params, flatten, to_dict
from chexops.redact import redact_text, redact_url
from chexops.tracking import dvcfiles
from chexops.tracking.store import StageRun, log_datasets, numeric_metrics, open_store, provenance_tags

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

TRIAL_TAG = "chexops.trial"
INVOCATION_TAG = "chexops.invocation"
ERROR_CHARS = 500
# how a stage learns that it runs in a `chexops tune` trial (set by the tune worker for dvc)
TUNE_STORAGE_ENV = "CHEXOPS_TUNE_STORAGE"    # the study's storage URL (absolute)
TUNE_STUDY_ENV = "CHEXOPS_TUNE_STUDY"        # the study's name
TUNE_TRIAL_ENV = "CHEXOPS_TUNE_TRIAL"        # the trial's number in the study
TUNE_TRIAL_ID_ENV = "CHEXOPS_TUNE_TRIAL_ID"  # the trial's id in the storage
TUNE_VALUES_ENV = "CHEXOPS_TUNE_VALUES"      # JSON {param: sampled value}
STUDY_TAG = "chexops.tune.study"
TRIAL_NUMBER_TAG = "chexops.tune.trial"
VALUE_TAG = "chexops.tune.param."            # + the param's dotted name
STATE_TAG = "chexops.tune.state"
PRUNED_TAG = "chexops.tune.pruned_after_round"
# processes that run dvc in-process: `chexops tune` launches each trial's dvc through this one
DVC_LAUNCHERS = ("chexops.tuning.launch",)


# ---------------------------------------------------------------- the dvc command a stage runs in

def _is_dvc(argv: list[str]) -> bool:
    """True for `dvc ...`, `python -m dvc ...` or a launcher that runs dvc in-process."""
    return (any(Path(a).name == "dvc" for a in argv[:2])
            or any(argv[1:3] == ["-m", module] for module in ("dvc", *DVC_LAUNCHERS)))


def invocation_key() -> str | None:
    """'<host>:<pid>:<start time>' of the dvc process running this stage command, found among
    the process's ancestors (psutil); None outside a DVC stage command."""
    if not os.environ.get("DVC_STAGE"):
        return None
    import psutil

    for proc in psutil.Process().parents():
        try:
            if _is_dvc(proc.cmdline()):
                return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"
        except psutil.Error:
            continue
    return None


def _alive(key: str) -> bool:
    """Whether the dvc process of an invocation key still runs; True when it ran on another host
    (nothing can be known from here)."""
    import psutil

    host, pid, started = key.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.Error, ValueError):
        return False


# ---------------------------------------------------------------- opening and ending

def _children(client: "MlflowClient", exp_id: str, trial_id: str) -> list:
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{trial_id}'",
                              max_results=1000)


def _end_orphan(client: "MlflowClient", exp_id: str, trial: Any) -> None:
    """End a trial run whose dvc process is gone: FAILED with the stage that was running (or had
    failed) when it ended, else FINISHED and tagged partial (evaluate never ran in it) -- but
    FAILED for a tuning trial, which always runs the whole pipeline unless it is pruned."""
    trial_id = trial.info.run_id
    kids = _children(client, exp_id, trial_id)
    cut = [k for k in kids if k.info.status in ("RUNNING", "FAILED", "KILLED")]
    now = int(time.time() * 1000)  # when a killed stage is noticed: its true end is unknown
    ends = [now if k.info.status == "RUNNING" else k.info.end_time or now for k in kids] or [now]
    if STUDY_TAG in trial.data.tags and not cut:
        client.set_tag(trial_id, "chexops.error",
                       "its dvc process ended between two stages (its tune worker was killed)")
        client.set_terminated(trial_id, "FAILED", end_time=max(ends))
    elif cut:
        stage = cut[0].data.tags.get("chexops.stage", "?")
        for kid in cut:
            if kid.info.status == "RUNNING":
                client.set_terminated(kid.info.run_id, "FAILED", end_time=now)
        client.set_tag(trial_id, "chexops.failed_stage", stage)
        if cut[0].info.status == "RUNNING":
            client.set_tag(trial_id, "chexops.error",
                           f"its dvc process ended while {stage} ran (killed or interrupted)")
        client.set_terminated(trial_id, "FAILED", end_time=max(ends))
    else:
        client.set_tag(trial_id, "chexops.partial",
                       "the dvc command ended before evaluate: only part of the pipeline ran")
        client.set_terminated(trial_id, "FINISHED", end_time=max(ends))


def _end_orphans(client: "MlflowClient", exp_id: str) -> None:
    host = socket.gethostname().replace("'", "")
    running = client.search_runs([exp_id], f"tags.`{INVOCATION_TAG}` LIKE '{host}:%' and "
                                           f"attributes.status = 'RUNNING'", max_results=100)
    for run in running:
        if not _alive(run.data.tags[INVOCATION_TAG]):
            _end_orphan(client, exp_id, run)


def _running_trial(client: "MlflowClient", exp_id: str, key: str) -> str | None:
    found = client.search_runs([exp_id], f"tags.`{INVOCATION_TAG}` = '{key}' and "
                                         f"attributes.status = 'RUNNING'", max_results=1)
    return found[0].info.run_id if found else None


def open_trial(client: "MlflowClient", exp_id: str, params: Params) -> str | None:
    """The id of this DVC command's trial run, opened (RUNNING, all params) by its first stage;
    None outside a DVC stage command (a stage run by hand belongs to no trial until evaluate)."""
    key = invocation_key()
    if key is None:
        return None
    trial_id = _running_trial(client, exp_id, key)
    if trial_id is not None:
        return trial_id
    _end_orphans(client, exp_id)
    trial_id, name = _create_trial(client, exp_id, params, {INVOCATION_TAG: key, **tune_tags()})
    print(f"chexops: trial run {trial_id} ({name}) opened in {redact_url(client.tracking_uri)}",
          file=sys.stderr)
    return trial_id


def _create_trial(client: "MlflowClient", exp_id: str, params: Params,
                  tags: dict[str, str]) -> tuple[str, str]:
    """(run id, name) of a new trial run with every param, named after the DVC experiment."""
    name = os.environ.get("DVC_EXP_NAME") or time.strftime("repro-%Y%m%d-%H%M%S")
    trial = StageRun(client, client.create_run(exp_id, run_name=name, tags={
        TRIAL_TAG: "true", **tags}).info.run_id, exp_id)
    trial.set_tags({"dvc.exp_name": os.environ.get("DVC_EXP_NAME")})
    trial.log_params(flatten(to_dict(params)))
    return trial.run_id, name


def tune_tags() -> dict[str, str]:
    """The tags of a `chexops tune` trial (study, number, each sampled value) from the
    environment; empty outside a study."""
    study = os.environ.get(TUNE_STUDY_ENV, "").strip()
    if not study:
        return {}
    values = json.loads(os.environ.get(TUNE_VALUES_ENV) or "{}")
    return {STUDY_TAG: study, TRIAL_NUMBER_TAG: os.environ.get(TUNE_TRIAL_ENV, ""),
            **{f"{VALUE_TAG}{name}": str(value) for name, value in values.items()}}


def one_line(exc: BaseException) -> str:
    """The error as the CLI prints it, on one line, without secrets."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return redact_text(text)[:ERROR_CHARS]


def fail_trial(params: Params, root: str | Path, stage: str, error: str,
               pruned_after: int | None = None) -> str | None:
    """Mark this DVC command's running trial FAILED in `stage` with `error` (one line), or, for
    a tuning trial its pruner stopped after round `pruned_after`, KILLED and tagged PRUNED;
    returns its id, or None when the stage runs outside DVC or no trial was opened."""
    key = invocation_key()
    if key is None:
        return None
    client, exp_id = open_store(params, root)
    trial_id = _running_trial(client, exp_id, key)
    if trial_id is None:
        return None
    run = StageRun(client, trial_id, exp_id)
    if pruned_after is not None:
        run.set_tags({STATE_TAG: "PRUNED", PRUNED_TAG: pruned_after, "chexops.error": error})
        client.set_terminated(trial_id, "KILLED")
    else:
        run.set_tags({"chexops.failed_stage": stage, "chexops.error": error})
        client.set_terminated(trial_id, "FAILED")
    return trial_id


# ---------------------------------------------------------------- closing

def _lock_data_md5s(root: Path) -> dict[str, str]:
    """md5 of every data/ out in dvc.lock (what the trial was computed from)."""
    return {path: md5 for path, md5 in dvcfiles.lock_outs(root).items() if path.startswith("data/")}


def _link_stage_runs(client: "MlflowClient", root: Path, trial_id: str) -> dict[str, str]:
    """Adopt runs that executed in this trial without one as children; tag the others (cached,
    or resumed from an earlier trial) on the trial."""
    from mlflow.exceptions import MlflowException

    links: dict[str, str] = {}
    for stage in dvcfiles.stages(root):
        record = root / paths.stage_run_file(stage)
        if not record.is_file():
            continue
        run_id = json.loads(record.read_text())["run_id"]
        try:
            parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        except MlflowException:
            parent = "unknown"  # made in another store: can only be linked
        if parent is None:
            client.set_tag(run_id, "mlflow.parentRunId", trial_id)
        elif parent != trial_id:
            links[f"stage.{stage}.run_id"] = run_id
    return links


def close_trial(params: Params, root: str | Path, evaluate: StageRun,
                metrics: dict[str, Any], figures: dict[str, Any] | None = None) -> str:
    """Finish the trial the evaluate run belongs to (or create it, for an evaluate run by hand):
    final metrics, data hashes, figures (matplotlib, as figures/<name>), links to every stage
    run, FINISHED. Returns its run id."""
    root = Path(root)
    client, exp_id = open_store(params, root)
    trial_id = evaluate.trial_id
    if trial_id is None:  # evaluate run by hand, outside a dvc command
        trial_id = _create_trial(client, exp_id, params, {})[0]
    trial = StageRun(client, trial_id, exp_id)
    md5s = _lock_data_md5s(root)
    try:
        trial.set_tags({"chexops.evaluate_run_id": evaluate.run_id,
                        **provenance_tags(params, root, md5s)})
        log_datasets(trial, md5s)
        trial.log_metrics(numeric_metrics(metrics))
        for name, fig in (figures or {}).items():
            trial.log_figure(fig, f"figures/{name}")
        trial.set_tags(_link_stage_runs(client, root, trial.run_id))
    except BaseException:
        client.set_terminated(trial.run_id, "FAILED")
        raise
    client.set_terminated(trial.run_id, "FINISHED")
    name = client.get_run(trial.run_id).info.run_name
    print(f"chexops: trial run {trial.run_id} ({name}) in {redact_url(client.tracking_uri)}",
          file=sys.stderr)
    return trial.run_id
