"""Everything MLflow: where the store is, one run per stage, one trial run per `dvc repro`.

A trial (one `dvc repro` / `dvc exp run`) gets one parent run carrying all params and the final
metrics; each stage that executed in it is adopted as a nested child; a stage DVC restored from
its cache is linked by the tag `stage.<name>.run_id`. runs/<stage>.json (a DVC output of each
stage) records which run produced a stage's outputs, which is how the trial finds them.

mlflow is imported inside functions, so `chexops --help` stays fast.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from filelock import FileLock

from chexops import atomic, paths
from chexops.config import Params, flatten, to_dict
from chexops.errors import ChexopsError
from chexops.paths import main_repo_root
from chexops.redact import redact_url
from chexops.tracking import dvcfiles

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

MAX_PARAM_CHARS = 6000
PARAM_BATCH = 100           # MLflow accepts at most 100 params per log_batch
HEALTH_TIMEOUT_S = 5.0


# ---------------------------------------------------------------- where the store is

def tracking_uri(params: Params, root: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else the embedded SQLite store at the main repo root (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{main_repo_root(root) / params.tracking.store}"


def artifact_location(params: Params, root: str | Path) -> str:
    """The embedded artifact folder as a file URI (absolute, so temp workspaces share it)."""
    return (main_repo_root(root) / params.tracking.artifacts).as_uri()


def ui_command(params: Params, root: str | Path, port: int = 5000,
               host: str = "127.0.0.1") -> list[str]:
    """argv for `mlflow ui` on the embedded store; loopback unless the user asks otherwise."""
    main = main_repo_root(root)
    return [sys.executable, "-m", "mlflow", "ui",
            "--backend-store-uri", f"sqlite:///{main / params.tracking.store}",
            "--default-artifact-root", artifact_location(params, root),
            "--host", host, "--port", str(port)]


# ---------------------------------------------------------------- opening the store

def check_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Fail fast, before any training time is spent, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.split("?", 1)[0].rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        ok = False
    if not ok:
        raise ChexopsError(f"MLflow tracking server {redact_url(uri)} is unreachable; "
                           f"start it or unset MLFLOW_TRACKING_URI to use the embedded store")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """Serialise store creation/migration between processes sharing one SQLite file: an exclusive
    lock on <db>.lock beside it, waited for as long as it takes (a server store needs none)."""
    db = sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(db.with_name(db.name + ".lock"))


def _enable_wal(uri: str) -> None:
    """WAL lets readers and one writer work at once; MLflow's own busy_timeout covers the rest."""
    import sqlite3

    db = sqlite_path(uri)
    if db is not None and db.exists():
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")


def open_store(params: Params, root: str | Path) -> tuple["MlflowClient", str]:
    """(client, experiment id): check the server, create store and experiment if needed."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    check_reachable(uri)
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(params.tracking.experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            location = None if uri.startswith(("http://", "https://")) else \
                artifact_location(params, root)
            exp_id = client.create_experiment(params.tracking.experiment,
                                              artifact_location=location)
        _enable_wal(uri)
    return client, exp_id


# ---------------------------------------------------------------- stage runs

@dataclass
class StageRun:
    """One MLflow run, with the few logging calls stages need (None metrics are skipped)."""
    client: "MlflowClient"
    run_id: str
    experiment_id: str

    def log_params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in values.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + PARAM_BATCH])

    def log_metrics(self, values: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in values.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_metrics_once(self, values: dict[str, Any], step: int) -> None:
        """log_metrics unless this step is already logged (a resumed round re-reports the
        epoch its checkpoint ends with; the kill may have come before or after its logging)."""
        first = next((k for k, v in values.items() if v is not None), None)
        if first is None:
            return
        if any(m.step == step for m in self.client.get_metric_history(self.run_id, first)):
            return
        self.log_metrics(values, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_figure(self, fig: Any, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)


def provenance_tags(params: Params, root: Path, md5s: dict[str, str]) -> dict[str, Any]:
    """Tags every run carries: code revision, DVC experiment, seed, data hashes, libraries."""
    from chexops.tracking.provenance import git_info, library_versions

    git = git_info(root)
    tags: dict[str, Any] = {"git.commit": git["commit"], "git.dirty": git["dirty"],
                            "seed": params.seed, "dvc.exp_name": os.environ.get("DVC_EXP_NAME")}
    if git["changed"]:
        tags["git.changed"] = ", ".join(git["changed"])[:MAX_PARAM_CHARS]
    tags.update({f"data.md5.{p}": m for p, m in md5s.items()})
    tags.update({f"lib.{k}": v for k, v in library_versions().items()})
    return tags


def _log_datasets(run: StageRun, md5s: dict[str, str]) -> None:
    """One MLflow dataset input per data dependency, its digest being DVC's md5."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class _DigestDataset(MetaDataset):
        """Known by source and md5 only. MLflow's MetaDataset leaves its base's abstract
        `profile` unimplemented; a digest-only dataset has none."""

        @property
        def profile(self) -> None:
            return None
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for dep, md5 in md5s.items():
        with warnings.catch_warnings():  # two registered local sources match; same class
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(dep)
        entity = _DigestDataset(source, name=dep, digest=md5)._to_mlflow_entity()
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", "input")]))
    if inputs:
        run.client.log_inputs(run.run_id, datasets=inputs)


