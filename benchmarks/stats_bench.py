"""What evaluate's statistics cost: the stratified bootstrap (vectorised) and DeLong, on the seed's
234-image validation split and on a 10,000-image one. Writes benchmarks/results/stats_bench.json.

    python benchmarks/stats_bench.py [--resamples 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

from machine import machine  # noqa: E402

from chexops.evaluation import stats  # noqa: E402


def scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ~30 % positives and scores of a model with AUROC about 0.83 (the seed's)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, 1 / (1 + np.exp(-(rng.normal(size=n) + 1.35 * y)))


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/stats_bench.json"))
    args = parser.parse_args()
    results = {"machine": machine(),
               "goal": "bootstrap with >= 1,000 resamples costs seconds", "sizes": []}
    for n in (234, 10_000):
        y, p = scores(n)
        _, q = scores(n, seed=1)
        results["sizes"].append({
            "n": n, "resamples": args.resamples,
            "bootstrap_s": median_seconds(lambda: stats.bootstrap_ci(y, p, 0.5, args.resamples, 0),
                                          args.repeats),
            "delong_s": median_seconds(lambda: stats.delong_auroc(y, p), args.repeats),
            "paired_delong_s": median_seconds(lambda: stats.paired_delong(y, p, q), args.repeats),
            "auroc": stats.delong_auroc(y, p)["auroc"]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
