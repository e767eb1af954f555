"""`chexops compare A B`: is trial B really better than trial A?

A and B are MLflow run ids (a trial run or its evaluate run), DVC experiment names (the trial
run tagged dvc.exp_name), or `workspace` (the current reports/evaluate/predictions.parquet).
Both trials' metrics get bootstrap intervals, and the paired DeLong test on the same validation
images gives the AUROC difference, its interval, a p-value and a plain sentence; `--split test`
compares them on the held-out test cohort instead (validation chose both trials' epochs, so
the test cohort is the unbiased judge). Two trials evaluated on different data (different data
md5s, or different images or labels) are refused: a paired test between them would be
meaningless.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chexops.errors import ChexopsError
from chexops.evaluation import stats
from chexops.tracking.provenance import dvc_input_md5s
from chexops.tracking.store import open_store

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from chexops.config import Params

PREDICTIONS = Path("reports/evaluate/predictions.parquet")   # written by the evaluate stage
PREDICTIONS_ARTIFACT = "report/predictions.parquet"          # reports/evaluate logged as report/
# per split: the predictions file in the workspace, its artifact and its name in messages
SPLITS = {"valid": (PREDICTIONS, PREDICTIONS_ARTIFACT, "validation"),
          "test": (Path("reports/evaluate/test_predictions.parquet"),
                   "report/test_predictions.parquet", "held-out test")}
WORKSPACE = "workspace"
DATA_PREFIX = "data/"                                          # data inputs, not model weights
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
METRICS = ("auroc", "precision", "recall", "specificity")


# ---------------------------------------------------------------- the predictions file

def predictions_frame(valid: "pd.DataFrame", probs: np.ndarray,
                      targets: tuple[str, ...]) -> "pd.DataFrame":
    """Path, then `label:<target>` (0/1, -1 where not 0/1) and `prob:<target>` per target,
    plus the subgroup columns when present: what compare and the report need."""
    import pandas as pd

    probs = np.asarray(probs, dtype=float).reshape(len(valid), len(targets))
    out = pd.DataFrame({"Path": valid["Path"].astype(str).to_numpy()})
    for col in ("Sex", "Age", "Frontal/Lateral", "AP/PA"):
        if col in valid:
            out[col] = valid[col].to_numpy()
    for j, t in enumerate(targets):
        labels = pd.to_numeric(valid[t], errors="coerce").to_numpy()
        out[f"label:{t}"] = np.where(np.isin(labels, (0, 1)), labels, -1).astype("int8")
        out[f"prob:{t}"] = probs[:, j]
    return out


def targets_of(frame: "pd.DataFrame") -> list[str]:
    return [c.split(":", 1)[1] for c in frame.columns if c.startswith("prob:")]


def labels_digest(frame: "pd.DataFrame") -> str:
    """sha256 over the sorted (Path, labels) rows: same images and labels <=> same digest."""
    cols = ["Path"] + sorted(c for c in frame.columns if c.startswith("label:"))
    rows = frame[cols].sort_values("Path").astype(str).to_numpy()
    return hashlib.sha256("\n".join("\t".join(r) for r in rows).encode()).hexdigest()


# ---------------------------------------------------------------- finding a trial

@dataclass
class Trial:
    spec: str
    predictions: "pd.DataFrame"
    md5s: dict[str, str] = field(default_factory=dict)   # data inputs of its evaluate stage
    run_id: str | None = None


def workspace_trial(root: Path, split: str = "valid") -> Trial:
    import pandas as pd

    relative = SPLITS[split][0]
    if not (root / relative).is_file():
        fix = ("the data has no test.csv, or run `dvc repro evaluate`" if split == "test"
               else "run `dvc repro evaluate` first")
        raise ChexopsError(f"{relative} not found in the workspace; {fix}")
    return Trial(WORKSPACE, pd.read_parquet(root / relative), dvc_input_md5s(root, "evaluate"))


def _find_run(client: Any, exp_id: str, spec: str) -> Any:
    """An MLflow run by id, else the newest trial run of DVC experiment `spec`."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.match(spec):
        try:
            return client.get_run(spec)
        except MlflowException:
            pass
    if re.fullmatch(r"[\w.+-]+", spec):
        runs = client.search_runs([exp_id], order_by=["attributes.start_time DESC"], max_results=1,
                                  filter_string=f"tags.`dvc.exp_name` = '{spec}' and "
                                                f"tags.`chexops.trial` = 'true'")
        if runs:
            return runs[0]
    raise ChexopsError(f"unknown trial {spec!r}: neither an MLflow run id nor a DVC experiment "
                       f"name with a trial run; list them with `dvc exp show` or `chexops ui`, "
                       f"or use `workspace`")


def _evaluate_run_id(run: Any) -> str:
    tags = run.data.tags
    if tags.get("chexops.trial") == "true" and tags.get("chexops.evaluate_run_id"):
        return tags["chexops.evaluate_run_id"]
    if tags.get("chexops.stage") == "evaluate":
        return run.info.run_id
    raise ChexopsError(f"run {run.info.run_id} is neither a trial run nor an evaluate run; "
                       f"give a trial's run id or its DVC experiment name")


