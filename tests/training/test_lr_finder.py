"""lr_find.py: the LR range test, fastai's valley rule, `lr: auto` on a round, `chexops lr-find`."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chexops import paths
from chexops.config import LRFindConfig
from chexops.errors import ChexopsError
from chexops.inference.settings import Settings
from chexops.stages import train_round as stage
from chexops.training import lr_finder as lr_find
from tests.stages.test_train_round import params, root, runs  # noqa: F401 (fixtures)
from tests.training.test_loop import new_model, plan, tiny_data

torch.set_num_threads(1)
CPU = Settings(torch.device("cpu"))
AUTO = {**{f"r{k}": {"epochs": 1, "lr": 1e-4} for k in range(2, 6)},
        "r1": {"epochs": 1, "lr": "auto"}}


def test_lr_steps_smoothing_and_valley():
    cfg = LRFindConfig(start=1e-6, end=1.0, num=61)
    lrs = lr_find.lr_steps(cfg)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 0.1)
    assert lr_find.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected
    # flat until 1e-5, falling until 1e-2, then exploding: valley is inside the fall
    x = np.log10(lrs)
    losses = np.where(x < -5, 1.0, np.where(x < -2, 1.0 - 0.3 * (x + 5), 0.1 + 2 * (x + 2) ** 2))
    lr = lr_find.valley(list(lrs), list(losses), cfg.num)
    assert 1e-5 < lr < 1e-2
    assert lr_find.valley([1e-3] * 6, [1.0] * 6, 100) is None          # too few points


def test_range_test_explores_exponentially_and_leaves_the_model():
    model = new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LRFindConfig(start=1e-5, end=1.0, num=30)
    res = lr_find.range_test(model, tiny_data(16), plan(), CPU, cfg)
    assert res.lrs == pytest.approx(list(lr_find.lr_steps(cfg)[:len(res.lrs)]))
    assert len(res.lrs) == (30 if res.diverged_at is None else res.diverged_at + 1)
    assert res.suggestion is not None and cfg.start < res.suggestion < res.lrs[-1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_range_test_stops_when_the_smoothed_loss_passes_four_times_its_minimum(monkeypatch):
    import chexops.training.step as train_mod

    curve = iter([1.0] * 10 + list(np.linspace(1.0, 0.2, 20)) + [0.2 * 3 ** i for i in range(1, 30)])
    monkeypatch.setattr(train_mod, "accumulate_grads",
                        lambda *a, **k: torch.tensor(next(curve), requires_grad=False))
    cfg = LRFindConfig(start=1e-6, end=1.0, num=100)
    res = lr_find.range_test(new_model(), tiny_data(16), plan(), CPU, cfg)
    smoothed = lr_find.smooth(res.losses)
    assert res.diverged_at == len(res.lrs) - 1 < 60
    assert smoothed[-1] > 4 * min(smoothed) and smoothed[-2] <= 4 * min(smoothed[:-1])
    assert res.lrs[10] < res.suggestion < res.lrs[30]          # inside the falling stretch


def test_divergence_at_once_is_an_error_unless_a_fallback_is_set():
    cfg = LRFindConfig(start=1e4, end=1e8, num=20)
    res = lr_find.range_test(new_model(), tiny_data(16), plan(), CPU, cfg)
    assert res.suggestion is None
    with pytest.raises(ChexopsError, match=r"rounds.r1: lr auto: the LR range test diverged at "
                                           r"once .*set train.lr_find.fallback"):
        lr_find.choose_lr(res, cfg, "rounds.r1")
    fallback = LRFindConfig(start=1e4, end=1e8, num=20, fallback=1e-3)
    assert lr_find.choose_lr(res, fallback, "rounds.r1") == 1e-3


def test_lr_auto_round_uses_the_suggestion_and_logs_plot_and_choice(root, runs):
    finder = {"lr_find": {"start": 1e-5, "end": 10.0, "num": 30}}
    p = params(rounds=AUTO, train={"image_size": 32, "batch_size": 4, **finder})
    stage.main(p, root, 1)
    run = runs[0][0]
    chosen = float(run.params["lr_find.lr"])
    assert run.params["lr_find.rule"] == "valley" and run.params["lr"] == "auto"
    assert "lr_find.png" in run.figures and len(run.dicts["lr_find.json"]["lrs"]) >= 3
    assert json.loads((root / paths.round_meta(1)).read_text())["lr_found"] == chosen
    trained = [m["lr"] for _, m in run.steps if m["lr"] is not None]  # epoch 0 has no lr
    assert trained[0] < chosen   # one-cycle warm-up below the peak
    auto = load_file(str(root / paths.round_weights(1)))
    fixed = {**AUTO, "r1": {"epochs": 1, "lr": chosen}}
    stage.main(params(rounds=fixed, train={"image_size": 32, "batch_size": 4, **finder}), root, 1)
    same = load_file(str(root / paths.round_weights(1)))
    assert all(torch.equal(auto[k], same[k]) for k in auto)   # the test does not touch training


def test_lr_auto_that_diverges_at_once_stops_the_round(root, runs):
    bad = {"lr_find": {"start": 1e4, "end": 1e8, "num": 20}}
    with pytest.raises(ChexopsError, match="diverged at once"):
        stage.main(params(rounds=AUTO, train={"image_size": 32, "batch_size": 4, **bad}), root, 1)
    assert not (root / paths.round_weights(1)).exists()
    fallback = {"lr_find": {**bad["lr_find"], "fallback": 1e-3}}
    stage.main(params(rounds=AUTO, train={"image_size": 32, "batch_size": 4, **fallback}), root, 1)
    assert runs[-1][0].params["lr_find.lr"] == 1e-3
    assert runs[-1][0].params["lr_find.fallback_used"] is True


def tiny_jpeg(member: str) -> bytes:
    """A real JPEG for a zip member: noise seeded by the path, brighter for positives ('pos')."""
    import io
    import zlib

    from PIL import Image

    rng = np.random.default_rng(zlib.crc32(member.encode()))
    pixels = rng.integers(0, 120, (40, 32)) + (100 if "pos" in member else 0)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_lr_find_command_writes_the_plot_and_prints_the_suggestion(tmp_path):
    """The README's `chexops lr-find 2`, run as the console script in a tiny repository built
    here: params.yaml (resnet18 at 32 px), the resample stage's outputs over a zip of real JPEGs,
    and round 1's weights, which round 2 starts from."""
    import zipfile

    import pandas as pd
    import yaml

    from chexops.config import to_dict
    from tests.pipeline_repo import VENV_BIN, pipeline_env
    from tests.processes import run_group
    from tests.stages.test_train_round import frame
    from tests.tiny_model import tiny_weights

    repo = tmp_path / "repo"
    p = params(train={"image_size": 32, "batch_size": 4,
                      "lr_find": {"start": 1e-5, "end": 10.0, "num": 30}})
    (repo / paths.RESAMPLED_DIR).mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(to_dict(p), sort_keys=False))
    train, valid = frame(16, False), frame(8, True, start=100)
    train.to_parquet(repo / paths.RESAMPLED_TRAIN)
    valid.to_parquet(repo / paths.RESAMPLED_VALID)
    (repo / paths.RAW_ZIP).parent.mkdir(parents=True)
    with zipfile.ZipFile(repo / paths.RAW_ZIP, "w") as zf:
        for member in pd.concat([train, valid])["Path"]:
            zf.writestr(member, tiny_jpeg(member))
    round1 = repo / paths.round_weights(1)
    round1.parent.mkdir(parents=True)
    assert tiny_weights(round1.parent, p) == round1
    before = round1.read_bytes()

    proc = run_group([str(VENV_BIN / "chexops"), "lr-find", "2"], cwd=repo, env=pipeline_env(),
                     timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = repo / "plots/lr-find/round-2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads(png.with_suffix(".json").read_text())
    assert curve["suggestion"] is not None and len(curve["lrs"]) >= 3
    assert f"round 2: suggested lr {curve['suggestion']:.3e} (valley rule)" in proc.stdout
    assert round1.read_bytes() == before                        # the starting weights, untouched
    assert not (repo / paths.round_weights(2)).exists()         # nothing trained
