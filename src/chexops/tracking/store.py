"""Where the MLflow store is, opening it, and logging to one run (params, metrics, artifacts,
provenance tags, DVC data hashes as MLflow dataset inputs).

mlflow is imported inside functions, so `chexops --help` stays fast.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from chexops.config import Params, flatten
from chexops.errors import ChexopsError
from chexops.paths import main_repo_root
from chexops.redact import redact_url

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

MAX_PARAM_CHARS = 6000
PARAM_BATCH = 100           # MLflow accepts at most 100 params per log_batch
HEALTH_TIMEOUT_S = 5.0


# ---------------------------------------------------------------- where the store is

def tracking_uri(params: Params, root: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else the embedded SQLite store at the main repo root; always absolute.

    A relative SQLite URI (`sqlite:///mlflow.db`) resolves against the main repository root, not
    the working directory: in a `dvc exp run --temp/--queue` workspace the working directory is a
    copy DVC deletes, and the runs would go with it (a known MLflow trap: mlflow/mlflow#7378).
    Raises ChexopsError for a file store (a path or file: URI), which MLflow no longer accepts."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not env:
        return f"sqlite:///{main_repo_root(root) / params.tracking.store}"
    scheme = env.split(":", 1)[0] if "://" in env else ""
    if scheme in ("", "file"):
        raise ChexopsError(f"MLFLOW_TRACKING_URI={redact_url(env)} is a file store, which MLflow no "
                           f"longer supports; use sqlite:///mlflow.db (the repo's store) or a "
                           f"server's http:// URL")
    if env.startswith("sqlite:///") and not env.startswith("sqlite:////"):
        return f"sqlite:///{main_repo_root(root) / env[len('sqlite:///'):]}"
    return env


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


# ---------------------------------------------------------------- logging to a run

@dataclass
class StageRun:
    """One MLflow run, with the few logging calls stages need (None metrics are skipped)."""
    client: "MlflowClient"
    run_id: str
    experiment_id: str
    trial_id: str | None = None  # the trial run it is nested under, if any

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


def log_datasets(run: StageRun, md5s: dict[str, str]) -> None:
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



def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten nested metrics and keep the numbers (lists, notes and None are left out)."""
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
