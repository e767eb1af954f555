"""What a training round needs around the loop: its inputs (the resampled split or a fresh
seeded draw, round k-1's weights), their md5s and the checkpoint fingerprint, the start model,
the image sets, the LR finder's choice, and its outputs (weights, meta.json, metrics, history).

The `chexops train-round K` stage (chexops.stages.train_round) strings these together.
`model.pretrained: <path>` is not a DVC dependency: DVC cannot declare a dep whose path is a
param that may be `false`; its md5 goes into meta.json, the fingerprint and the MLflow tag
`pretrained_md5`.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chexops import atomic, paths
from chexops.config import Params, ResampleDraw, to_dict
from chexops.data.batches import ArraySet
from chexops.data.images import image_store
from chexops.data.resample import resample_frame
from chexops.errors import ChexopsError
from chexops.evaluation.confusion import confusion_figure
from chexops.hashing import file_md5
from chexops.model.coding import encode_labels, needs_teacher, output_coding
from chexops.model.network import build_model, pretrained_path
from chexops.model.recipe import params_recipe, refuse, warn_assumed
from chexops.model.weights import load_model, read_recipe
from chexops.paths import image_cache_dir
from chexops.tracking.provenance import dvc_code_md5s, dvc_input_md5s
from chexops.training import checkpoint, distributed
from chexops.training.loop import RoundPlan
from chexops.training.lr_finder import auto_lr
from chexops.training.teacher import self_train


def stage_name(k: int) -> str:
    return f"train-round-{k}"


# ---------------------------------------------------------------- inputs

def previous_weights(root: Path, k: int) -> Path | None:
    """Round k-1's best weights (round 1 starts from the model's initial weights)."""
    if k == 1:
        return None
    rel = paths.round_weights(k - 1)
    return paths.require(root, rel, f"run `dvc repro {stage_name(k - 1)}` first")


def fresh_draw(params: Params, root: Path, draw: ResampleDraw) -> pd.DataFrame:
    """The seed study's new sample for a round: resample the clean training rows with the
    round's own seed, then keep draw.size rows (all when 0)."""
    labels = pd.read_parquet(paths.require(root, paths.CLEAN_LABELS, "run `dvc repro clean` first"))
    train = labels[~labels["valid"].astype(bool)]
    out = resample_frame(train, target=params.targets[0], strategy=params.resample.strategy,
                         fraction=1.0, seed=draw.seed)
    if 0 < draw.size < len(out):
        out = out.sample(n=draw.size, random_state=draw.seed)
    return out.reset_index(drop=True)


