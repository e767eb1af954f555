"""The temporary workspace `chexops reproduce` re-runs a trial in: which commit holds the trial's
code, a clone at that commit sharing the main repository's git objects, DVC cache, credentials
and remotes, and `dvc repro` run there. Nothing in the main repository changes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chexops import paths
from chexops.errors import ChexopsError
from chexops.redact import redact_text
from chexops.tracking import dvcfiles, remote
from chexops.tracking.git import git
from chexops.tracking.trials import Trial, params_mismatch

EXPS_NAMESPACE = "refs/exps"  # DVC experiment refs: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>


# ---------------------------------------------------------------- which commit

def experiment_ref(trial: Trial) -> str | None:
    """The git ref DVC keeps the trial's experiment under, from its name and baseline commit."""
    name, baseline = trial.tags.get("dvc.exp_name"), trial.tags.get("git.commit")
    if not name or name == "None" or not baseline or baseline == "None" or len(baseline) < 3:
        return None
    return f"{EXPS_NAMESPACE}/{baseline[:2]}/{baseline[2:]}/{name}"


def _normalised_params(raw: Any) -> Any:
    """A params.yaml as the trial logged it (resolved by config); as is when it does not load."""
    from chexops.config import params_from_dict, to_dict

    try:
        return to_dict(params_from_dict(raw or {}))
    except Exception:  # another version's schema: compare what is written
        return raw or {}


def _params_at(main_root: Path, commit: str) -> dict | None:
    """params.yaml as committed in `commit`; None when absent or not a mapping."""
    shown = git(main_root, "show", f"{commit}:params.yaml")
    try:
        found = yaml.safe_load(shown.stdout) if shown.returncode == 0 else None
    except yaml.YAMLError:
        return None
    return found if isinstance(found, dict) else None


def code_commit(main_root: Path, trial: Trial) -> tuple[str, str | None, str | None]:
    """(commit to restore, the DVC experiment it is the commit of, a note for the user).

    A trial run by `dvc exp run` is restored from its experiment's own commit (which holds the
    `-S` params and any uncommitted changes to tracked files), when that ref is here and its
    params.yaml is the trial's; otherwise from the baseline commit recorded on the run."""
    baseline = trial.tags.get("git.commit", "")
    ref = experiment_ref(trial)
    if ref is None:
        return baseline, None, None
    name = trial.tags["dvc.exp_name"]
    proc = git(main_root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if proc.returncode != 0 or not proc.stdout.strip():
        return baseline, None, (f"DVC experiment {name!r} is not in this repository (no {ref}; "
                                f"`dvc exp pull REMOTE {name}` brings it); restoring the baseline "
                                f"commit {baseline[:12]} with the trial's logged params")
    commit = proc.stdout.strip()
    exp_params = _params_at(main_root, commit)
    diff = ["params.yaml"] if exp_params is None else \
        params_mismatch(_normalised_params(exp_params), trial)
    if diff:
        return baseline, None, (f"DVC experiment {name!r} ({commit[:12]}) has other params than "
                                f"the trial ({', '.join(diff[:5])}; re-run since?); restoring "
                                f"the baseline commit {baseline[:12]} with the trial's logged "
                                f"params")
    return commit, name, None


# ---------------------------------------------------------------- the clone

def make_workspace(main_root: Path, commit: str, dest: Path) -> None:
    """A clone of the repository at `commit` sharing its git objects (nothing in main changes)."""
    if git(main_root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise ChexopsError(f"commit {commit[:12]} of the trial is not in {main_root}; "
                           f"`git fetch` the branch it was made on, then try again")
    dest = Path(dest).resolve()
    for root, args in ((main_root, ("clone", "--quiet", "--shared", "--no-checkout",
                                    str(Path(main_root).resolve()), str(dest))),
                       (dest, ("checkout", "--quiet", "--detach", commit))):
        proc = git(root, *args, timeout=None)
        if proc.returncode != 0:
            raise ChexopsError(f"git {args[0]} failed for the workspace ({proc.stderr.strip()[:200]}); "
                               f"check that {main_root} is a healthy git repository")


def share_dvc_config(main_root: Path, ws: Path) -> Path:
    """The workspace uses the main cache, the main local config (credentials) and the main
    repo's remotes: relative local remote paths are pinned to what they mean there (DVC
    resolves them against the config file's folder). Returns the cache."""
    local = main_root / ".dvc" / "config.local"
    if local.is_file():
        shutil.copyfile(local, ws / ".dvc" / "config.local")
    cache = remote.cache_dir(main_root)
    proc = remote.run_dvc(ws, "config", "--local", "cache.dir", str(cache))
    if proc.returncode != 0:
        raise ChexopsError(f"cannot point the workspace at the DVC cache {cache} "
                           f"({redact_text(proc.stderr.strip())[:200]}); check `dvc cache dir`")
    remote.pin_remote_paths(main_root, ws)
    return cache


# ---------------------------------------------------------------- running the pipeline there

def pipeline_env(store_uri: str, main_root: Path) -> dict[str, str]:
    """The user's environment for stage commands, pointed at the trial's store, with no DVC
    experiment context leaking in, this venv's chexops/dvc first on PATH, and relative paths
    meaning what they mean in the user's repo `main_root` (paths.main_repo_root)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MLFLOW_TRACKING_URI=store_uri, DVC_NO_ANALYTICS="1",
               CHEXOPS_MAIN_ROOT=str(paths.main_repo_root(main_root)))
    return env


def repro(ws: Path, env: dict[str, str], args: list[str], what: str) -> None:
    """dvc repro in the workspace, its output streamed to stderr."""
    proc = subprocess.run([remote.dvc_executable(), "repro", *args], cwd=ws, env=env,
                          stdout=sys.stderr, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ChexopsError(f"re-running {what} failed in the workspace {ws} (kept; output above); "
                           f"fix the cause, or reproduce with the code of a later commit")


def rerun(ws: Path, env: dict[str, str]) -> None:
    """Every stage downstream of the source data, forced (no DVC run-cache shortcuts)."""
    sources = dvcfiles.source_stages(ws)
    outs = [o for v in sources.values() for o in v]
    starts = [name for name, entry in dvcfiles.stages(ws).items() if name not in sources
              and any(dvcfiles.within(d, o) for d in dvcfiles.paths_of(entry, "deps") for o in outs)]
    repro(ws, env, ["--force", "--downstream", *starts], "the pipeline")
