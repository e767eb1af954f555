"""BCE vs LibAUC's AUC-margin loss (Yuan et al., ICCV 2021) for round 2, judged on the held-out
test cohort with the paired DeLong test, over several training seeds.
Writes benchmarks/results/auc_compare.json.

    python benchmarks/auc_compare.py --seeds 42 7 11

Per seed, in one fresh copy of the repo (params.yaml with that `seed`): `dvc repro
train-round-2` with BCE rounds (round 1 is BCE in both arms, the LibAUC recipe), then round 2
again with `rounds.r2.loss: auc_margin` (DVC re-runs round 2 only: round 1 is unchanged). Both
arms' round-2 weights are scored on the same test images, so DeLong's test is paired. Round 2
scores only its trained epochs here (`train.score_start: false`): with epoch 0 a round that
cannot beat its start hands round 1's weights on in both arms, and the losses would not be
compared at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from machine import machine  # noqa: E402
from pipeline_bench import score_round, with_sets  # noqa: E402

from tests.pipeline_repo import make_repo_copy, pipeline_env, run  # noqa: E402

ARMS = ("bce", "auc_margin")


def train_round_2(repo: Path, loss: str) -> float:
    """Set round 2's loss, commit, `dvc repro train-round-2`; seconds taken."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(with_sets(params, [f"rounds.r2.loss={loss}"]),
                                                     sort_keys=False))
    run(["git", "commit", "-q", "-am", f"round 2: {loss}"], repo, pipeline_env())
    start = time.perf_counter()
    run(["dvc", "repro", "train-round-2"], repo, pipeline_env(), timeout=3600)
    return time.perf_counter() - start


def one_seed(seed: int, target: str) -> dict:
    """Both arms for one training seed: each arm's test AUROC with its bootstrap CI, round 2's
    validation AUROC, and DeLong's paired test of AUC-margin minus BCE."""
    from chexops.config import load_params
    from chexops.evaluation import stats
    from chexops.evaluation.heldout import heldout_record
    from chexops.evaluation.targets import valid_labels

    base = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    params = with_sets(base, [f"seed={seed}", "train.score_start=false"])
    out: dict = {"seed": seed, "arms": {}}
    probs = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo_copy(Path(tmp), params)
        for arm in ARMS:
            seconds = train_round_2(repo, arm)
            loaded = load_params(repo / "params.yaml")
            test, p = score_round(repo, 2, loaded)
            mask, y = valid_labels(test, target)
            probs[arm] = p[mask, 0]
            cfg = loaded.evaluate
            valid = json.loads((repo / "metrics/round-2.json").read_text())
            record = heldout_record(y, probs[arm], cfg.threshold, cfg.bootstrap, seed, valid["auroc"])
            out["arms"][arm] = {"test_auroc": record["auroc"], "test_auroc_lo": record["auroc_lo"],
                                "test_auroc_hi": record["auroc_hi"],
                                "round2_valid_auroc": valid["auroc"], "loss": valid.get("loss"),
                                "dvc_repro_s": seconds}
        test_delong = stats.paired_delong(y, probs["bce"], probs["auc_margin"])
    out["delong_auc_margin_minus_bce"] = {k: test_delong[k] for k in ("diff", "lo", "hi", "p_value")}
    out["test_images"] = int(len(y))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 11])
    args = parser.parse_args()
    target = yaml.safe_load((HERE.parent / "params.yaml").read_text())["targets"][0]
    seeds = [one_seed(s, target) for s in args.seeds]
    diffs = np.array([s["delong_auc_margin_minus_bce"]["diff"] for s in seeds])
    result = {"machine": machine(), "design": __doc__.split("\n\n")[2].replace("\n", " "),
              "seeds": seeds, "mean_diff": float(diffs.mean()),
              "seeds_auc_margin_better": int((diffs > 0).sum())}
    (HERE / "results" / "auc_compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