def load_frames(params: Params, root: Path, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    fix = "run `dvc repro resample` first"
    valid = pd.read_parquet(paths.require(root, paths.RESAMPLED_VALID, fix))
    draw = params.round(k).resample
    train = (fresh_draw(params, root, draw) if draw is not None
             else pd.read_parquet(paths.require(root, paths.RESAMPLED_TRAIN, fix)))
    return train, valid


def label_matrix(params: Params, df: pd.DataFrame) -> np.ndarray:
    """(N, T) float raw labels of the targets (1 / 0 / -1); chexops.model.coding encodes them."""
    for t in params.targets:
        if t not in df.columns:
            raise ChexopsError(f"target {t!r} is not a column of the label table; "
                               f"run `dvc repro clean` with targets including it")
    return df[list(params.targets)].to_numpy(dtype=np.float32)


def array_set(params: Params, root: Path, df: pd.DataFrame):
    """Rows index the shared decoded-image store (memory-mapped, no copy: at 320 px a CheXpert
    round's images are ~12 GB); repeated rows (oversampling) share one image."""
    uniq, index = np.unique(df["Path"].astype(str).to_numpy(), return_inverse=True)
    pixels, slots = image_store(root / paths.RAW_ZIP, uniq.tolist(), params.train.image_size,
                                image_cache_dir(root), params.runtime.workers)
    labels, mask = encode_labels(params, label_matrix(params, df))
    return ArraySet(pixels, labels, mask, slots[index].astype(np.int64))


def train_set(params: Params, root: Path, df: pd.DataFrame, device) -> tuple[Any, dict | None]:
    """The training ArraySet; under U-SelfTrained the teacher relabels its uncertain labels
    (returns the teacher's identity for MLflow, else None)."""
    data = array_set(params, root, df)
    if not needs_teacher(params):
        return data, None
    return self_train(params, root, data, label_matrix(params, df), device,
                      df["Path"].astype(str).tolist())


# ---------------------------------------------------------------- provenance

def input_files(root: Path, k: int, fresh: bool) -> list[Path]:
    files = [paths.RAW_ZIP, paths.RESAMPLED_VALID,
             paths.CLEAN_LABELS if fresh else paths.RESAMPLED_TRAIN]
    if k > 1:
        files.append(paths.round_weights(k - 1))
    return files


def input_md5s(root: Path, k: int, fresh: bool, params: Params | None = None) -> dict[str, str]:
    """md5 of each input as DVC records it (dvc.lock), else computed from the files; plus, for
    round 1, the `model.pretrained` weights file's md5 under its path as written in params."""
    try:
        found = dvc_input_md5s(root, stage_name(k))
    except ChexopsError:  # no dvc.yaml (a bare checkout or a test): hash the files
        found = {}
    if not found:
        found = {f.as_posix(): file_md5(root / f) for f in input_files(root, k, fresh)
                 if (root / f).is_file()}
    if params is not None and k == 1:
        found.update(pretrained_md5(params, root))
    return found


def pretrained_md5(params: Params, root: Path) -> dict[str, str]:
    """{model.pretrained as written: md5} when it names a weights file (it is resolved against
    the repository root); empty for true/false, or a missing file (the model build says so)."""
    path = pretrained_path(params.model, root)
    if path is None or not path.is_file():
        return {}
    return {str(params.model.pretrained): file_md5(path)}


def code_md5s(root: Path, k: int) -> dict[str, str]:
    """md5 of each code dep (src/...) of the stage in dvc.yaml, from the files now."""
    return dvc_code_md5s(root, stage_name(k))


def round_fingerprint(params: Params, root: Path, k: int, md5s: dict[str, str]) -> str:
    """What a checkpoint must match to be resumed: params, data inputs (and pretrained weights),
    and the stage's code, so epochs trained by other code are never continued."""
    return checkpoint.fingerprint({"params": round_params(params, k), "inputs": md5s,
                                   "code": code_md5s(root, k)})


def round_params(params: Params, k: int) -> dict[str, Any]:
    """Everything that shapes round k's result (the checkpoint fingerprint and meta.json)."""
    return {"round": k, "seed": params.seed, "targets": list(params.targets),
            "uncertainty": {t: params.uncertainty_policy(t) for t in params.targets},
            "teacher": [params.clean.teacher, params.clean.teacher_labels]
            if needs_teacher(params) else None,
            "resample": to_dict(params.resample), "rounds": to_dict(params.round(k)),
            "model": to_dict(params.model),
            "train": to_dict(params.train)}


def mlflow_params(params: Params, k: int, n_train: int, n_valid: int) -> dict[str, Any]:
    r = params.round(k)
    out: dict[str, Any] = {"round": k, "epochs": r.epochs, "freeze": r.freeze,
                           "batch_size": params.train.batch_size,
                           "image_size": params.train.image_size, "seed": params.seed,
                           "arch": params.model.arch, "head": params.model.head,
                           "n_train": n_train, "n_valid": n_valid, "loss": r.loss}
    if isinstance(r.lr, tuple):
        out.update(lr=str(list(r.lr)), lr_lo=r.lr[0], lr_hi=r.lr[1])
    else:
        out["lr"] = r.lr
    if r.resample is not None:
        out.update(resample_seed=r.resample.seed, resample_size=r.resample.size)
    return out


# ---------------------------------------------------------------- outputs

def write_outputs(root: Path, k: int, result, meta: dict[str, Any]) -> None:
    atomic.write_json(root / paths.round_meta(k), meta)
    atomic.write_json(root / paths.round_metrics(k), round_metrics(result))
    with atomic.atomic_path(root / paths.round_history(k), ".csv") as tmp:
        pd.DataFrame(result.history).to_csv(tmp, index=False)


def round_metrics(result) -> dict[str, Any]:
    """The best epoch's row; per-target details (confusion, specificity, ...) flat for one target."""
    best = dict(result.best_metrics)
    per = best.pop("targets")
    if len(per) == 1:
        best.update(next(iter(per.values())))
    else:
        best["targets"] = per
    # best epoch 0: no epoch beat the weights the round started from, which it hands on
    return {**best, "best_epoch": result.best_epoch, "kept_start": result.best_epoch == 0,
            "batch_size": result.batch_size, "micro_batch": result.micro_batch,
            "loss": result.loss}


def log_best(stage_run, root: Path, k: int, result) -> None:
    """The best epoch's confusion matrix (JSON and figure) and weights, on the MLflow run."""
    per = result.best_metrics["targets"]
    stage_run.log_dict({t: m["confusion"] for t, m in per.items()}, "confusion.json")
    if len(per) > 1:  # multi-label: each target's best-epoch metrics beside the mean
        stage_run.log_metrics({f"best.{t}.{key}": m.get(key) for t, m in per.items()
                               for key in ("auroc", "precision", "recall", "error_rate")})
    for t, m in per.items():
        name = "confusion.png" if len(per) == 1 else f"confusion-{t.replace(' ', '_')}.png"
        stage_run.log_figure(confusion_figure(m["confusion"], t), name)
    stage_run.log_artifact(root / paths.round_weights(k), "model")
    stage_run.log_artifact(root / paths.round_meta(k), "model")


# ---------------------------------------------------------------- main

def plan_for(params: Params, k: int):
    r = params.round(k)  # lr may be "auto": the stage replaces it by the LR finder's choice
    lr = params.lr if r.lr is None else r.lr  # config lets only round 1 inherit the top-level lr
    return RoundPlan(r.epochs, lr, r.freeze, params.seed, tuple(params.targets),
                     params.train, params.runtime, output_coding(params), r.loss or "bce")


def build_start_model(params: Params, prev: Path | None, root: Path | None = None):
    """Round k-1's weights in the network params describe, or (round 1) the model with
    model.pretrained, a relative weights path resolved against `root` (the repository root).
    Weights whose recipe differs from params' (network, targets, coding, image size) raise
    ChexopsError: the round would continue weights trained otherwise than params say."""
    if prev is None:
        return build_model(params.model, output_coding(params).n_outputs, root)
    recipe = read_recipe(prev, params)
    what = f"the weights {prev}"
    refuse(recipe, params, ("*",), what,
           "they are stale: re-run the earlier rounds (`dvc repro` does) or set params back")
    warn_assumed(recipe, params, "chexops", what)
    return load_model(prev, recipe=params_recipe(params))[0]  # round k-1's replace pretrained


def resolve_auto_lr(plan, params: Params, k: int, model, train, device, stage_run,
                    lr_found: float | None = None):
    """`lr: auto` -> the LR range test's choice, logged to the round's run; a resumed
    round reuses the choice stored in its checkpoint (`lr_found`) instead of re-running it."""
    if plan.lr != "auto":
        return plan, None
    if lr_found is not None:
        print(f"chexops: rounds.r{k}: lr auto -> {lr_found:.3e} (from the checkpoint)",
              file=sys.stderr)
        return dataclasses.replace(plan, lr=lr_found), lr_found
    lr, _ = auto_lr(model, train, plan, device, params.train.lr_find, f"rounds.r{k}", stage_run)
    return dataclasses.replace(plan, lr=lr), lr


def resume_info(ckpt_path: Path, fingerprint: str) -> dict[str, Any]:
    """{run_id, lr_found} of the checkpoint this round will resume (both None when none): read
    by rank 0 and broadcast, so every rank takes the same path (e.g. skips the LR range test)."""
    info: dict[str, Any] = {"run_id": None, "lr_found": None}
    if distributed.is_main():
        saved = checkpoint.load_checkpoint(ckpt_path, fingerprint)  # train_round reloads it
        if saved:
            info = {"run_id": saved["run_id"], "lr_found": saved.get("lr_found")}
    return distributed.broadcast_object(info)
