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

This module strings the steps together and prints; each step lives in chexops.tracking: `trials`
(the recorded trial), `workspace` (the clone and `dvc repro` in it), `sourcedata` (the source
data by md5) and `verdict` (old against new).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from chexops.config import Params
from chexops.errors import ChexopsError
from chexops.paths import main_repo_root
from chexops.redact import redact_text, redact_url
from chexops.tracking import sourcedata, trials, verdict, workspace
from chexops.tracking.trials import Trial
from chexops.tracking.verdict import Comparison

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient


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


def _say(message: str) -> None:
    print(f"reproduce: {message}", file=sys.stderr)


def _restore_code(client: "MlflowClient", trial: Trial, main_root: Path, ws: Path) -> dict[str, Any]:
    """The workspace at the trial's code with its params.yaml; returns those params."""
    commit = trial.tags.get("git.commit")
    if not commit or commit == "None":
        raise ChexopsError(f"trial {trial.run_id} recorded no git commit (made outside a git "
                           f"repository); its code cannot be restored")
    with step("restoring the code"):
        code, experiment, note = workspace.code_commit(main_root, trial)
    source_of = f"DVC experiment {experiment!r}, commit {code[:12]}" if experiment \
        else f"commit {commit[:12]}"
    _say(f"trial {trial.run_id} ({trial.name}), {source_of}")
    if note:
        _say(f"warning: {note}")
    if (warning := trials.code_warning(trial, experiment)):
        print(warning, file=sys.stderr)
    with step("restoring the params"):
        raw = trials.restored_params(client, trial)
    if (diff := trials.params_mismatch(raw, trial)):
        _say(f"warning: restored params differ from the trial's logged params at "
             f"{', '.join(diff[:5])}")
    with step("restoring the code"):
        workspace.make_workspace(main_root, code, ws)
        (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def reproduce(ref: str, params: Params, root: Path, ws: Path, tolerance: float,
              rederive: bool = False) -> Comparison:
    """Restore, check, re-run and compare; raises ChexopsError on refusal or failure."""
    main_root = main_repo_root(root)
    with step("opening the tracking store"):
        client, uri = trials.open_client(params, root)
    with step("finding the trial"):
        trial = trials.load_trial(client, ref, redact_url(uri))
    raw = _restore_code(client, trial, main_root, ws)
    with step("restoring the data"):
        cache = workspace.share_dvc_config(main_root, ws)
        env = workspace.pipeline_env(uri, main_root)
        source = str((raw.get("data") or {}).get("source", "?"))
        restored = sourcedata.restore_data(ws, trial, cache, env, source, rederive)
    for out, how in restored.items():
        _say(f"{out} at the recorded md5 ({how})")
    with step("re-running the pipeline"):
        workspace.rerun(ws, env)
    with step("comparing the reproduction with the trial"):
        new = trials.new_trial(client, ws)
        client.set_tag(new.info.run_id, "chexops.reproduces", trial.run_id)
        comparison = verdict.judge(client, trial, dict(new.data.metrics), ws, restored, tolerance)
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
