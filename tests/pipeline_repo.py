"""Build a throw-away copy of this repository with the reduced profile, for end-to-end tests.

The copy is a real git + DVC repository (tracked files only), so `make repro`,
`dvc repro` and `dvc exp run` behave exactly as they would for a user.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.processes import run_group

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Reduced profile: tiny images, a few hundred of them, one epoch per round.
REDUCED = {
    # CPU even where a GPU is present: the bit-identical checks hold on CPU kernels only
    # one thread: the suite runs on two pytest workers (Makefile), one core each, and torch with
    # more threads than its share of cores collapses (see README, speed)
    "runtime": {"device": "cpu", "threads": 1, "workers": 0},
    "data": {"synthetic": {"train_patients": 90, "valid_patients": 24, "test_patients": 30, "width": 96,
                           "height": 112, "workers": 1}},
    # score_start off: a reduced round trains too little to beat the weights it starts from, so
    # with epoch 0 scored every round would hand on round 1's start and DVC's run-cache would
    # skip the rest; these tests check the pipeline's mechanics with the seed's per-round best
    # (epoch 0 is tested in tests/training, tests/stages and by the default-profile test)
    "train": {"image_size": 32, "batch_size": 16, "score_start": False},
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


def synthetic_zip(dest: Path) -> Path:
    """A CheXpert-v1.0-small zip from the project's own synthetic generator (reduced size), as a
    user's local `data.source`."""
    from chexops.config import params_from_dict
    from chexops.data.synthetic.generate import generate_zip

    params = params_from_dict(reduced_params())
    dest.mkdir(parents=True, exist_ok=True)
    generate_zip(params.data.synthetic, params.data.synthetic.seed, dest / "chexpert-small.zip",
                 dest / "truth.parquet")
    return dest / "chexpert-small.zip"


# Tests using the `shared_pipeline` fixture (tests/conftest.py) carry this mark, so that with
# pytest-xdist's `--dist loadgroup` (Makefile) one worker builds it once and runs them all.
SHARED = pytest.mark.xdist_group("shared_pipeline")

# The shared pipeline: three batches a round keep each stage to its start-up cost; the data comes
# from a local zip so that reproduce can be refused on a changed source.
SHARED_EXTRA = {"train": {"max_batches": 3}}


@dataclass(frozen=True)
class BuiltPipeline:
    """A reduced repo after the README's `make repro`: `repo`, its local zip `source`, the `trial`
    run id make repro logged, and the dvc.lock it wrote (`lock`, as text)."""
    repo: Path
    source: Path
    trial: str
    lock: str


def build_shared_pipeline(base: Path) -> BuiltPipeline:
    """Copy this repo to base/repo with the reduced params and run `make repro` once.

    Tests share it (tests/conftest.py, one pytest worker: the `shared_pipeline` xdist group) and may
    add trials or change its workspace, so each asserts what it caused and not the repo's state."""
    source = synthetic_zip(base / "source")
    params = reduced_params({**SHARED_EXTRA, "data": {"source": str(source)}})
    (base / "repo").mkdir()
    repo = make_repo_copy(base / "repo", params)
    # -o setup: use this test run's venv instead of installing a new one
    run(["make", "-o", "setup", "repro", f"VENV={VENV_BIN.parent}"], repo, pipeline_env())
    # what a DVC user does next: commit dvc.lock, so experiments (queued ones too) start from it
    run(["git", "add", "-A"], repo, pipeline_env())
    run(["git", "commit", "-q", "-m", "make repro"], repo, pipeline_env())
    trials = trial_run_ids(repo)
    assert len(trials) == 1, trials  # a fresh repo: the one trial is make repro's
    built = BuiltPipeline(repo, source, trials[0], (repo / "dvc.lock").read_text())
    (base / "built.json").write_text(json.dumps({"trial": built.trial, "dvc.lock": built.lock}))
    return built


def trial_run_ids(repo: Path) -> list[str]:
    """The trial runs in `repo`'s embedded store, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chexops")
    assert exp is not None, "no 'chexops' experiment in the embedded store"
    runs = client.search_runs([exp.experiment_id], "tags.`chexops.trial` = 'true'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    return [r.info.run_id for r in runs]


# what a copy leaves behind: DVC's per-workspace state, and the store (a copy starts its own, so no
# run of it writes artifacts into the original's absolute artifact folder)
NOT_COPIED = shutil.ignore_patterns("tmp", "mlflow.db", "mlflow.db.lock", "mlartifacts")


def copy_built(built: BuiltPipeline, dest: Path, extra: dict | None = None) -> Path:
    """A copy of the built repo at `dest` (its DVC cache included, so unchanged stages are restored
    and not re-run) with `extra` merged into its params and committed."""
    shutil.copytree(built.repo, dest, symlinks=True, ignore=NOT_COPIED)
    if extra:
        params = deep_update(yaml.safe_load((dest / "params.yaml").read_text()), extra)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = pipeline_env()
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "copy of the shared pipeline"], dest, env)
    return dest
