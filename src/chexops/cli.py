"""`chexops <stage|command>`: the one console entry point. Thin: parse, load params, dispatch.

Heavy libraries (torch, timm, mlflow) are imported by the stage that needs them, so
`chexops --help` and a bad-params error answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from chexops.errors import ChexopsError

# stage name -> module whose main(params, root) runs it
STAGES = {
    "download": "chexops.data.download",
    "clean": "chexops.data.clean",
    "resample": "chexops.data.resample",
    "evaluate": "chexops.stages.evaluate",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chexops", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        sub.add_parser(name, help=f"run the {name} stage")
    train = sub.add_parser("train-round", help="run training round K (1-5)")
    train.add_argument("k", type=int, choices=range(1, 6), metavar="K")
    ui = sub.add_parser("ui", help="start the MLflow UI on the embedded store (127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def _run(args: argparse.Namespace) -> None:
    from chexops.config import load_params

    root = Path(args.root).resolve()
    params = load_params(root / args.params if not Path(args.params).is_absolute() else args.params)
    if args.command in STAGES:
        importlib.import_module(STAGES[args.command]).main(params, root)
    elif args.command == "train-round":
        from chexops.stages import train_round

        train_round.main(params, root, args.k)
    elif args.command == "ui":
        from chexops.tracking import ui_command

        argv = ui_command(params, root, port=args.port, host=args.host)
        os.execvp(argv[0], argv)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except ChexopsError as exc:
        print(f"chexops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chexops {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
