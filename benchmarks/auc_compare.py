"""BCE vs LibAUC's AUC-margin loss (Yuan et al., ICCV 2021) for round 2, judged on the held-out
test cohort with the paired DeLong test, over several training seeds.
Writes benchmarks/results/auc_compare.json.

    python benchmarks/auc_compare.py --seeds 42 7 11 --auc-lr 0.01
    python benchmarks/auc_compare.py --seeds 1 -S data.synthetic.train_patients=60 --name smoke

`-S key=value` (as in pipeline_bench.py) changes every arm's params, e.g. for a quick smoke run.

Per seed, in one fresh copy of the repo (params.yaml with that `seed`): `dvc repro
train-round-2` with BCE rounds (round 1 is BCE in every arm, the LibAUC recipe), then round 2
again with `rounds.r2.loss: auc_margin` (DVC re-runs round 2 only: round 1 is unchanged), and
once more per extra PESG LR (`--auc-lr`: reported beside, never chosen on the test cohort). All
arms' round-2 weights are scored on the same test images, so DeLong's test is paired. Round 2
scores only its trained epochs here (`train.score_start: false`): with epoch 0 a round that
cannot beat its start hands round 1's weights on in both arms, and the losses would not be
compared at all.
"""
from __future__ import annotations

import argparse
import hashlib
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

DESIGN = next(p for p in __doc__.split("\n\n") if p.startswith("Per seed")).strip().replace("\n", " ")


def arms(auc_lrs: list[float]) -> dict[str, list[str]]:
    """Arm name -> its round-2 params: BCE, AUC-margin with params.yaml's PESG settings (LibAUC's
    CheXpert recipe), and one AUC-margin arm per extra PESG peak LR in `auc_lrs`."""
    out = {"bce": ["rounds.r2.loss=bce"], "auc_margin": ["rounds.r2.loss=auc_margin"]}
    for lr in auc_lrs:
        out[f"auc_margin_lr{lr:g}"] = ["rounds.r2.loss=auc_margin", f"train.auc_margin.lr={lr}"]
    return out


def train_round_2(repo: Path, name: str, sets: list[str], base: dict, first: bool) -> float:
    """Write `base` with the arm's `sets`, commit, `dvc repro train-round-2`; seconds taken.
    After the first arm only round 2 runs (`--single-item`): an arm's `train.auc_margin.lr` is a
    param of round 1 too, and every arm must start from the same round-1 weights."""
    (repo / "params.yaml").write_text(yaml.safe_dump(with_sets(base, sets), sort_keys=False))
    run(["git", "commit", "-q", "--allow-empty", "-am", f"round 2: {name}"], repo, pipeline_env())
    start = time.perf_counter()
    single = [] if first else ["--single-item"]
    run(["dvc", "repro", *single, "train-round-2"], repo, pipeline_env(), timeout=3600)
    return time.perf_counter() - start


def one_seed(seed: int, target: str, sets: list[str], plan: dict[str, list[str]]) -> dict:
    """Every arm for one training seed: its test AUROC with the bootstrap CI, round 2's
    validation AUROC, and DeLong's paired test of each AUC-margin arm minus BCE."""
    from chexops import paths
    from chexops.config import load_params
    from chexops.evaluation import stats
    from chexops.evaluation.heldout import heldout_record
    from chexops.evaluation.targets import valid_labels

    base = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    params = with_sets(base, [*sets, f"seed={seed}", "train.score_start=false"])
    out: dict = {"seed": seed, "arms": {}, "delong_minus_bce": {}}
    probs = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo_copy(Path(tmp), params)
        start_weights = repo / paths.round_weights(1)
        for i, (name, arm_sets) in enumerate(plan.items()):
            seconds = train_round_2(repo, name, arm_sets, params, first=i == 0)
            digest = hashlib.sha256(start_weights.read_bytes()).hexdigest()
            if out.setdefault("round1_sha256", digest) != digest:
                raise AssertionError(f"arm {name}: round 1's weights changed; the arms are not paired")
            loaded = load_params(repo / "params.yaml")
            test, p = score_round(repo, 2, loaded)
            mask, y = valid_labels(test, target)
            probs[name] = p[mask, 0]
            cfg = loaded.evaluate
            valid = json.loads((repo / "metrics/round-2.json").read_text())
            record = heldout_record(y, probs[name], cfg.threshold, cfg.bootstrap, seed, valid["auroc"])
            out["arms"][name] = {"test_auroc": record["auroc"], "test_auroc_lo": record["auroc_lo"],
                                 "test_auroc_hi": record["auroc_hi"],
                                 "round2_valid_auroc": valid["auroc"], "loss": valid.get("loss"),
                                 "dvc_repro_s": seconds}
    for name in plan:
        if name != "bce":
            d = stats.paired_delong(y, probs["bce"], probs[name])
            out["delong_minus_bce"][name] = {k: d[k] for k in ("diff", "lo", "hi", "p_value")}
    out["test_images"] = int(len(y))
    return out


def summary(seeds: list[dict]) -> dict:
    """Per arm over the seeds: mean test AUROC; per AUC-margin arm: mean paired difference from
    BCE and how many seeds it was better, significantly better or worse (DeLong p < 0.05)."""
    out: dict = {}
    for name in seeds[0]["arms"]:
        row: dict = {"mean_test_auroc": float(np.mean([s["arms"][name]["test_auroc"] for s in seeds]))}
        if name != "bce":
            tests = [s["delong_minus_bce"][name] for s in seeds]
            row.update(mean_diff=float(np.mean([t["diff"] for t in tests])),
                       seeds_better=sum(t["diff"] > 0 for t in tests),
                       seeds_significantly_better=sum(t["diff"] > 0 and t["p_value"] < 0.05 for t in tests),
                       seeds_significantly_worse=sum(t["diff"] < 0 and t["p_value"] < 0.05 for t in tests))
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 11])
    parser.add_argument("--auc-lr", type=float, nargs="*", default=[],
                        help="extra AUC-margin arms at these PESG peak LRs (besides params.yaml's)")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[],
                        metavar="KEY=VALUE", help="a param for every arm, as `dvc exp run -S`")
    parser.add_argument("--name", default="", help="results file suffix: auc_compare.<name>.json")
    args = parser.parse_args()
    target = yaml.safe_load((HERE.parent / "params.yaml").read_text())["targets"][0]
    plan = arms(args.auc_lr)
    seeds = [one_seed(s, target, args.sets, plan) for s in args.seeds]
    result = {"machine": machine(), "design": DESIGN, "sets": args.sets, "arms": plan,
              "seeds": seeds, "summary": summary(seeds)}
    name = f"auc_compare.{args.name}.json" if args.name else "auc_compare.json"
    (HERE / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
