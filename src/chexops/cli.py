"""`chexops <stage|command>`: the one console entry point. Thin: parse, load params, dispatch.

Heavy libraries (torch, timm, mlflow) are imported by the stage that needs them, so
`chexops --help` and a bad-params error answer at once.

A command's arguments are defined in chexops.commands.arguments (light: the parser is built
without importing the commands); its module provides `run(args, params, root)`. A stage module
provides `main(params, root)`. Register new ones in the tables below.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chexops.commands import arguments
from chexops.errors import ChexopsError, TrialPruned

if TYPE_CHECKING:  # pragma: no cover
    from chexops.config import Params

# stage name -> module whose main(params, root) runs it
STAGES = {
    "source-fingerprint": "chexops.stages.source_fingerprint",
    "download": "chexops.stages.download",
    "clean": "chexops.stages.clean",
    "resample": "chexops.stages.resample",
    "evaluate": "chexops.stages.evaluate",
}

# command name -> (module with run(args, params, root), help); arguments: commands.arguments
COMMANDS = {
    "train-round": ("chexops.stages.train_round", "run training round K (1-5)"),
    "lr-find": ("chexops.commands.lr_find", "LR range test for round K: plot and suggested lr, no training"),
    "reproduce": ("chexops.commands.reproduce", "re-run a recorded trial and compare its results"),
    "ui": ("chexops.commands.ui", "start the MLflow UI on the embedded store (127.0.0.1)"),
    "compare": ("chexops.commands.compare", "compare two trials: metrics with CIs, paired DeLong test"),
    "predict": ("chexops.commands.predict", "probabilities per image from a registered model or weights"),
    "champion": ("chexops.commands.champion", "set the registry alias champion to a model version"),
    "tune": ("chexops.commands.tune", "hyperparameter search: Optuna trials as DVC experiments"),
}
PRUNED_EXIT = 3  # a tuning trial stopped by its pruner: not an error of the stage


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chexops", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        sub.add_parser(name, help=f"run the {name} stage")
    for name, (_, help_text) in COMMANDS.items():
        define = getattr(arguments, name.replace("-", "_"))
        define(sub.add_parser(name, help=help_text))
    return parser


def _run(args: argparse.Namespace) -> None:
    from chexops.config import load_params

    root = Path(args.root).resolve()
    params_path = Path(args.params)
    params = load_params(params_path if params_path.is_absolute() else root / params_path)
    try:
        if args.command in STAGES:
            importlib.import_module(STAGES[args.command]).main(params, root)
        else:
            importlib.import_module(COMMANDS[args.command][0]).run(args, params, root)
    except BaseException as exc:
        if os.environ.get("DVC_STAGE"):  # a pipeline stage: its trial failed here
            _fail_trial(params, root, os.environ["DVC_STAGE"], exc)
        raise


def _fail_trial(params: Params, root: Path, stage: str, exc: BaseException) -> None:
    """Mark the DVC command's trial run FAILED in `stage`; a store that cannot be reached only
    costs the mark (the stage's own error is what the user must see)."""
    from chexops.tracking import trial

    error = "interrupted" if isinstance(exc, KeyboardInterrupt) else trial.one_line(exc)
    pruned = exc.after_round if isinstance(exc, TrialPruned) else None
    try:
        trial.fail_trial(params, root, stage, error, pruned_after=pruned)
    except Exception as failed:  # noqa: BLE001 - reported, never hides the stage's error
        print(f"chexops {stage}: warning: could not mark the trial run failed ({failed})",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except TrialPruned as exc:
        print(f"chexops {args.command}: {exc}", file=sys.stderr)
        return PRUNED_EXIT
    except ChexopsError as exc:
        print(f"chexops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chexops {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
