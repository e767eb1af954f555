"""`chexops ui`: the MLflow UI on the embedded store, bound to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from chexops.config import Params


def run(args: argparse.Namespace, params: Params, root: Path) -> None:
    from chexops.tracking.store import ui_command

    argv = ui_command(params, root, port=args.port, host=args.host)
    # browsing runs needs none of MLflow's server-side job runners (several worker processes
    # otherwise, on a laptop's cores); a user who sets the variable keeps their choice
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execvp(argv[0], argv)
