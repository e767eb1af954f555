"""`chexops reproduce RUN`: re-run a recorded trial from its code revision, params, seed and data
hashes in a temporary workspace, then print old and new results side by side with a verdict.

Steps: find the trial run (an MLflow run id, or a DVC experiment name via the `dvc.exp_name`
tag); clone the repository at the trial's git commit -- its DVC experiment's own commit
(refs/exps/...) when it has one -- into a temporary folder; write back the params the trial ran
with (its evaluate run's `config/params.json`); put the trial's source data in place by md5 (DVC
cache, else the DVC remote, else re-derive it with the source stage and require the same md5 --
refusing, naming the input, when none works, and when the remote rejects the credentials or is
unreachable unless --rederive); re-run every other stage with `dvc repro --force`; compare
metrics, weights and derived-data hashes. Any other failure is one line naming the step.

Nothing in the user's workspace is touched: the re-run writes only the temporary clone, new
objects in the shared DVC cache and a new trial run (tagged `chexops.reproduces`) in the store.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from chexops.config import Params
from chexops.errors import ChexopsError
from chexops.redact import redact_text
from chexops.tracking import remote
from chexops.tracking.provenance import CODE_PREFIXES  # deps under these are code, not data

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

DEFAULT_TOLERANCE = 0.01       # |new - old| <= tol * max(1, |old|) on every metric
RESTORED_BY_PARAMS = ("params.yaml",)  # changed files that the restored params make whole again
WEIGHTS_ARTIFACT = "model/best.safetensors"
EXPS_NAMESPACE = "refs/exps"  # DVC experiment refs: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>
# remote failures that say the remote is misconfigured rather than missing the data: re-deriving
# would hide them, so reproduce refuses unless --rederive
REFUSE_REMOTE_KINDS = ("credentials", "unreachable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_ref", metavar="RUN",
                        help="the trial's MLflow run id, or a DVC experiment name")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="allowed metric difference, relative to max(1, |old|) "
                             f"(default {DEFAULT_TOLERANCE}; GPU kernels are not bit-exact)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    parser.add_argument("--workdir", default=None,
                        help="folder to create the temporary workspace in (default: system temp)")
    parser.add_argument("--rederive", action="store_true",
                        help="when the DVC remote rejects the credentials or is unreachable, "
                             "re-derive the source data from data.source instead of refusing "
                             "(its md5 is still checked)")


# ---------------------------------------------------------------- the recorded trial

@dataclass
class Trial:
    run_id: str
    name: str
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage -> run id

    @property
    def data_md5s(self) -> dict[str, str]:
        return {k[len("data.md5."):]: v for k, v in self.tags.items() if k.startswith("data.md5.")}


def _is_trial(run: "Run") -> bool:
    return run.data.tags.get("chexops.trial") == "true"


def _run_by_id(client: "MlflowClient", ref: str) -> "Run | None":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        return None


def _trials_named(client: "MlflowClient", name: str) -> list["Run"]:
    """Trial runs whose DVC experiment name is `name`, newest first, across experiments."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    safe = name.replace("'", "")
    return client.search_runs(exp_ids, f"tags.`dvc.exp_name` = '{safe}' and "
                                       f"tags.`chexops.trial` = 'true'",
                              order_by=["attributes.start_time DESC"], max_results=50)


def find_trial_run(client: "MlflowClient", ref: str, store: str) -> "Run":
    """The trial run for a run id (a stage run maps to its trial) or a DVC experiment name."""
    run = _run_by_id(client, ref)
    if run is not None and not _is_trial(run):
        parent = run.data.tags.get("mlflow.parentRunId")
        run = _run_by_id(client, parent) if parent else None
        if run is None or not _is_trial(run):
            raise ChexopsError(f"run {ref} is not a chexops trial run (no chexops.trial tag); "
                               f"pass the trial's run id or its DVC experiment name")
    if run is None:
        named = _trials_named(client, ref)
        if not named:
            raise ChexopsError(f"no trial run or DVC experiment named {ref!r} in the tracking "
                               f"store {store}; find the id in the MLflow UI or `dvc exp show`")
        if len(named) > 1:
            print(f"reproduce: {len(named)} trials are named {ref!r}; using the newest, "
                  f"{named[0].info.run_id}", file=sys.stderr)
        run = named[0]
    return run


