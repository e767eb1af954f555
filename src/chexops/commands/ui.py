"""`chexops ui`: the MLflow UI on the embedded store, bound to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from chexops.config import Params


def run(args: argparse.Namespace, params: Params, root: Path) -> None:
    from chexops.tracking.store import ui_command

    argv = ui_command(params, root, port=args.port, host=args.host)
    os.execvp(argv[0], argv)
