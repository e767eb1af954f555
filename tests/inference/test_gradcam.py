"""gradcam: heatmaps of the right shape and range, localised where the evidence is, seeded case
selection, PNG grids."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from chexops.inference import gradcam
from chexops.model.network import ChexNet
from tests.tiny_model import SIZE, tiny_params

torch.set_num_threads(1)


class MeanHead(nn.Module):
    """Logit = mean feature: every channel gets a positive weight, so Grad-CAM follows the
    activations and must light up where the image is bright."""

    def forward(self, feats):
        return feats.mean(dim=(1, 2, 3))[:, None]


def test_gradcam_lights_up_the_region_the_logit_depends_on():
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
    with torch.no_grad():
        body[0].weight.fill_(0.1)
        body[0].bias.fill_(0.0)
    model = ChexNet(body, MeanHead(), "toy")
    q = SIZE // 2
    images = np.zeros((2, SIZE, SIZE), dtype=np.uint8)
    images[:, :q, :q] = 230   # the evidence: top-left quadrant only (black elsewhere)
    cams = gradcam.gradcam(model, images, 0)
    assert cams.shape == (2, SIZE, SIZE) and cams.min() >= 0 and cams.max() == 1.0
    assert cams[:, : q - 6, : q - 6].mean() > 0.9 and cams[:, q + 6:, q + 6:].max() < 0.05


def test_gradcam_on_a_timm_model_is_deterministic(tmp_path):
    from chexops.model.network import build_model

    params = tiny_params(tmp_path)
    torch.manual_seed(0)
    model = build_model(params.model, 1)
    images = np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8)
    a, b = gradcam.gradcam(model, images, 0), gradcam.gradcam(model, images, 0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, SIZE, SIZE) and np.isfinite(a).all() and a.max() <= 1.0
    assert not any(p.grad is not None for p in model.parameters())  # no stray gradients left


def test_case_selection_is_seeded_and_correct():
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 0])
    p = np.array([.9, .2, .8, .7, .1, .6, .3, .2, .95, .4])
    a = gradcam.select_cases(y, p, 0.5, per_kind=2, seed=3)
    assert {k: len(v) for k, v in a.items()} == {"TP": 2, "FN": 2, "FP": 2}
    assert set(a["TP"]) <= {0, 2, 8} and set(a["FN"]) == {1, 6} and set(a["FP"]) == {3, 5}
    b = gradcam.select_cases(y, p, 0.5, per_kind=2, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    none = gradcam.select_cases(np.zeros(3), np.zeros(3), 0.5, 4, 0)
    assert all(len(v) == 0 for v in none.values())


def test_case_grids_are_png_figures(tmp_path):
    from chexops.model.network import build_model

    params = tiny_params(tmp_path)
    torch.manual_seed(0)
    model = build_model(params.model, 1)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (8, SIZE, SIZE), dtype=np.uint8)
    paths = [f"x/valid/patient{i:05d}/study1/view1_frontal.jpg" for i in range(8)]
    y = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    p = np.array([.9, .1, .8, .2, .7, .3, .2, .6])
    grids = gradcam.case_grids(model, images, paths, y, p, 0, "Cardiomegaly", 0.5, per_kind=2)
    assert set(grids) == {"TP", "FN", "FP"}
    out = tmp_path / "fn.png"
    grids["FN"].savefig(out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "patient00001/study1" in grids["FN"].axes[0].get_title()
    assert gradcam.overlay(images[0], np.zeros((SIZE, SIZE))).shape == (SIZE, SIZE, 3)


# ---------------------------------------------------------------- U-MultiClass outputs

def test_target_score_reads_each_target_by_its_own_slice():
    from chexops.model.coding import OutputCoding

    coding = OutputCoding(("binary", "multiclass", "binary"))
    logits = torch.tensor([[0.5, 1.0, 3.0, -2.0, 7.0],
                           [-1.0, 2.0, 0.0, 4.0, -3.0]])
    torch.testing.assert_close(gradcam.target_score(logits, 0, coding), logits[:, 0])
    torch.testing.assert_close(gradcam.target_score(logits, 1, coding), logits[:, 2] - logits[:, 1])
    torch.testing.assert_close(gradcam.target_score(logits, 2, coding), logits[:, 4])
    torch.testing.assert_close(gradcam.target_score(logits, 1), logits[:, 1])  # no coding: output j


class SplitHead(nn.Module):
    """Three logits (neg, pos, uncertain): z_neg from channel 1 (dark areas), z_pos from
    channel 0 (bright areas), so only z_pos - z_neg points at the bright evidence."""

    def forward(self, feats):
        m = feats.mean(dim=(2, 3))
        return torch.stack([m[:, 1], m[:, 0], torch.zeros_like(m[:, 0])], dim=1)


def test_multiclass_gradcam_follows_pos_minus_neg():
    from chexops.model.coding import OutputCoding

    body = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
    with torch.no_grad():
        body[0].weight[0].fill_(0.1)    # channel 0: bright pixels
        body[0].weight[1].fill_(-0.1)   # channel 1: dark pixels
        body[0].bias.fill_(0.0)
    model = ChexNet(body, SplitHead(), "toy")
    q = SIZE // 2
    images = np.zeros((2, SIZE, SIZE), dtype=np.uint8)
    images[:, :q, :q] = 230   # the positive evidence: top-left quadrant
    cams = gradcam.gradcam(model, images, 0, coding=OutputCoding(("multiclass",)))
    assert cams[:, : q - 6, : q - 6].mean() > 0.9 and cams[:, q + 6:, q + 6:].max() < 0.05
    # reading output 0 as the target's logit (the old bug) maps the negative evidence instead
    wrong = gradcam.gradcam(model, images, 0)
    assert wrong[:, : q - 6, : q - 6].max() < 0.05 and wrong[:, q + 6:, q + 6:].mean() > 0.9
    grids = gradcam.case_grids(model, images, ["a/b/c/d.jpg"] * 2, np.array([1, 1]),
                               np.array([.9, .8]), 0, "Cardiomegaly", 0.5, per_kind=2,
                               coding=OutputCoding(("multiclass",)))
    assert len(grids["TP"].axes[0].images) == 1
