"""Build a throw-away copy of this repository with the reduced profile, for end-to-end tests.

The copy is a real git + DVC repository (tracked files only), so `make repro`,
`dvc repro` and `dvc exp run` behave exactly as they would for a user.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.processes import run_group

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Reduced profile: tiny images, a few hundred of them, one epoch per round.
REDUCED = {
    # CPU even where a GPU is present: the bit-identical checks hold on CPU kernels only
    "runtime": {"device": "cpu", "threads": 2, "workers": 0},
    "data": {"synthetic": {"train_patients": 90, "valid_patients": 24, "width": 96,
                           "height": 112, "workers": 1}},
    "train": {"image_size": 32, "batch_size": 16},
    "rounds": {
        "r1": {"epochs": 1, "freeze": False},
        "r2": {"epochs": 1, "freeze": False, "lr": [1.0e-4, 1.0e-3]},
        "r3": {"epochs": 1, "freeze": False, "lr": [5.0e-5, 5.0e-4],
               "resample": {"seed": 3, "size": 120}},
        "r4": {"epochs": 1, "freeze": True, "lr": 1.0e-3, "resample": {"seed": 4, "size": 120}},
        "r5": {"epochs": 1, "freeze": False, "lr": [1.0e-5, 1.0e-4]},
    },
    "evaluate": {"bootstrap": 1000},   # config refuses fewer (unstable CIs)
}


def deep_update(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "rounds":
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def reduced_params(extra: dict | None = None) -> dict:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return deep_update(deep_update(base, REDUCED), extra or {})


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, check=True, capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p]


def pipeline_env(tmp_home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", PYTHONUNBUFFERED="1")
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `cmd`, failing with its output unless it exits 0. It runs in its own process group:
    on timeout or failure the whole group is stopped, e.g. the `chexops train-round` that a
    `dvc repro` started, not only dvc (tests/processes.py)."""
    proc = run_group(cmd, cwd=cwd, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_repo_copy(dest: Path, params: dict) -> Path:
    """Copy the working tree's tracked files to `dest`, write `params`, git-commit it."""
    for rel in tracked_files():
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = pipeline_env()
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "reduced pipeline"], dest, env)
    return dest