def mlflow_trial(params: "Params", root: Path, spec: str, split: str = "valid") -> Trial:
    import mlflow.artifacts
    import pandas as pd
    from mlflow.exceptions import MlflowException


    client, exp_id = open_store(params, root)
    eval_id = _evaluate_run_id(_find_run(client, exp_id, spec))
    tags = client.get_run(eval_id).data.tags
    md5s = {k[len("data.md5."):]: v for k, v in tags.items() if k.startswith("data.md5.")}
    artifact = SPLITS[split][1]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=eval_id, dst_path=tmp,
                                                        artifact_path=artifact,
                                                        tracking_uri=client.tracking_uri)
        except (MlflowException, OSError):
            raise ChexopsError(f"trial {spec!r} (evaluate run {eval_id}) has no per-image "
                               f"predictions artifact {artifact}; re-run its evaluate stage "
                               f"with this chexops version (and, for --split test, data with "
                               f"a test.csv)") from None
        frame = pd.read_parquet(local)
    return Trial(spec, frame, md5s, eval_id)


def resolve(spec: str, params: "Params", root: Path, split: str = "valid") -> Trial:
    if spec == WORKSPACE:
        return workspace_trial(root, split)
    return mlflow_trial(params, root, spec, split)


# ---------------------------------------------------------------- comparing

def check_same_data(a: Trial, b: Trial, split: str = "valid") -> None:
    """Refuse when the data inputs' md5s or the split's images/labels differ."""
    name = SPLITS[split][2]
    for dep in sorted(set(a.md5s) & set(b.md5s)):
        if dep.startswith(DATA_PREFIX) and a.md5s[dep] != b.md5s[dep]:
            raise ChexopsError(f"A and B were evaluated on different {name} data ({dep}: md5 "
                               f"{a.md5s[dep][:12]} vs {b.md5s[dep][:12]}); a paired comparison "
                               f"needs the same data: compare trials made from the same data")
    if targets_of(a.predictions) != targets_of(b.predictions):
        raise ChexopsError(f"A predicts {targets_of(a.predictions)}, B {targets_of(b.predictions)}; "
                           f"compare trials trained for the same targets")
    if labels_digest(a.predictions) != labels_digest(b.predictions):
        raise ChexopsError(f"A and B were evaluated on different {name} images or labels; "
                           f"a paired comparison needs the same images: compare trials made "
                           f"from the same data")


def _aligned(trial: Trial, target: str, order: "pd.Series", per_study: bool
             ) -> tuple[np.ndarray, np.ndarray]:

    frame = trial.predictions.set_index("Path").loc[order]
    y, p = frame[f"label:{target}"].to_numpy(), frame[f"prob:{target}"].to_numpy(dtype=float)
    keep = np.isin(y, (0, 1))
    if per_study:
        studies = stats.aggregate_studies(order.to_numpy()[keep], y[keep], p[keep])
        return studies["label"].to_numpy(), studies["prob"].to_numpy()
    return y[keep].astype(int), p[keep]


def compare_target(a: Trial, b: Trial, target: str, threshold: float = 0.5, n_boot: int = 1000,
                   seed: int = 0, alpha: float = 0.05, per_study: bool = False,
                   split: str = "valid") -> dict[str, Any]:
    """Both trials' metrics with bootstrap CIs, and the paired DeLong test of B - A."""
    order = a.predictions["Path"].sort_values()
    y, pa = _aligned(a, target, order, per_study)
    _, pb = _aligned(b, target, order, per_study)
    if len(np.unique(y)) < 2:
        raise ChexopsError(f"{target}: the {SPLITS[split][2]} labels hold one class only; AUROC "
                           f"and the DeLong test are undefined")
    test = stats.paired_delong(y, pa, pb, alpha)
    return {"target": target, "split": split, "n": int(len(y)), "n_pos": int(y.sum()),
            "unit": "study" if per_study else "image",
            "A": stats.bootstrap_ci(y, pa, threshold, n_boot, seed, alpha),
            "B": stats.bootstrap_ci(y, pb, threshold, n_boot, seed, alpha),
            "delong": test, "verdict": stats.verdict(test)}


def _cell(m: dict[str, Any]) -> str:
    if m["value"] is None:
        return "n/a"
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def format_result(result: dict[str, Any], a: str, b: str, alpha: float) -> str:
    level = f"{(1 - alpha) * 100:g} %"
    width = max(26, len(a) + 4, len(b) + 4)
    units = "studies" if result["unit"] == "study" else "images"
    lines = [f"{result['target']}: {result['n']} {SPLITS[result['split']][2]} {units}, "
             f"{result['n_pos']} positive (metrics with {level} bootstrap intervals)",
             f"{'metric':<12}{'A: ' + a:<{width}}{'B: ' + b:<{width}}"]
    for name in METRICS:
        lines.append(f"{name:<12}{_cell(result['A'][name]):<{width}}{_cell(result['B'][name]):<{width}}")
    d = result["delong"]
    lines += [f"paired DeLong: AUROC B - A = {d['diff']:+.3f} ({level} CI {d['lo']:+.3f} to "
              f"{d['hi']:+.3f}), z = {d['z']:.2f}, p = {d['p_value']:.4f}",
              f"=> {result['verdict']}"]
    return "\n".join(lines)


def run(args: argparse.Namespace, params: "Params", root: Path) -> None:
    if not 0 < args.alpha < 1:
        raise ChexopsError(f"--alpha {args.alpha} must be within (0, 1), e.g. 0.05")
    split = args.split
    a, b = resolve(args.a, params, root, split), resolve(args.b, params, root, split)
    check_same_data(a, b, split)
    n_boot = params.evaluate.bootstrap
    results = [compare_target(a, b, t, params.evaluate.threshold, n_boot, params.seed,
                              args.alpha, args.per_study, split)
               for t in targets_of(a.predictions)]
    if args.json:
        sys.stdout.write(json.dumps({"A": args.a, "B": args.b, "split": split, "targets": results},
                                    indent=2) + "\n")
        return
    print("\n\n".join(format_result(r, args.a, args.b, args.alpha) for r in results))