def stage_runs_of(client: "MlflowClient", trial: "Run") -> dict[str, str]:
    """stage -> run id: the trial's children plus the cached stages it links by tag."""
    links = {k[len("stage."):-len(".run_id")]: v for k, v in trial.data.tags.items()
             if k.startswith("stage.") and k.endswith(".run_id")}
    kids = client.search_runs([trial.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'",
                              max_results=1000)
    links.update({r.data.tags["chexops.stage"]: r.info.run_id for r in kids
                  if "chexops.stage" in r.data.tags})
    return links


def load_trial(client: "MlflowClient", ref: str, store: str) -> Trial:
    run = find_trial_run(client, ref, store)
    return Trial(run.info.run_id, run.info.run_name or run.info.run_id, dict(run.data.tags),
                 dict(run.data.metrics), dict(run.data.params), stage_runs_of(client, run))


# ---------------------------------------------------------------- code and params

def code_warning(trial: Trial, experiment: str | None = None) -> str | None:
    """A trial made from a dirty tree cannot be restored exactly: say which files are missing.
    None when the code comes from the trial's DVC experiment commit (`experiment`), which holds
    its uncommitted changes to tracked files."""
    if trial.tags.get("git.dirty") != "True" or experiment:
        return None
    changed = [p.strip() for p in trial.tags.get("git.changed", "").split(",") if p.strip()]
    missing = [p for p in changed if p not in RESTORED_BY_PARAMS]
    if changed and not missing:
        return None  # only params.yaml differed (dvc exp run -S): restored from the run
    what = ", ".join(missing) if missing else "unknown files (the trial recorded no list)"
    return (f"warning: trial {trial.run_id} was made from a dirty git tree; its uncommitted "
            f"changes to {what} were never recorded, so the code is restored only as of commit "
            f"{trial.tags.get('git.commit', '?')[:12]} and the result may differ")


def restored_params(client: "MlflowClient", trial: Trial) -> dict[str, Any]:
    """The params the trial ran with: its verbatim params.yaml artifact when logged, else the
    resolved config its evaluate run logged (config/params.json)."""
    candidates = [(trial.run_id, "config/params.yaml")]
    evaluate_id = trial.tags.get("chexops.evaluate_run_id") or trial.stage_runs.get("evaluate")
    if evaluate_id:
        candidates.append((evaluate_id, "config/params.json"))
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, artifact in candidates:
            try:
                local = client.download_artifacts(run_id, artifact, tmp)
            except Exception:  # not logged (older trial) or missing: try the next source
                continue
            text = Path(local).read_text()
            return yaml.safe_load(text) if artifact.endswith(".yaml") else json.loads(text)
    raise ChexopsError(f"trial {trial.run_id} has no logged params (config/params.json on its "
                       f"evaluate run); it cannot be reproduced, re-run it with this version")


def params_mismatch(raw: dict[str, Any], trial: Trial) -> list[str]:
    """Keys whose restored value differs from the trial's logged (flattened) params."""
    from chexops.config import flatten

    flat = {k: str(v) for k, v in flatten(raw).items()}
    return sorted(k for k, v in trial.params.items() if k in flat and flat[k] != v)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


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
    proc = _git(main_root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if proc.returncode != 0 or not proc.stdout.strip():
        return baseline, None, (f"DVC experiment {name!r} is not in this repository (no {ref}; "
                                f"`dvc exp pull REMOTE {name}` brings it); restoring the baseline "
                                f"commit {baseline[:12]} with the trial's logged params")
    commit = proc.stdout.strip()
    shown = _git(main_root, "show", f"{commit}:params.yaml")
    try:
        exp_params = yaml.safe_load(shown.stdout) if shown.returncode == 0 else None
    except yaml.YAMLError:
        exp_params = None
    diff = params_mismatch(_normalised_params(exp_params), trial) if isinstance(
        exp_params, dict) else ["params.yaml"]
    if diff:
        return baseline, None, (f"DVC experiment {name!r} ({commit[:12]}) has other params than "
                                f"the trial ({', '.join(diff[:5])}; re-run since?); restoring "
                                f"the baseline commit {baseline[:12]} with the trial's logged "
                                f"params")
    return commit, name, None


def make_workspace(main_root: Path, commit: str, dest: Path) -> None:
    """A clone of the repository at `commit` sharing its git objects (nothing in main changes)."""
    if _git(main_root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise ChexopsError(f"commit {commit[:12]} of the trial is not in {main_root}; "
                           f"`git fetch` the branch it was made on, then try again")
    for args in (("clone", "--quiet", "--shared", "--no-checkout", str(main_root), str(dest)),
                 ("-C", str(dest), "checkout", "--quiet", "--detach", commit)):
        proc = subprocess.run(["git", *args], capture_output=True, text=True)
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


# ---------------------------------------------------------------- data

def _stages(ws: Path) -> dict[str, dict]:
    return (yaml.safe_load((ws / "dvc.yaml").read_text()) or {}).get("stages", {})


def _entries(items: list | None) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in items or []]


def source_stages(ws: Path) -> dict[str, list[str]]:
    """Stages that read no data (only code), with their outs: they bring the data in."""
    return {name: _entries(s.get("outs")) for name, s in _stages(ws).items()
            if all(d.startswith(CODE_PREFIXES) for d in _entries(s.get("deps")))}


def lock_md5s(ws: Path) -> dict[str, str]:
    lock = yaml.safe_load((ws / "dvc.lock").read_text()) if (ws / "dvc.lock").is_file() else {}
    return {o["path"]: o["md5"] for s in (lock or {}).get("stages", {}).values()
            for o in s.get("outs", []) or [] if "md5" in o}


def _mismatch(out: str, old: str, new: str | None, source: str, cache: Path,
              remote_note: str) -> ChexopsError:
    files = remote.dir_differences(cache, old, new) if new else []
    which = f" ({', '.join(files[:5])} differ)" if files else ""
    return ChexopsError(f"{out}: the data differs from the trial's{which}: recorded md5 {old}, "
                        f"data.source {source!r} now gives {new or 'nothing'}; {remote_note}; "
                        f"restore the original data or `dvc push` it from where the trial ran")


def restore_source(ws: Path, stage: str, out: str, md5: str, cache: Path, env: dict[str, str],
                   source: str, rederive: bool = False) -> str:
    """Put `out` at md5 in the workspace: DVC cache, else remote, else re-derive; say how.
    A remote that rejects the credentials or is unreachable is refused unless `rederive`."""
    if remote.in_cache(cache, md5):
        remote.copy_from_cache(cache, md5, ws / out)
        return "DVC cache"
    name = remote.default_remote(ws)
    cause = "no DVC remote is configured"
    note = f"it is not in the DVC cache and {cause}"
    if name:
        try:
            remote.fetch_object(ws, cache, Path(out).name, md5)
            remote.copy_from_cache(cache, md5, ws / out)
            return f"DVC remote {name}"
        except remote.RemoteError as exc:
            cause = redact_text(str(exc))
            note = redact_text(f"it is not in the DVC cache and {exc.problem} ({exc.fix})")
            if exc.kind in REFUSE_REMOTE_KINDS and not rederive:
                raise ChexopsError(f"{out}: {note}; or pass --rederive to re-derive it with "
                                   f"stage {stage} from data.source {source!r} (its md5 is "
                                   f"still checked)") from None
    print(f"reproduce: {out} is not in the DVC cache and not had from the DVC remote "
          f"({cause}); re-deriving it with stage {stage}", file=sys.stderr)
    _repro(ws, env, ["--force", "--single-item", stage], f"stage {stage}")
    new = lock_md5s(ws).get(out)
    if new != md5:
        raise _mismatch(out, md5, new, source, cache, note)
    return f"re-derived by {stage}, same md5"


def restore_data(ws: Path, trial: Trial, cache: Path, env: dict[str, str],
                 source: str, rederive: bool = False) -> dict[str, str]:
    """Every source output the trial recorded, at its recorded md5; {out: how}."""
    recorded = trial.data_md5s
    how: dict[str, str] = {}
    for stage, outs in source_stages(ws).items():
        for out in outs:
            if out in recorded:
                how[out] = restore_source(ws, stage, out, recorded[out], cache, env, source,
                                          rederive)
    if not how:
        raise ChexopsError(f"trial {trial.run_id} recorded no md5 for the pipeline's source data "
                           f"({', '.join(o for v in source_stages(ws).values() for o in v)}); "
                           f"it cannot be checked, so it is not reproduced")
    return how


# ---------------------------------------------------------------- re-running

def pipeline_env(store_uri: str) -> dict[str, str]:
    """The user's environment for stage commands, pointed at the trial's store, with no DVC
    experiment context leaking in, and this venv's chexops/dvc first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MLFLOW_TRACKING_URI=store_uri, DVC_NO_ANALYTICS="1")
    return env


def _repro(ws: Path, env: dict[str, str], args: list[str], what: str) -> None:
    """dvc repro in the workspace, its output streamed to stderr."""
    proc = subprocess.run([remote.dvc_executable(), "repro", *args], cwd=ws, env=env,
                          stdout=sys.stderr, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ChexopsError(f"re-running {what} failed in the workspace {ws} (kept; output above); "
                           f"fix the cause, or reproduce with the code of a later commit")


def rerun(ws: Path, env: dict[str, str]) -> None:
    """Every stage downstream of the source data, forced (no DVC run-cache shortcuts)."""
    sources = source_stages(ws)
    outs = [o for v in sources.values() for o in v]
    starts = [name for name, s in _stages(ws).items() if name not in sources
              and any(d == o or d.startswith(o.rstrip("/") + "/")
                      for d in _entries(s.get("deps")) for o in outs)]
    _repro(ws, env, ["--force", "--downstream", *starts], "the pipeline")


# ---------------------------------------------------------------- comparing

def tensor_hash(path: Path) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes (file metadata is left out)."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as fh:
        for name in sorted(fh.keys()):
            t = fh.get_tensor(name).contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def old_weights_hashes(client: "MlflowClient", trial: Trial) -> dict[str, str | None]:
    """Weights hash of each round's best weights, from the round runs' artifacts."""
    out: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in sorted(s for s in trial.stage_runs if s.startswith("train-round-")):
            try:
                local = client.download_artifacts(trial.stage_runs[stage], WEIGHTS_ARTIFACT,
                                                   f"{tmp}/{stage}")
                out[stage] = tensor_hash(Path(local))
            except Exception:  # artifact missing (deleted, other store): shown as n/a
                out[stage] = None
    return out


def new_weights_hashes(ws: Path, stages: list[str]) -> dict[str, str | None]:
    out = {}
    for stage in stages:
        path = ws / "models" / stage.replace("train-", "") / "best.safetensors"
        out[stage] = tensor_hash(path) if path.is_file() else None
    return out


def new_trial(client: "MlflowClient", ws: Path) -> "Run":
    """The trial run the re-run created (found through the evaluate run it names)."""
    record = ws / "runs" / "evaluate.json"
    if not record.is_file():
        raise ChexopsError(f"the re-run wrote no runs/evaluate.json in {ws}; "
                           f"the pipeline at this commit does not record its trial")
    evaluate_id = json.loads(record.read_text())["run_id"]
    exp_id = client.get_run(evaluate_id).info.experiment_id
    found = client.search_runs([exp_id], f"tags.`chexops.evaluate_run_id` = '{evaluate_id}'")
    if not found:
        raise ChexopsError(f"the re-run's trial run (evaluate run {evaluate_id}) is not in the store; "
                           f"check the evaluate stage's output above")
    return found[0]


def metrics_close(old: float, new: float, tolerance: float) -> bool:
    return math.isclose(old, new, rel_tol=0.0, abs_tol=tolerance * max(1.0, abs(old)))


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def metrics_same(old: float | None, new: float | None) -> bool:
    """Bit-identical, where two NaNs (an undefined metric, e.g. AUROC of one class) are the same."""
    return old == new or (_nan(old) and _nan(new))


@dataclass
class Comparison:
    rows: list[tuple[str, str, str, str]]  # (what, old, new, status)
    verdict: str                           # identical | within tolerance | different


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def compare(old_m: dict[str, float], new_m: dict[str, float], old_w: dict[str, str | None],
            new_w: dict[str, str | None], old_d: dict[str, str], new_d: dict[str, str],
            tolerance: float) -> Comparison:
    """Rows for every metric, weights hash and data md5, and the overall verdict."""
    rows, exact, close = [], True, True
    for key in sorted(old_m.keys() | new_m.keys()):
        a, b = old_m.get(key), new_m.get(key)
        same = metrics_same(a, b)
        near = a is not None and b is not None and metrics_close(a, b, tolerance)
        exact, close = exact and same, close and (same or near)
        rows.append((key, _fmt(a), _fmt(b), "same" if same else "close" if near else "DIFFERS"))
    for label, old, new, must_match in (("weights", old_w, new_w, False), ("data", old_d, new_d, True)):
        for key in sorted(old.keys() | new.keys()):
            a, b = old.get(key), new.get(key)
            if a is None:  # not recorded for the trial: shown, not judged
                rows.append((f"{label} {key}", "n/a", _fmt(b), "not recorded"))
                continue
            same = a == b
            exact, close = exact and same, close and (same or not must_match)
            rows.append((f"{label} {key}", a, _fmt(b), "same" if same else "DIFFERS"))
    verdict = "identical" if exact else "within tolerance" if close else "different"
    return Comparison(rows, verdict)


def format_comparison(c: Comparison, old_id: str, new_id: str, tolerance: float) -> str:
    header = ("", f"trial {old_id[:12]}", f"reproduction {new_id[:12]}", "")
    widths = [max(len(r[i]) for r in [header, *c.rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in [header, *c.rows]]
    note = {"identical": "every metric, weights hash and data md5 is bit-identical",
            "within tolerance": f"every metric within {tolerance:g} x max(1, |old|) and the data "
                                f"identical; weights are not bit-exact (GPU kernels or a "
                                f"non-deterministic run)",
            "different": f"at least one metric differs by more than {tolerance:g} x max(1, |old|), "
                         f"or the derived data differs"}[c.verdict]
    return "\n".join(lines + ["", f"verdict: {c.verdict.upper()} ({note})"])


# ---------------------------------------------------------------- the command

def open_client(params: Params, root: Path) -> tuple["MlflowClient", str]:
    from mlflow.tracking import MlflowClient

    from chexops.tracking.runs import check_reachable, tracking_uri

    uri = tracking_uri(params, root)
    check_reachable(uri)
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():
        raise ChexopsError(f"no MLflow store at {db}; run the pipeline first, or set "
                           f"MLFLOW_TRACKING_URI to the store that holds the trial")
    return MlflowClient(tracking_uri=uri), uri


@contextmanager
def step(what: str) -> Iterator[None]:
    """Turn an unexpected failure (MlflowException, OSError, ...) of one step into a one-line
    ChexopsError naming the step, with credentials redacted."""
    try:
        yield
    except (ChexopsError, KeyboardInterrupt):
        raise
    except Exception as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "no message")
        raise ChexopsError(f"{what} failed: {type(exc).__name__}: "
                           f"{redact_text(detail)[:300]}; nothing in your workspace was changed "
                           f"(reproduce with --keep to inspect the temporary one)") from exc


def reproduce(ref: str, params: Params, root: Path, ws: Path, tolerance: float,
              rederive: bool = False) -> Comparison:
    """Restore, check, re-run and compare; raises ChexopsError on refusal or failure."""
    from chexops.paths import main_repo_root
    from chexops.redact import redact_url

    main_root = main_repo_root(root)
    with step("opening the tracking store"):
        client, uri = open_client(params, root)
    with step("finding the trial"):
        trial = load_trial(client, ref, redact_url(uri))
    commit = trial.tags.get("git.commit")
    if not commit or commit == "None":
        raise ChexopsError(f"trial {trial.run_id} recorded no git commit (made outside a git "
                           f"repository); its code cannot be restored")
    with step("restoring the code"):
        code, experiment, note = code_commit(main_root, trial)
    source_of = f"DVC experiment {experiment!r}, commit {code[:12]}" if experiment \
        else f"commit {commit[:12]}"
    print(f"reproduce: trial {trial.run_id} ({trial.name}), {source_of}", file=sys.stderr)
    if note:
        print(f"reproduce: warning: {note}", file=sys.stderr)
    if (warning := code_warning(trial, experiment)):
        print(warning, file=sys.stderr)
    with step("restoring the params"):
        raw = restored_params(client, trial)
    if (diff := params_mismatch(raw, trial)):
        print(f"reproduce: warning: restored params differ from the trial's logged params at "
              f"{', '.join(diff[:5])}", file=sys.stderr)
    with step("restoring the code"):
        make_workspace(main_root, code, ws)
        (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with step("restoring the data"):
        cache = share_dvc_config(main_root, ws)
        env = pipeline_env(uri)
        source = str((raw.get("data") or {}).get("source", "?"))
        restored = restore_data(ws, trial, cache, env, source, rederive)
    for out, how in restored.items():
        print(f"reproduce: {out} at the recorded md5 ({how})", file=sys.stderr)
    with step("re-running the pipeline"):
        rerun(ws, env)
    with step("comparing the reproduction with the trial"):
        new = new_trial(client, ws)
        client.set_tag(new.info.run_id, "chexops.reproduces", trial.run_id)
        rounds = sorted(s for s in _stages(ws) if s.startswith("train-round-"))
        # source data was checked on the way in; the rest is what the re-run derived
        derived = {k: v for k, v in lock_md5s(ws).items()
                   if k in trial.data_md5s and k not in restored}
        derived.update({out: trial.data_md5s[out] for out in restored})
        comparison = compare(trial.metrics, dict(new.data.metrics),
                             old_weights_hashes(client, trial), new_weights_hashes(ws, rounds),
                             trial.data_md5s, derived, tolerance)
    print(format_comparison(comparison, trial.run_id, new.info.run_id, tolerance))
    return comparison


def run(args: argparse.Namespace, params: Params, root: Path) -> None:
    if args.tolerance < 0:
        raise ChexopsError(f"--tolerance {args.tolerance} must be >= 0")
    ws = Path(tempfile.mkdtemp(prefix="chexops-reproduce-", dir=args.workdir)) / "repo"
    keep = args.keep
    try:
        with step("reproduce"):  # a safety net: every step above names itself
            comparison = reproduce(args.run_ref, params, root, ws, args.tolerance,
                                   getattr(args, "rederive", False))
    except ChexopsError as exc:
        keep = keep or "(kept;" in str(exc)  # a failed re-run is kept for inspection
        raise
    finally:
        if keep:
            print(f"reproduce: workspace kept at {ws}", file=sys.stderr)
        else:
            shutil.rmtree(ws.parent, ignore_errors=True)
    if comparison.verdict == "different":
        raise SystemExit(1)
