"""`chexops tune --trials N [--timeout S] [--study NAME]`: hyperparameter search with Optuna, each
trial a DVC experiment (`dvc exp run --temp`), joined by any number of workers.

The search space, objective, sampler, pruner and storage are params.yaml's `tune:` section
(checked with every other param before anything runs); the storage must answer before any
training starts. At the end: the best trial with its DVC experiment and MLflow run, and Optuna's
plots in reports/tune/<study>/ and on the study's MLflow summary run.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

from chexops.config import Params
from chexops.config.tune_rules import validate_tune
from chexops.errors import ChexopsError
from chexops.redact import redact_url
from chexops.tracking import git
from chexops.tuning import results, storage, worker
from chexops.tuning.space import make_sampler


def _settings(args: argparse.Namespace, params: Params, root: Path) -> Params:
    """params with --study applied and checked; refuses what cannot run."""
    if args.trials < 1:
        raise ChexopsError(f"--trials {args.trials}: give the number of trials, at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise ChexopsError(f"--timeout {args.timeout}: give seconds > 0")
    if (root / args.params).resolve() != (root / "params.yaml").resolve():
        raise ChexopsError(f"--params {args.params}: the trials run `dvc exp run -S`, which "
                           f"changes params.yaml; put the search in params.yaml's tune section")
    if args.study is not None:
        params = dataclasses.replace(params, tune=dataclasses.replace(params.tune, study=args.study))
    validate_tune(params)
    if not params.tune.space:
        raise ChexopsError("tune.space in params.yaml is empty; map a param to a distribution, "
                           "e.g. lr: {log_uniform: [1.0e-4, 1.0e-2]}")
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        raise ChexopsError(f"{root} is not the pipeline's repository (no .dvc or dvc.yaml); "
                           f"run chexops tune from its root")
    return params


def _check_names_free(root: Path, study: str) -> None:
    """A new study must not meet DVC experiments left by an older study of the same name."""
    refs = git.output(root, "for-each-ref", "--format=%(refname)", "refs/exps/") or ""
    ours = re.compile(rf"{re.escape(study)}-t\d+")
    taken = sorted({r.rsplit("/", 1)[-1] for r in refs.split() if ours.fullmatch(r.rsplit("/", 1)[-1])})
    if taken:
        raise ChexopsError(f"study {study!r} is new in its storage, but DVC experiments "
                           f"{', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''} exist from "
                           f"an earlier study of that name; use another --study or "
                           f"`dvc exp remove {taken[0]} ...`")


def run(args: argparse.Namespace, params: Params, root: Path) -> None:
    params = _settings(args, params, root)
    name = params.tune.study
    url = storage.storage_url(params, root)
    store = storage.open_storage(url, params.tune.heartbeat_s)  # unreachable: fails here
    study = storage.load_study(params, url, name, store, sampler=make_sampler(params))
    if not study.get_trials(deepcopy=False):
        _check_names_free(root, name)
    print(f"chexops tune: study {name} in {redact_url(url)}: {args.trials} trials in all, "
          f"objective {results.metric_name(params)} ({params.tune.direction})", file=sys.stderr)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    ran = worker.run(worker.Worker(params, root, url, study, store, args.trials, deadline))
    found = results.summary(params, study, url)
    report = results.write_report(root, found, results.draw_plots(study))
    run_id = results.log_summary(params, root, found, report)
    _print_result(found, ran, report, run_id)


def _print_result(found: dict, ran: list[int], report: Path, run_id: str) -> None:
    counts = ", ".join(f"{n} {state}" for state, n in found["counts"].items() if n)
    print(f"chexops tune: study {found['study']}: {counts or 'no trials'}; this worker ran "
          f"{len(ran)} trial(s)")
    best = found["best"]
    if best is None:
        print("chexops tune: no trial has finished yet")
    else:
        print(f"best trial {best['number']}: {found['metric']} = {best['value']:.4f}")
        print(f"  DVC experiment: {best['experiment'] or '-'}")
        print(f"  MLflow trial run: {best['mlflow_run_id'] or '-'}")
        print("  params: " + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    print(f"report: {report} (MLflow run {run_id})")
