"""`chexops train-round K`: training round K of five.

Reads data/resampled/{train,valid}.parquet (or, for a round with `resample:`, a fresh seeded draw
from data/clean/labels.parquet), starts from round K-1's best weights, trains, and writes
models/round-K/best.safetensors + meta.json, metrics/round-K.json, plots/round-K/history.csv.
An interrupted round resumes from checkpoints/round-K/last.pt and continues its MLflow run,
but only when nothing that shapes the result changed: the checkpoint's fingerprint covers the
round's params, its data inputs' md5s, the md5s of its code deps (the src/ deps of the stage in
dvc.yaml) and, for round 1, the md5 of a `model.pretrained` weights file.

`model.pretrained: <path>` (relative to the repository root) is not a DVC dependency: DVC cannot
declare a dep whose path is a param that may be `false` (templating `${model.pretrained}` into
deps fails on DVC 3.67). DVC re-runs round 1 when the *path* changes (it is in the `model`
params); the file's md5 is recorded in meta.json's inputs, the fingerprint and the MLflow tag
`pretrained_md5`. After replacing the file's content under the same path, give it a new name
(e.g. its md5) or run `dvc repro -f train-round-1`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chexops import paths
from chexops.config import N_ROUNDS, Params
from chexops.errors import ChexopsError
from chexops.model.coding import needs_teacher
from chexops.model.recipe import params_recipe, recipe_metadata
from chexops.runtime import prepare, seed_everything
from chexops.tracking import runs as tracking
from chexops.training import auc_margin, checkpoint, distributed, rounds
from chexops.training.loop import train_round
from chexops.training.teacher import resolve_teacher
from chexops.tuning import report as tune_report


def run(args: argparse.Namespace, params: Params, root: Path) -> None:
    """`runtime.distributed: torchrun` re-launches this command under torchrun (so `dvc repro`
    still drives it); inside torchrun (or a torchrun started by hand) it trains as one rank.
    In a `chexops tune` trial that its pruner stopped after an earlier round, raises TrialPruned
    before anything trains."""
    tune_report.stop_if_pruned(args.k)
    if params.runtime.distributed == "torchrun" and not distributed.under_torchrun():
        params_path = Path(args.params) if Path(args.params).is_absolute() else root / args.params
        cli = ["--params", str(params_path), "--root", str(root), "train-round", str(args.k)]
        distributed.relaunch(distributed.torchrun_command(cli, params.runtime.nproc_per_node),
                             root)
        return
    main(params, root, args.k)


def main(params: Params, root: Path, k: int) -> None:
    """Round k; under torchrun this process is one rank of a data-parallel run."""
    with distributed.process_group(prepare(params.runtime), params.runtime.threads) as ctx:
        _main(params, Path(root), k, ctx.device)


@dataclass
class _Start:
    """What round k starts from, settled before MLflow: a bad arch or weights file fails fast."""
    plan: Any
    train_df: Any
    valid_df: Any
    md5s: dict[str, str]
    fingerprint: str
    ckpt_path: Path
    resume: dict[str, Any]
    model: Any


def _start(params: Params, root: Path, k: int) -> _Start:
    if not 1 <= k <= N_ROUNDS:
        raise ChexopsError(f"round {k} does not exist; give a round from 1 to {N_ROUNDS}")
    if params.round(k).loss == auc_margin.AUC_MARGIN:
        auc_margin.require_libauc()  # fail fast: before any data is read or a run is opened
    train_df, valid_df = rounds.load_frames(params, root, k)
    md5s = rounds.input_md5s(root, k, params.round(k).resample is not None, params)
    fingerprint = rounds.round_fingerprint(params, root, k, md5s)
    ckpt_path = checkpoint.checkpoint_path(root, k)
    resume = rounds.resume_info(ckpt_path, fingerprint)
    seed_everything(params.seed)  # the initial head weights come from the seed
    model = rounds.build_start_model(params, rounds.previous_weights(root, k), root)
    if params.clean.teacher and ":/" not in params.clean.teacher and needs_teacher(params):
        resolve_teacher(params.clean.teacher, root)  # a missing teacher file fails fast too
    return _Start(rounds.plan_for(params, k), train_df, valid_df, md5s, fingerprint, ckpt_path,
                  resume, model)


def _log_inputs(stage_run: Any, params: Params, root: Path, k: int, start: _Start) -> None:
    stage_run.log_params(rounds.mlflow_params(params, k, len(start.train_df), len(start.valid_df)))
    pretrained = rounds.pretrained_md5(params, root) if k == 1 else {}
    if pretrained:  # not a DVC dep (see training.rounds): its md5 is on the run
        (path, md5), = pretrained.items()
        stage_run.set_tags({"pretrained_path": path, "pretrained_md5": md5})


def _main(params: Params, root: Path, k: int, device) -> None:
    start = _start(params, root, k)
    tracked = (tracking.stage_run(params, root, rounds.stage_name(k),
                                  resume_run_id=start.resume["run_id"])
               if distributed.is_main() else contextlib.nullcontext(distributed.NullRun()))
    with tracked as stage_run:
        _log_inputs(stage_run, params, root, k, start)
        with distributed.main_first():  # rank 0 builds the image cache, the others reuse it
            train, teacher = rounds.train_set(params, root, start.train_df, device)
            valid = rounds.array_set(params, root, start.valid_df)
        if teacher is not None:  # U-SelfTrained: whose labels the round learns from
            stage_run.set_tags(teacher)
            stage_run.log_params({"teacher": teacher["teacher"]})
        _train(params, root, k, device, start, train, valid, teacher, stage_run)


def _train(params: Params, root: Path, k: int, device, start: _Start, train, valid,
           teacher: dict | None, stage_run: Any) -> None:
    plan, found_lr = rounds.resolve_auto_lr(start.plan, params, k, start.model, train, device,
                                            stage_run, start.resume["lr_found"])
    meta = {"round": k, "seed": params.seed, "params": rounds.round_params(params, k),
            "inputs": start.md5s, "code": rounds.code_md5s(root, k), "run_id": stage_run.run_id,
            "fingerprint": start.fingerprint, "lr_found": found_lr, "teacher": teacher}
    result = train_round(
        start.model, train, valid, plan, root / paths.round_weights(k), device, start.ckpt_path,
        start.fingerprint, stage_run.run_id,
        on_epoch_end=lambda row: stage_run.log_metrics_once(
            {key: v for key, v in row.items() if key != "epoch"}, step=row["epoch"]),
        weights_metadata={"round": str(k), "seed": str(params.seed),
                          **recipe_metadata(params_recipe(params))},
        lr_found=found_lr)
    meta.update(best_epoch=result.best_epoch, batch_size=result.batch_size,
                micro_batch=result.micro_batch, world_size=distributed.world_size(),
                resumed_from_epoch=result.resumed_from)
    if not distributed.is_main():
        return
    rounds.write_outputs(root, k, result, meta)
    rounds.log_best(stage_run, root, k, result)
    kept = result.best_epoch == 0
    stage_run.set_tags({"chexops.kept_start": str(kept).lower()})
    what = ("no epoch beat the weights it started from, which it hands on" if kept
            else f"best epoch {result.best_epoch}")
    print(f"train-round-{k}: {what}, validation AUROC {result.best_metrics['auroc']:.4f}",
          file=sys.stderr)
    tune_report.report_round(params, k, result.best_metrics["auroc"])  # in a tuning trial