def _start(client: "MlflowClient", exp_id: str, stage: str, resume_run_id: str | None) -> str:
    if resume_run_id is None:
        return client.create_run(exp_id, run_name=stage).info.run_id
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(resume_run_id)
    except MlflowException:
        raise ChexopsError(f"cannot resume MLflow run {resume_run_id}: not in the tracking store; "
                           f"delete the stale checkpoint to start the stage afresh") from None
    client.update_run(resume_run_id, status="RUNNING")
    return resume_run_id


@contextlib.contextmanager
def stage_run(params: Params, root: str | Path, stage: str,
              resume_run_id: str | None = None) -> Iterator[StageRun]:
    """The MLflow run of one stage: FINISHED and runs/<stage>.json on success, FAILED on error."""
    from chexops.tracking.provenance import dvc_input_md5s

    root = Path(root)
    client, exp_id = open_store(params, root)  # fails fast when a server is unreachable
    md5s = dvc_input_md5s(root, stage)
    run = StageRun(client, _start(client, exp_id, stage, resume_run_id), exp_id)
    print(f"chexops {stage}: MLflow run {run.run_id} in {redact_url(client.tracking_uri)}",
          file=sys.stderr)
    try:
        run.set_tags({"chexops.stage": stage, **provenance_tags(params, root, md5s)})
        _log_datasets(run, md5s)
        run.log_dict(to_dict(params), "config/params.json")
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        client.set_terminated(run.run_id, status)
        raise
    client.set_terminated(run.run_id, "FINISHED")
    atomic.write_json(root / paths.stage_run_file(stage),
                      {"run_id": run.run_id, "experiment_id": exp_id, "stage": stage})


# ---------------------------------------------------------------- the trial run

def _lock_data_md5s(root: Path) -> dict[str, str]:
    """md5 of every data/ out in dvc.lock (what the trial was computed from)."""
    return {path: md5 for path, md5 in dvcfiles.lock_outs(root).items() if path.startswith("data/")}


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten nested metrics and keep the numbers (lists, notes and None are left out)."""
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _link_stage_runs(client: "MlflowClient", root: Path, trial_id: str) -> dict[str, str]:
    """Adopt runs that executed in this trial as children; tag cached ones on the trial."""
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
        else:
            links[f"stage.{stage}.run_id"] = run_id
    return links


def close_trial(params: Params, root: str | Path, evaluate_run_id: str,
                metrics: dict[str, Any]) -> str:
    """Create the trial run (all params, final metrics), link every stage run; return its id."""
    root = Path(root)
    client, exp_id = open_store(params, root)
    name = os.environ.get("DVC_EXP_NAME") or time.strftime("repro-%Y%m%d-%H%M%S")
    trial = StageRun(client, client.create_run(exp_id, run_name=name).info.run_id, exp_id)
    md5s = _lock_data_md5s(root)
    try:
        trial.set_tags({"chexops.trial": "true", "chexops.evaluate_run_id": evaluate_run_id,
                        **provenance_tags(params, root, md5s)})
        _log_datasets(trial, md5s)
        trial.log_params(flatten(to_dict(params)))
        trial.log_metrics(numeric_metrics(metrics))
        trial.set_tags(_link_stage_runs(client, root, trial.run_id))
    except BaseException:
        client.set_terminated(trial.run_id, "FAILED")
        raise
    client.set_terminated(trial.run_id, "FINISHED")
    print(f"chexops: trial run {trial.run_id} ({name}) in {redact_url(client.tracking_uri)}",
          file=sys.stderr)
    return trial.run_id
