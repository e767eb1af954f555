"""augment.py (seeded tensor augmentation, presets), its use in training, and TTA (tta.py,
inference.predict_frame(tta=N), the evaluate stage's `<target>.tta.*` block)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from chexops import paths
from chexops.config import AugmentConfig, ConfigError, TrainConfig
from chexops.data.augment import PRESETS, Augmenter, augment_batch, make_augmenter, resolve
from chexops.stages import train_round as stage
from tests.stages.test_train_round import params, root, runs  # noqa: F401 (fixtures)
from tests.training.test_loop import new_model, plan, tiny_data, weights

torch.set_num_threads(1)


def batch(n: int = 6, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size), generator=g, dtype=torch.uint8)


def test_presets_and_bad_names():
    assert resolve(AugmentConfig()) is None and make_augmenter(AugmentConfig(), 1) is None
    lighting = resolve(AugmentConfig(preset="lighting"))
    assert (lighting.brightness, lighting.contrast, lighting.rotate_deg) == (0.2, 0.2, 0.0)
    assert not PRESETS["light"].hflip and not lighting.hflip   # flips stay off
    with pytest.raises(ConfigError, match="unknown preset 'flip'; choose from none, lighting"):
        params(train={"image_size": 32, "batch_size": 4, "augment": {"preset": "flip"}})
    with pytest.raises(ConfigError, match="rotate_deg: set, but preset 'light' ignores it"):
        params(train={"image_size": 32, "augment": {"preset": "light", "rotate_deg": 10}})
    custom = params(train={"augment": {"preset": "custom", "rotate_deg": 10, "hflip": True}})
    assert resolve(custom.train.augment).rotate_deg == 10


def test_augment_is_seeded_per_step_and_stays_in_range():
    aug = Augmenter(PRESETS["light"], seed=3)
    x = batch()
    a, b, c = aug(x, 5), aug(x, 5), aug(x, 6)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 255
    assert not torch.equal(a, Augmenter(PRESETS["light"], seed=4)(x, 5))


def test_zero_custom_is_identity_and_hflip_mirrors():
    x = batch()
    g = torch.Generator().manual_seed(0)
    same = augment_batch(x, AugmentConfig(preset="custom"), g)
    torch.testing.assert_close(same, x.float())
    flipped = augment_batch(x, AugmentConfig(preset="custom", hflip=True),
                            torch.Generator().manual_seed(1))
    mirrored = [torch.allclose(flipped[i], x[i].flip(-1).float(), atol=1e-3) for i in range(6)]
    kept = [torch.allclose(flipped[i], x[i].float(), atol=1e-3) for i in range(6)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored)


def test_lighting_changes_brightness_and_contrast_only():
    x = torch.full((4, 8, 8), 128, dtype=torch.uint8)
    out = augment_batch(x, PRESETS["lighting"], torch.Generator().manual_seed(0))
    per_image = out.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image))  # no geometry
    assert (per_image[:, 0] - 128).abs().max() <= 0.2 * 255 + 1e-3
    assert len(set(per_image[:, 0].tolist())) == 4


def test_training_with_augmentation_is_reproducible_and_differs(tmp_path):
    data, valid = tiny_data(16), tiny_data(8, seed=1)
    aug = TrainConfig(image_size=32, batch_size=4, max_batches=2,
                      augment=AugmentConfig(preset="light"))
    for name, p in (("a", plan(epochs=1, train=aug)), ("b", plan(epochs=1, train=aug)),
                    ("none", plan(epochs=1, max_batches=2))):
        from chexops.training.loop import train_round
        train_round(new_model(), data, valid, p, tmp_path / f"{name}.safetensors")
    a, b, none = (weights(tmp_path / f"{n}.safetensors") for n in ("a", "b", "none"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.conv1.weight"], none["body.conv1.weight"])


def test_tta_at_evaluate_is_reported_beside_the_plain_result(root, runs):
    from chexops.inference.frames import predict_frame
    from chexops.stages.evaluate import add_tta

    p = params(evaluate={"tta": 3})
    stage.main(p, root, 1)
    w = root / paths.round_weights(1)
    valid = pd.read_parquet(root / paths.RESAMPLED_VALID)
    plain = predict_frame(p, w, valid, root / paths.RAW_ZIP, root)
    tta = predict_frame(p, w, valid, root / paths.RAW_ZIP, root, tta=3)
    again = predict_frame(p, w, valid, root / paths.RAW_ZIP, root, tta=3)
    assert tta.shape == plain.shape and np.array_equal(tta, again)
    assert not np.allclose(tta, plain)
    metrics = {"Cardiomegaly": {"auroc": 0.5}}
    add_tta(p, root, w, valid, metrics)
    got = metrics["Cardiomegaly"]["tta"]
    assert got["views"] == 3 and 0 <= got["auroc"] <= 1 and metrics["Cardiomegaly"]["auroc"] == 0.5
    from chexops.tracking.store import numeric_metrics
    assert "Cardiomegaly.tta.auroc" in numeric_metrics(metrics)
    off = {"Cardiomegaly": {}}
    add_tta(params(), root, w, valid, off)       # evaluate.tta: 0 -> nothing added
    assert off == {"Cardiomegaly": {}}
