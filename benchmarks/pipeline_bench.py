"""The default pipeline end to end: `dvc repro` of params.yaml (synthetic CheXpert, CPU) in a
fresh copy of the repo; wall time, peak memory, each round's best validation AUROC and the
held-out test cohort's AUROC with its 95 % CI, ceiling and selection optimism.
Writes benchmarks/results/pipeline_bench[.<name>].json.

    python benchmarks/pipeline_bench.py                                  # params.yaml as shipped
    python benchmarks/pipeline_bench.py --name r1-lr1e-3 -S lr=1e-3      # a recipe change
    python benchmarks/pipeline_bench.py --until 1 --name r1-only         # round 1's weights only

`-S key=value` (as `dvc exp run -S`, YAML values) changes params before the run, so each row
of docs/EXPERIMENTS.md's recipe table is one call.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from machine import machine  # noqa: E402

from tests.pipeline_repo import make_repo_copy, pipeline_env  # noqa: E402


def with_sets(params: dict, pairs: list[str]) -> dict:
    """params with each 'a.b=value' of `pairs` set (value parsed as YAML), as `dvc exp run -S`."""
    out = copy.deepcopy(params)
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def outcome(repo: Path, target: str) -> dict:
    """Every epoch of every round (losses, validation AUROC), each round's best validation AUROC,
    and evaluate's validation and held-out test figures."""
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())[target]
    rounds = {k: json.loads((repo / f"metrics/round-{k}.json").read_text()) for k in range(1, 6)}
    test = evaluation.get("test", {})
    epochs = pd.read_csv(repo / "plots/evaluate/rounds.csv")
    return {
        "epochs": epochs.round(4).replace({np.nan: None}).to_dict("records"),
        "round_best_valid_auroc": {k: r["auroc"] for k, r in rounds.items()},
        "round_kept_start": {k: r.get("kept_start") for k, r in rounds.items()},
        "final_valid_auroc": evaluation["auroc"], "valid_auroc_lo": evaluation.get("auroc_lo"),
        "valid_auroc_hi": evaluation.get("auroc_hi"), "valid_images": evaluation.get("n"),
        "valid_ceiling_auroc": evaluation.get("ceiling_auroc"),
        "test_auroc": test.get("auroc"), "test_auroc_lo": test.get("auroc_lo"),
        "test_auroc_hi": test.get("auroc_hi"), "test_ceiling_auroc": test.get("ceiling_auroc"),
        "test_ceiling_fraction": test.get("ceiling_fraction"),
        "selection_optimism": test.get("optimism"), "test_images": test.get("n"),
    }


def score_round(repo: Path, k: int, params: Any) -> tuple[pd.DataFrame, np.ndarray]:
    """(held-out test table, round k's weights' probabilities on it: (N, targets)), with the
    evaluate stage's own predictor; params: the repo's loaded Params."""
    from chexops import paths
    from chexops.inference.frames import predict_frame

    test = pd.read_parquet(repo / paths.CLEAN_TEST)
    probs = predict_frame(params, repo / paths.round_weights(k), test, repo / paths.RAW_ZIP, repo)
    return test, np.asarray(probs)


def round_outcome(repo: Path, k: int, target: str) -> dict:
    """`--until k`: rounds 1..k's best validation AUROC and round k's weights scored on the
    held-out test cohort with evaluate's own functions (the rest of evaluate skipped)."""
    from chexops import paths
    from chexops.config import load_params
    from chexops.evaluation.heldout import add_heldout

    params = load_params(repo / "params.yaml")
    rounds = {i: json.loads((repo / f"metrics/round-{i}.json").read_text()) for i in range(1, k + 1)}
    test, probs = score_round(repo, k, params)
    metrics = {target: {"auroc": rounds[k]["auroc"]}}
    add_heldout(metrics, test, probs, (target,), params.evaluate.threshold,
                params.evaluate.bootstrap, params.seed, pd.read_parquet(repo / paths.TRUTH))
    held = metrics[target]["test"]
    return {"round_best_valid_auroc": {i: r["auroc"] for i, r in rounds.items()},
            "round_kept_start": {i: r.get("kept_start") for i, r in rounds.items()},
            "scored_round": k, "test_auroc": held["auroc"], "test_auroc_lo": held["auroc_lo"],
            "test_auroc_hi": held["auroc_hi"], "test_ceiling_auroc": held.get("ceiling_auroc"),
            "test_ceiling_fraction": held.get("ceiling_fraction"),
            "selection_optimism": held["optimism"], "test_images": held["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="", help="result file suffix (pipeline_bench.<name>.json)")
    parser.add_argument("--until", type=int, default=0, metavar="K",
                        help="stop after train-round-K and score its weights on the test cohort")
    args = parser.parse_args()
    params = with_sets(yaml.safe_load((HERE.parent / "params.yaml").read_text()), args.sets)
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo_copy(Path(tmp), params)
        target = [f"train-round-{args.until}"] if args.until else []
        start = time.perf_counter()
        subprocess.run(["dvc", "repro", *target], cwd=repo, env=pipeline_env(), check=True,
                       capture_output=True)
        seconds = time.perf_counter() - start
        scored = (round_outcome(repo, args.until, params["targets"][0]) if args.until
                  else outcome(repo, params["targets"][0]))
        result = {"machine": machine(), "profile": "params.yaml (default)", "changes": args.sets,
                  "dvc_repro": " ".join(["dvc", "repro", *target]), "dvc_repro_s": seconds,
                  "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  **scored,
                  "goal": "<= 900 s on 2 cores; test AUROC >= 0.95 x its ceiling; each round's "
                          "best >= the round before"}
    name = f"pipeline_bench.{args.name}.json" if args.name else "pipeline_bench.json"
    (HERE / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
