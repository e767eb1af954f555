"""A recorded trial in the MLflow store, as `chexops reproduce` needs it: the trial run found by
run id, stage run or DVC experiment name; its stage runs; the params it ran with; whether its
code can be restored; and the new trial run a re-run made.

mlflow is imported inside functions, so `chexops --help` stays fast.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from chexops.config import Params, flatten
from chexops.errors import ChexopsError
from chexops.tracking.store import check_reachable, sqlite_path, tracking_uri

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

RESTORED_BY_PARAMS = ("params.yaml",)  # changed files that the restored params make whole again


@dataclass
class Trial:
    run_id: str
    name: str
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage -> run id

    @property
    def data_md5s(self) -> dict[str, str]:
        return {k[len("data.md5."):]: v for k, v in self.tags.items() if k.startswith("data.md5.")}


def open_client(params: Params, root: Path) -> tuple["MlflowClient", str]:
    """(client, tracking URI) of the store that holds the trials; refuses a missing SQLite store
    rather than creating an empty one."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    check_reachable(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ChexopsError(f"no MLflow store at {db}; run the pipeline first, or set "
                           f"MLFLOW_TRACKING_URI to the store that holds the trial")
    return MlflowClient(tracking_uri=uri), uri


# ---------------------------------------------------------------- finding the trial

def _is_trial(run: "Run") -> bool:
    return run.data.tags.get("chexops.trial") == "true"


def _run_by_id(client: "MlflowClient", ref: str) -> "Run | None":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        return None


def _trials_named(client: "MlflowClient", name: str) -> list["Run"]:
    """Trial runs whose DVC experiment name is `name`, newest first, across experiments."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    safe = name.replace("'", "")
    return client.search_runs(exp_ids, f"tags.`dvc.exp_name` = '{safe}' and "
                                       f"tags.`chexops.trial` = 'true'",
                              order_by=["attributes.start_time DESC"], max_results=50)


def find_trial_run(client: "MlflowClient", ref: str, store: str) -> "Run":
    """The trial run for a run id (a stage run maps to its trial) or a DVC experiment name."""
    run = _run_by_id(client, ref)
    if run is not None and not _is_trial(run):
        parent = run.data.tags.get("mlflow.parentRunId")
        run = _run_by_id(client, parent) if parent else None
        if run is None or not _is_trial(run):
            raise ChexopsError(f"run {ref} is not a chexops trial run (no chexops.trial tag); "
                               f"pass the trial's run id or its DVC experiment name")
    if run is None:
        named = _trials_named(client, ref)
        if not named:
            raise ChexopsError(f"no trial run or DVC experiment named {ref!r} in the tracking "
                               f"store {store}; find the id in the MLflow UI or `dvc exp show`")
        if len(named) > 1:
            print(f"reproduce: {len(named)} trials are named {ref!r}; using the newest, "
                  f"{named[0].info.run_id}", file=sys.stderr)
        run = named[0]
    return run


def stage_runs_of(client: "MlflowClient", trial: "Run") -> dict[str, str]:
    """stage -> run id: the trial's children plus the cached stages it links by tag."""
    links = {k[len("stage."):-len(".run_id")]: v for k, v in trial.data.tags.items()
             if k.startswith("stage.") and k.endswith(".run_id")}
    kids = client.search_runs([trial.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'",
                              max_results=1000)
    links.update({r.data.tags["chexops.stage"]: r.info.run_id for r in kids
                  if "chexops.stage" in r.data.tags})
    return links


def load_trial(client: "MlflowClient", ref: str, store: str) -> Trial:
    run = find_trial_run(client, ref, store)
    return Trial(run.info.run_id, run.info.run_name or run.info.run_id, dict(run.data.tags),
                 dict(run.data.metrics), dict(run.data.params), stage_runs_of(client, run))


# ---------------------------------------------------------------- its code and params

def code_warning(trial: Trial, experiment: str | None = None) -> str | None:
    """A trial made from a dirty tree cannot be restored exactly: say which files are missing.
    None when the code comes from the trial's DVC experiment commit (`experiment`), which holds
    its uncommitted changes to tracked files."""
    if trial.tags.get("git.dirty") != "True" or experiment:
        return None
    changed = [p.strip() for p in trial.tags.get("git.changed", "").split(",") if p.strip()]
    missing = [p for p in changed if p not in RESTORED_BY_PARAMS]
    if changed and not missing:
        return None  # only params.yaml differed (dvc exp run -S): restored from the run
    what = ", ".join(missing) if missing else "unknown files (the trial recorded no list)"
    return (f"warning: trial {trial.run_id} was made from a dirty git tree; its uncommitted "
            f"changes to {what} were never recorded, so the code is restored only as of commit "
            f"{trial.tags.get('git.commit', '?')[:12]} and the result may differ")


def restored_params(client: "MlflowClient", trial: Trial) -> dict[str, Any]:
    """The params the trial ran with: its verbatim params.yaml artifact when logged, else the
    resolved config its evaluate run logged (config/params.json)."""
    candidates = [(trial.run_id, "config/params.yaml")]
    evaluate_id = trial.tags.get("chexops.evaluate_run_id") or trial.stage_runs.get("evaluate")
    if evaluate_id:
        candidates.append((evaluate_id, "config/params.json"))
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, artifact in candidates:
            try:
                local = client.download_artifacts(run_id, artifact, tmp)
            except Exception:  # not logged (older trial) or missing: try the next source
                continue
            text = Path(local).read_text()
            return yaml.safe_load(text) if artifact.endswith(".yaml") else json.loads(text)
    raise ChexopsError(f"trial {trial.run_id} has no logged params (config/params.json on its "
                       f"evaluate run); it cannot be reproduced, re-run it with this version")


def params_mismatch(raw: dict[str, Any], trial: Trial) -> list[str]:
    """Keys whose restored value differs from the trial's logged (flattened) params."""
    flat = {k: str(v) for k, v in flatten(raw).items()}
    return sorted(k for k, v in trial.params.items() if k in flat and flat[k] != v)


# ---------------------------------------------------------------- the re-run's trial

def new_trial(client: "MlflowClient", ws: Path) -> "Run":
    """The trial run a re-run in workspace `ws` created (found through the evaluate run it names)."""
    record = ws / "runs" / "evaluate.json"
    if not record.is_file():
        raise ChexopsError(f"the re-run wrote no runs/evaluate.json in {ws}; "
                           f"the pipeline at this commit does not record its trial")
    evaluate_id = json.loads(record.read_text())["run_id"]
    exp_id = client.get_run(evaluate_id).info.experiment_id
    found = client.search_runs([exp_id], f"tags.`chexops.evaluate_run_id` = '{evaluate_id}'")
    if not found:
        raise ChexopsError(f"the re-run's trial run (evaluate run {evaluate_id}) is not in the store; "
                           f"check the evaluate stage's output above")
    return found[0]
