"""Grad-CAM heatmaps on the last feature block of the timm body: where the model looked.

ChexNet is body -> head, and the body's output is its last feature map, so Grad-CAM needs no
hooks: run the body, keep its output's gradient, run the head. For a clinician the first
question is the false negatives, so the evaluate stage draws a fixed, seeded sample of true
positives, false negatives and false positives and saves them as PNG grids.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from matplotlib.figure import Figure
    from PIL import Image

    from chexops.model.coding import OutputCoding
    from chexops.model.network import ChexNet

KINDS = ("TP", "FN", "FP")


def target_score(logits: "torch.Tensor", target: int,
                 coding: "OutputCoding | None" = None) -> "torch.Tensor":
    """(N,) score of target `target` whose gradient Grad-CAM follows: its logit (binary), or
    z_pos - z_neg for a U-MultiClass target (its positive probability is the sigmoid of that).
    Without a coding, output `target` is the target's logit."""
    if coding is None:
        return logits[:, target]
    sl = coding.slices()[target]
    if sl.stop - sl.start == 1:
        return logits[:, sl.start]
    return logits[:, sl.start + 1] - logits[:, sl.start]   # neg 0, pos 1, uncertain 2


def gradcam(model: "ChexNet", images: np.ndarray, target: int,
            device: "torch.device | str" = "cpu", batch: int = 16,
            coding: "OutputCoding | None" = None) -> np.ndarray:
    """(N, S, S) uint8 images -> (N, S, S) heatmaps in [0, 1] for target `target` (scored by
    `target_score` under the model's output coding)."""
    import torch

    from chexops.data.batches import to_input

    model.eval()
    maps = []
    for i in range(0, len(images), batch):
        x = to_input(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])), torch.device(device))
        with torch.enable_grad():
            feats = model.body(x).detach().requires_grad_(True)
            logits = model.head(feats)
            grad, = torch.autograd.grad(target_score(logits, target, coding).sum(), feats)
        weights = grad.mean(dim=(2, 3), keepdim=True)            # channel importance
        cam = torch.relu((weights * feats.detach()).sum(dim=1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear",
                                              align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
        maps.append((cam / peak).cpu().numpy())
    size = images.shape[-1] if len(images) else 0
    return np.concatenate(maps) if maps else np.zeros((0, size, size))


def select_cases(y_true: np.ndarray, y_prob: np.ndarray, threshold: float, per_kind: int,
                 seed: int) -> dict[str, np.ndarray]:
    """{TP, FN, FP: up to per_kind row indices}, drawn with a fixed seed (sorted, stable)."""
    y = np.asarray(y_true).astype(int)
    pred = np.asarray(y_prob) >= threshold
    masks = {"TP": (y == 1) & pred, "FN": (y == 1) & ~pred, "FP": (y == 0) & pred}
    rng = np.random.default_rng(seed)
    out = {}
    for kind in KINDS:
        rows = np.flatnonzero(masks[kind])
        take = rng.choice(rows, size=min(per_kind, len(rows)), replace=False) if len(rows) else rows
        out[kind] = np.sort(take)
    return out


def colour_map(cam: np.ndarray) -> np.ndarray:
    """[0, 1] heatmap -> (H, W, 3) uint8 with matplotlib's jet."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Greyscale uint8 radiograph with the heatmap blended on top, (H, W, 3) uint8."""
    grey = np.repeat(image[..., None].astype(float), 3, axis=2)
    return ((1 - alpha) * grey + alpha * colour_map(cam)).astype(np.uint8)


def overlay_image(image: np.ndarray, cam: np.ndarray) -> "Image.Image":
    from PIL import Image

    return Image.fromarray(overlay(image, cam))


def grid_figure(images: np.ndarray, cams: np.ndarray, titles: list[str], heading: str,
                columns: int = 4) -> "Figure":
    """A grid of overlays with a title per image (e.g. the case's path and probability)."""
    from matplotlib.figure import Figure

    n = max(1, len(images))
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(2.6 * columns, 2.8 * rows + 0.4), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, cam, title in zip(axes, images, cams, titles):
        ax.imshow(overlay(img, cam))
        ax.set_title(title, fontsize=7)
    if not len(images):
        axes[0].text(0.5, 0.5, "no cases", ha="center", va="center")
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    return fig


def case_grids(model: "ChexNet", images: np.ndarray, paths: list[str], y_true: np.ndarray,
               y_prob: np.ndarray, target: int, target_name: str, threshold: float,
               per_kind: int = 4, seed: int = 0, device: "torch.device | str" = "cpu",
               coding: "OutputCoding | None" = None) -> dict[str, "Figure"]:
    """{'TP'|'FN'|'FP': Figure}: Grad-CAM grids of a seeded sample of each kind of case."""
    cases = select_cases(y_true, y_prob, threshold, per_kind, seed)
    figures = {}
    for kind, rows in cases.items():
        cams = gradcam(model, images[rows], target, device, coding=coding)
        titles = [f"{'/'.join(paths[r].split('/')[-3:-1])}\np={y_prob[r]:.2f}" for r in rows]
        figures[kind] = grid_figure(images[rows], cams, titles,
                                    f"{target_name}: {kind} ({len(rows)} of the sample)")
    return figures
