"""`chexops champion [--name NAME] [--version V]`: point the registry alias `champion` at a model
version (default: the latest), so `models:/<name>@champion` serves and predicts with it.
Light on import: the CLI builds its parser from this module."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from chexops.config import Params

def run(args: argparse.Namespace, params: "Params", root: Path) -> None:
    from chexops.tracking import registry

    registry.use_store(params, root)
    name = args.name or registry.model_name(params)
    version = registry.set_champion(name, args.version)
    print(f"models:/{name}@{registry.ALIAS} -> version {version}", file=sys.stderr)
