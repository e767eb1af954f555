"""`chexops ui`: the MLflow UI on the embedded store, bound to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from chexops.config import Params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; anything else exposes the UI)")
    parser.add_argument("--port", type=int, default=5000)


def run(args: argparse.Namespace, params: Params, root: Path) -> None:
    from chexops.tracking.runs import ui_command

    argv = ui_command(params, root, port=args.port, host=args.host)
    os.execvp(argv[0], argv)
