"""One MLflow run per stage: nested under the trial run at once, FINISHED and recorded in
runs/<stage>.json on success, FAILED on error, with CPU, memory (and GPU) system metrics.

A trial (one `dvc repro` / `dvc exp run`) gets one parent run (tracking/trial.py); each stage that
executes in it is nested under it; a stage DVC restored from its cache is linked by the tag
`stage.<name>.run_id`. runs/<stage>.json (a DVC output of each stage) records which run
produced a stage's outputs, which is how the trial finds them.

mlflow is imported inside functions, so `chexops --help` stays fast.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from chexops import atomic, paths
from chexops.config import Params, to_dict
from chexops.errors import ChexopsError
from chexops.redact import redact_url
from chexops.tracking.store import StageRun, log_datasets, open_store, provenance_tags
from chexops.tracking.trial import open_trial

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

SYSTEM_METRICS_INTERVAL_S = 10  # MLflow's default; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins


def _start(client: "MlflowClient", exp_id: str, stage: str, resume_run_id: str | None,
           trial_id: str | None) -> str:
    parent = {"mlflow.parentRunId": trial_id} if trial_id else {}
    if resume_run_id is None:
        return client.create_run(exp_id, run_name=stage, tags=parent).info.run_id
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(resume_run_id)
    except MlflowException:
        raise ChexopsError(f"cannot resume MLflow run {resume_run_id}: not in the tracking store; "
                           f"delete the stale checkpoint to start the stage afresh") from None
    client.update_run(resume_run_id, status="RUNNING")
    for key, value in parent.items():  # a resumed round finishes in the trial that resumed it
        client.set_tag(resume_run_id, key, value)
    return resume_run_id


@contextlib.contextmanager
def _system_metrics(run: StageRun, resumed: bool) -> Iterator[None]:
    """CPU, memory, disk and network (GPU with nvidia-ml-py and a GPU) logged to the run as
    system/* metrics while the stage works: MLflow's SystemMetricsMonitor (psutil)."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # "no GPU" is not news
    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                   resume_logging=resumed, tracking_uri=run.client.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def stage_run(params: Params, root: str | Path, stage: str,
              resume_run_id: str | None = None) -> Iterator[StageRun]:
    """The MLflow run of one stage, nested under its trial (tracking/trial.py) from its start:
    FINISHED and runs/<stage>.json on success, FAILED (KILLED on Ctrl-C) on error."""
    from chexops.tracking.provenance import dvc_input_md5s

    root = Path(root)
    client, exp_id = open_store(params, root)  # fails fast when a server is unreachable
    trial_id = open_trial(client, exp_id, params)
    md5s = dvc_input_md5s(root, stage)
    run = StageRun(client, _start(client, exp_id, stage, resume_run_id, trial_id), exp_id,
                   trial_id)
    print(f"chexops {stage}: MLflow run {run.run_id} in {redact_url(client.tracking_uri)}",
          file=sys.stderr)
    try:
        with _system_metrics(run, resumed=resume_run_id is not None):
            run.set_tags({"chexops.stage": stage, **provenance_tags(params, root, md5s)})
            log_datasets(run, md5s)
            run.log_dict(to_dict(params), "config/params.json")
            yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        client.set_terminated(run.run_id, status)
        raise
    client.set_terminated(run.run_id, "FINISHED")
    atomic.write_json(root / paths.stage_run_file(stage),
                      {"run_id": run.run_id, "experiment_id": exp_id, "stage": stage})
