"""`chexops lr-find K`: the LR range test for round K on its data and starting weights, as a
plot (plots/lr-find/round-K.png), a JSON of the curve and the suggested lr; nothing is trained."""
from __future__ import annotations

import argparse
from pathlib import Path

from chexops import atomic
from chexops.config import Params
from chexops.inference.settings import resolve_settings
from chexops.runtime import prepare, seed_everything
from chexops.training import rounds
from chexops.training.loop import with_recipe
from chexops.training.lr_finder import RULE, LRFindResult, figure, range_test


def run(args: argparse.Namespace, params: Params, root: Path) -> None:
    out = Path(args.out) if args.out else Path("plots/lr-find") / f"round-{args.k}.png"
    out = out if out.is_absolute() else root / out
    result = find_for_round(params, root, args.k)
    fig = figure(result, result.suggestion)
    with atomic.atomic_path(out, ".png") as tmp:
        fig.savefig(tmp, format="png")
    atomic.write_json(out.with_suffix(".json"), result.as_dict())
    if result.suggestion is None:
        print(f"round {args.k}: the range test diverged at once: no suggestion (plot: {out})")
    else:
        print(f"round {args.k}: suggested lr {result.suggestion:.3e} ({RULE} rule); plot: {out}")


def find_for_round(params: Params, root: Path, k: int) -> LRFindResult:
    """The range test for round k's data and starting weights, without training."""
    device = prepare(params.runtime)
    plan = rounds.plan_for(params, k)
    train_df, _ = rounds.load_frames(params, root, k)
    seed_everything(params.seed)
    model = rounds.build_start_model(params, rounds.previous_weights(root, k), root)
    data = rounds.train_set(params, root, train_df, device)[0]
    s = with_recipe(resolve_settings(params.runtime, params.train, device), plan)
    return range_test(model, data, plan, s, params.train.lr_find)
