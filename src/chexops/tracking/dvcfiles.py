"""dvc.yaml and dvc.lock, read: the pipeline's stages, the paths a stage lists and the md5 DVC
recorded for each output. Provenance, the trial run and `chexops reproduce` all read them here.

No DVC import: the files are plain YAML, so reading them costs a YAML parse and nothing more.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from chexops.errors import ChexopsError

# deps under these prefixes are code, not data
CODE_PREFIXES = ("src/",)


def read_yaml(path: Path) -> dict:
    """The mapping a YAML file holds; {} when the file is missing or empty."""
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def stages(root: str | Path) -> dict[str, dict]:
    """{stage name: its dvc.yaml entry}, in the file's order; {} without a dvc.yaml."""
    return read_yaml(Path(root) / "dvc.yaml").get("stages") or {}


def stage(root: str | Path, name: str) -> dict:
    """The dvc.yaml entry of stage `name`; a ChexopsError when dvc.yaml does not list it."""
    found = stages(root).get(name)
    if found is None:
        raise ChexopsError(f"stage {name!r} is not in {Path(root) / 'dvc.yaml'}; "
                           f"run chexops from the repository root or fix the stage name")
    return found


def paths_of(entry: dict, *keys: str) -> list[str]:
    """The paths a stage entry lists under `keys` (deps, outs, metrics, plots); each item is a
    path or a one-key mapping {path: options}."""
    items: list[Any] = [e for key in keys for e in entry.get(key) or []]
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in items]


def is_code(path: str) -> bool:
    return path.startswith(CODE_PREFIXES)


def within(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def lock_outs(root: str | Path) -> dict[str, str]:
    """{out path: md5} over every stage of dvc.lock (a directory's md5 ends in .dir); {} when
    there is no dvc.lock."""
    lock = read_yaml(Path(root) / "dvc.lock")
    return {o["path"]: o["md5"] for s in (lock.get("stages") or {}).values()
            for o in s.get("outs") or [] if "md5" in o and "path" in o}


def source_stages(root: str | Path) -> dict[str, list[str]]:
    """Stages that read no data, with their outs: they bring the data in. Their deps are code,
    or the fingerprint an `always_changed` stage writes of a source outside the pipeline (the
    `source-fingerprint` stage, which is no source itself: it writes no data)."""
    found = stages(root)
    watched = {o for s in found.values() if s.get("always_changed") for o in paths_of(s, "outs")}
    return {name: paths_of(s, "outs") for name, s in found.items()
            if not s.get("always_changed")
            and all(is_code(d) or d in watched for d in paths_of(s, "deps"))}
