"""Where a run came from: data md5s as DVC records them, the git revision, library versions.

Nothing here imports torch or mlflow, so any stage can record its provenance cheaply.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from chexops.hashing import file_md5, tree_md5
from chexops.paths import main_repo_root
from chexops.tracking import dvcfiles, git
from chexops.tracking.dvcfiles import is_code, within

LIBRARIES = {  # label -> distribution name
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "mlflow": "mlflow",
    "dvc": "dvc", "numpy": "numpy", "pandas": "pandas", "sklearn": "scikit-learn",
}


# ---------------------------------------------------------------- data hashes

def _dvc_cache_dirs(root: Path) -> list[Path]:
    """Where DVC 3 keeps objects: the repo's own cache and, in an exp temp workspace, the main one."""
    dirs = [root / ".dvc" / "cache" / "files" / "md5"]
    main = main_repo_root(root)
    if main != root:
        dirs.append(main / ".dvc" / "cache" / "files" / "md5")
    return dirs


def _md5_in_dir_out(root: Path, dep: str, out: str, dir_md5: str) -> str | None:
    """A file inside a directory out: DVC lists each file's md5 in the .dir manifest it caches."""
    rel = Path(dep).relative_to(out).as_posix()
    for cache in _dvc_cache_dirs(root):
        manifest = cache / dir_md5[:2] / dir_md5[2:]
        if manifest.is_file():
            entries = json.loads(manifest.read_text())
            found = {e.get("relpath"): e.get("md5") for e in entries}
            if rel in found:
                return found[rel]
    return None


def dvc_input_md5s(root: str | Path, stage: str) -> dict[str, str]:
    """{dep path: md5} for the data deps of `stage` (code deps under src/ are skipped).

    Rule, in order, so the md5 equals what DVC records:
    1. the dep is an *out* of a stage in dvc.lock -> that out's md5 (a directory's ends in .dir);
    2. the dep is a file inside an out directory (data/raw/chexpert.zip inside data/raw) -> its md5
       from the directory's .dir manifest in the DVC cache (what DVC itself lists for the file);
    3. otherwise, a file that exists -> its plain md5, computed now (DVC 3's file md5).
    This stage's own old dvc.lock deps entry is never used: while the stage runs it describes the
    previous run's inputs, which may have changed. Deps that match none of these are left out,
    and so is everything when `root` has no dvc.yaml.
    """
    root = Path(root)
    if not (root / "dvc.yaml").is_file():
        return {}  # outside a DVC pipeline (a library call, a unit test): no recorded inputs
    deps = dvcfiles.paths_of(dvcfiles.stage(root, stage), "deps")
    outs = dvcfiles.lock_outs(root)
    result: dict[str, str] = {}
    for dep in (d for d in deps if not is_code(d)):
        md5 = outs.get(dep)
        if md5 is None:
            parent = next((o for o in outs if dep != o and within(dep, o)), None)
            if parent and outs[parent].endswith(".dir"):
                md5 = _md5_in_dir_out(root, dep, parent, outs[parent])
        if md5 is None and (root / dep).is_file():
            md5 = file_md5(root / dep)
        if md5 is not None:
            result[dep] = md5
    return result


def dvc_code_md5s(root: str | Path, stage: str) -> dict[str, str]:
    """{dep path: md5} for the *code* deps of `stage` (those under src/ in dvc.yaml), computed
    from the files now (DVC 3's md5 for a file), so a code change shows even while the stage's
    old dvc.lock entry still describes the previous code. Empty when `root` has no dvc.yaml;
    deps that do not exist are left out (DVC itself refuses to run the stage then)."""
    root = Path(root)
    if not (root / "dvc.yaml").is_file():
        return {}
    deps = dvcfiles.paths_of(dvcfiles.stage(root, stage), "deps")
    return {dep: tree_md5(root / dep) for dep in deps if is_code(dep) and (root / dep).exists()}


# ---------------------------------------------------------------- environment

def _pipeline_outputs(root: Path) -> set[str]:
    """dvc.lock and every out/metric/plot in dvc.yaml: the pipeline rewrites these itself."""
    paths = {"dvc.lock"}
    for entry in dvcfiles.stages(root).values():
        paths.update(dvcfiles.paths_of(entry, "outs", "metrics", "plots"))
    return paths


def _porcelain_paths(status: str) -> list[str]:
    """Paths from `git status --porcelain -z` (unquoted; a rename's source entry is skipped)."""
    entries, paths = status.split("\0"), []
    i = 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            paths.append(entry[3:])
            if entry[0] in "RC":  # rename/copy: the next entry is the old path
                i += 1
        i += 1
    return paths


def git_info(root: str | Path) -> dict[str, Any]:
    """{commit, dirty, changed}: the code revision; dirty when tracked files other than the
    pipeline's own outputs differ from it. Outside a git repo: commit None, dirty None."""
    root = Path(root)
    commit = git.output(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "changed": []}
    status = git.output(root, "status", "--porcelain", "-z", "--untracked-files=no") or ""
    # params.yaml is logged in full on every trial and restored by `chexops reproduce`, so a
    # `dvc exp run -S` edit to it is not code that could be lost
    outputs = _pipeline_outputs(root) | {"params.yaml"}
    changed = [p for p in _porcelain_paths(status) if not any(within(p, o) for o in outputs)]
    return {"commit": commit.strip(), "dirty": bool(changed), "changed": changed}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, read from package metadata (no imports)."""
    versions = {"python": platform.python_version()}
    for label, dist in LIBRARIES.items():
        try:
            versions[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[label] = "not installed"
    return versions
