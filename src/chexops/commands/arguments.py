"""The arguments of every `chexops` command, in one light module: the CLI builds its whole
parser from here without importing torch, mlflow or pandas, so `chexops --help` and a bad
params file answer at once, and each command module imports what it needs at its top."""
from __future__ import annotations

import argparse

from chexops.config import N_ROUNDS
from chexops.tracking.verdict import DEFAULT_TOLERANCE


def train_round(parser: argparse.ArgumentParser) -> None:
    """`chexops train-round`."""
    parser.add_argument("k", type=int, help=f"round number, 1 to {N_ROUNDS}")


def lr_find(parser: argparse.ArgumentParser) -> None:
    """`chexops lr-find`."""
    parser.add_argument("k", type=int, help=f"round number, 1 to {N_ROUNDS}")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default: plots/lr-find/round-K.png)")


def reproduce(parser: argparse.ArgumentParser) -> None:
    """`chexops reproduce`."""
    parser.add_argument("run_ref", metavar="RUN",
                        help="the trial's MLflow run id, or a DVC experiment name")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="allowed metric difference, relative to max(1, |old|) "
                             f"(default {DEFAULT_TOLERANCE}; GPU kernels are not bit-exact)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    parser.add_argument("--workdir", default=None,
                        help="folder to create the temporary workspace in (default: system temp)")
    parser.add_argument("--rederive", action="store_true",
                        help="when the DVC remote rejects the credentials or is unreachable, "
                             "re-derive the source data from data.source instead of refusing "
                             "(its md5 is still checked)")


def ui(parser: argparse.ArgumentParser) -> None:
    """`chexops ui`."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; anything else exposes the UI)")
    parser.add_argument("--port", type=int, default=5000)


def compare(parser: argparse.ArgumentParser) -> None:
    """`chexops compare`."""
    parser.add_argument("a", metavar="A", help="MLflow run id, DVC experiment name, or workspace")
    parser.add_argument("b", metavar="B", help="MLflow run id, DVC experiment name, or workspace")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (0.05)")
    parser.add_argument("--per-study", action="store_true",
                        help="compare per study (max over views), as the CheXpert paper does")
    parser.add_argument("--split", choices=("valid", "test"), default="valid",
                        help="valid (default), or test: the held-out test cohort that nothing "
                             "selected on")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def predict(parser: argparse.ArgumentParser) -> None:
    """`chexops predict`."""
    parser.add_argument("images", nargs="+", help="image files (JPEG/PNG)")
    parser.add_argument("--model", required=True,
                        help="models:/<name>@champion, runs:/<run id>/model, or a .safetensors file")
    parser.add_argument("--format", choices=("csv", "json"), default="csv")
    parser.add_argument("--heatmaps", metavar="DIR", help="write Grad-CAM overlays here")


def champion(parser: argparse.ArgumentParser) -> None:
    """`chexops champion`."""
    parser.add_argument("--name", help="registered model name (default: params' "
                                       "evaluate.model_name)")
    parser.add_argument("--version", help="model version to promote (default: the latest)")


def tune(parser: argparse.ArgumentParser) -> None:
    """`chexops tune`."""
    parser.add_argument("--trials", type=int, required=True, metavar="N",
                        help="finished (complete or pruned) trials the study should hold; "
                             "every worker joining it runs trials until it does")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="seconds after which this worker starts no new trial "
                             "(the one running finishes)")
    parser.add_argument("--study", default=None, metavar="NAME",
                        help="study name (default: tune.study in params.yaml)")
