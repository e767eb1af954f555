"""Procedural chest-radiograph phantoms: one image from a latent state, vectorised numpy.

Coordinates are normalised: u in [-1, 1] across the width (image left = patient right),
v in [0, 1] down the height. Brightness is density (bone and heart bright, air-filled lungs
dark), as on a radiograph. Every random choice comes from the `rng` passed in, so an image is
a pure function of (state, seed). Speed matters (>= 100 images/s per core at 320 x 384): each
drawing step is one array expression, and small features touch only the rows they cover.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

AP_HEART_MAGNIFICATION = 1.12   # portable AP films enlarge the heart ~10-15 %
SOFT_TISSUE = 0.50
LUNG_DARKNESS = 0.36
HEART_EXTRA = 0.10              # heart a little brighter than soft tissue: clear against lungs


@dataclass(frozen=True)
class ViewState:
    """Everything one image shows; the image's own pose and noise come from its seed."""
    view: str                    # "frontal" | "lateral"
    ap: bool                     # portable AP (frontal only)
    ctr: float                   # true cardiothoracic ratio of the study
    thorax: float                # thorax half-width, normalised (~0.78)
    effusion: float              # fluid height, 0 = none
    effusion_side: int           # -1 image left, 1 image right, 0 both
    edema: float                 # perihilar haze strength, 0 = none
    devices: int                 # bit mask: 1 tube, 2 central line, 4 ECG leads, 8 pacemaker
    age: float
    female: bool


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    u = (np.arange(w, dtype=np.float32) + 0.5) / (w / 2) - 1
    v = (np.arange(h, dtype=np.float32) + 0.5) / h
    return np.broadcast_to(u, (h, w)), np.broadcast_to(v[:, None], (h, w))


def _soft(x: np.ndarray, edge: float) -> np.ndarray:
    """0 -> 1 ramp of width `edge` around x = 0 (soft, anti-aliased borders)."""
    return np.clip(x / edge + 0.5, 0.0, 1.0)


def _pose(h: int, w: int, rng: np.random.Generator, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pose: small rotation, scale and shift of the sampling grid."""
    u0, v0 = _grid(h, w)
    theta = rng.normal(0, 0.025 * jitter)
    scale = 1 + rng.normal(0, 0.03 * jitter)
    du, dv = rng.normal(0, 0.03 * jitter), rng.normal(0, 0.015 * jitter)
    aspect = h / w
    uc, vc = u0 - du, (v0 - 0.5 - dv) * 2 * aspect
    u = (np.cos(theta) * uc - np.sin(theta) * vc) / scale
    v = (np.sin(theta) * uc + np.cos(theta) * vc) / scale / (2 * aspect) + 0.5
    return u.astype(np.float32), v.astype(np.float32)


def _ellipse(u, v, cu, cv, a, b, edge=0.06) -> np.ndarray:
    return _soft(1 - ((u - cu) / a) ** 2 - ((v - cv) / b) ** 2, edge)


def _dome(u: np.ndarray, s: ViewState) -> np.ndarray:
    """Diaphragm: two domes, the right hemidiaphragm (image left) a little higher."""
    x = np.abs(u) / s.thorax
    base = 0.74 + np.where(u < 0, -0.02, 0.0)
    return base - 0.06 * np.clip(1 - ((x - 0.5) / 0.5) ** 2, 0, 1)


def frontal(s: ViewState, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _pose(h, w, rng, 1.5 if s.ap else 1.0)
    au, t = np.abs(u), s.thorax
    body_w = 0.24 + (t + 0.16 - 0.24) * np.clip((v - 0.06) / 0.12, 0, 1)
    img = SOFT_TISSUE * _soft(body_w - au, 0.04) * _soft(v - 0.02, 0.02)
    dome = _dome(u, s)
    lungs = (_ellipse(au, v, 0.52 * t, 0.45, 0.42 * t, 0.33) * _soft(dome - v, 0.015))
    heart = _heart(u, v, s, dome)
    medi = _soft(0.10 * t - np.abs(u - 0.01), 0.02) * _soft(v - 0.08, 0.03)
    knob = _ellipse(u, v, 0.12 * t, 0.28, 0.07 * t, 0.035)
    solid = np.maximum(np.maximum(heart, medi), knob)
    lungs = lungs * (1 - solid)
    img -= LUNG_DARKNESS * lungs * (1 - _effusion(u, v, s, dome))
    img += HEART_EXTRA * heart
    img += _edema(au, v, s) * lungs
    img += _bones_frontal(u, au, v, s, dome)
    _devices_frontal(img, u, v, s, rng)
    return img


def _heart(u: np.ndarray, v: np.ndarray, s: ViewState, dome: np.ndarray) -> np.ndarray:
    """Heart silhouette whose width / thorax width is the (apparent) CTR; 1/3 right of midline."""
    ctr = s.ctr * (AP_HEART_MAGNIFICATION if s.ap else 1.0)
    hw = ctr * s.thorax                        # half of heart width; thorax width = 2 * thorax
    cu, cv = hw / 3, 0.63
    hh = 0.04 + 0.22 * hw
    return _ellipse(u, v, cu, cv, hw, hh, 0.05) * _soft(dome + 0.02 - v, 0.02)


def _effusion(u, v, s: ViewState, dome) -> np.ndarray | float:
    """Fluid in the costophrenic angles: a basal opacity with a meniscus rising laterally."""
    if s.effusion <= 0:
        return 0.0
    level = dome - s.effusion - 0.10 * np.clip(np.abs(u) / s.thorax - 0.5, 0, 1)
    fluid = _soft(v - level, 0.03) * 0.85
    if s.effusion_side:
        fluid = fluid * (np.sign(u) == s.effusion_side)
    return fluid


def _edema(au, v, s: ViewState) -> np.ndarray | float:
    """Perihilar haze, bilateral ("bat wing")."""
    if s.edema <= 0:
        return 0.0
    r2 = ((au - 0.28 * s.thorax) / 0.22) ** 2 + ((v - 0.45) / 0.16) ** 2
    return (0.22 * s.edema) * np.exp(-r2)


def _bones_frontal(u, au, v, s: ViewState, dome) -> np.ndarray:
    t = s.thorax
    x = au / t
    cage = _soft(1.0 - x, 0.04) * _soft(v - 0.10, 0.02) * _soft(dome + 0.03 - v, 0.03)
    phase = (v - 0.10 - 0.16 * x ** 2) / 0.072     # posterior ribs curve down laterally
    ribs = np.clip(1 - np.abs((phase - np.floor(phase)) - 0.5) / 0.22, 0, 1) * (x > 0.08)
    spine = _soft(0.065 - np.abs(u), 0.02) * (0.75 + 0.25 * np.cos(v * 120.0))
    clav = np.clip(1 - np.abs(v - (0.16 - 0.07 * x)) / 0.014, 0, 1) * (x > 0.05) * (x < 0.8)
    bone = 0.05 - 0.01 * (s.age > 70)   # older bones a little less dense
    return bone * (1.6 * ribs * cage + 1.8 * spine + 2.6 * clav)


def _line(img, u, v, rows: slice, path_u: np.ndarray, half: float, value: float) -> None:
    """A thin bright tube following path_u (one u per row of `rows`)."""
    uu = u[rows]
    img[rows] += value * np.clip(1 - np.abs(uu - path_u[:, None]) / half, 0, 1)


def _devices_frontal(img, u, v, s: ViewState, rng: np.random.Generator) -> None:
    h, w = img.shape
    if s.devices & 1:                      # endotracheal tube down the midline
        rows = slice(0, int(0.27 * h))
        _line(img, u, v, rows, np.full(rows.stop, rng.normal(0.0, 0.02), np.float32), 0.012, 0.35)
    if s.devices & 2:                      # central line from the shoulder toward the heart
        rows = slice(int(0.12 * h), int(0.42 * h))
        side = rng.choice([-1.0, 1.0])
        vv = v[rows, w // 2]
        path = side * (0.05 + 0.55 * np.clip((0.40 - vv) / 0.28, 0, 1) ** 1.5)
        _line(img, u, v, rows, path.astype(np.float32), 0.008, 0.45)
    if s.devices & 4:                      # ECG electrodes
        for _ in range(int(rng.integers(2, 5))):
            cu, cv = rng.uniform(-0.7, 0.7), rng.uniform(0.2, 0.7)
            rows = slice(max(0, int((cv - 0.04) * h)), int((cv + 0.04) * h))
            img[rows] += 0.5 * _ellipse(u[rows], v[rows], cu, cv, 0.035, 0.025, 0.2)
    if s.devices & 8:                      # pacemaker box
        cu, cv = rng.uniform(-0.6, -0.4), rng.uniform(0.14, 0.2)
        rows = slice(max(0, int((cv - 0.05) * h)), int((cv + 0.05) * h))
        box = _soft(0.09 - np.abs(u[rows] - cu), 0.01) * _soft(0.035 - np.abs(v[rows] - cv), 0.01)
        img[rows] += 0.6 * box


def lateral(s: ViewState, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Lateral view: patient facing image left, spine on the right, heart anterior-inferior."""
    u, v = _pose(h, w, rng, 1.0)
    img = SOFT_TISSUE * _ellipse(u, v, 0.0, 0.55, 0.86, 0.62, 0.05) * _soft(v - 0.02, 0.02)
    dome = 0.76 - 0.06 * np.clip(1 - (u / 0.6) ** 2, 0, 1)
    lungs = _ellipse(u, v, 0.02, 0.45, 0.62, 0.36) * _soft(dome - v, 0.015)
    ctr = s.ctr
    heart = _ellipse(u, v, -0.30 + 0.2 * (ctr - 0.45), 0.60, 0.70 * ctr, 0.32 * ctr / 0.45 * 0.5)
    heart *= _soft(dome + 0.02 - v, 0.02)
    lungs *= 1 - heart
    fluid: np.ndarray | float = 0.0
    if s.effusion > 0:                     # posterior costophrenic sulcus fills first
        fluid = _soft(v - (dome - s.effusion - 0.15 * np.clip(u - 0.2, 0, 1)), 0.03) * 0.85
    img -= LUNG_DARKNESS * lungs * (1 - fluid)
    img += HEART_EXTRA * heart + _edema(np.abs(u), v, s) * lungs
    spine = _soft(0.09 - np.abs(u - 0.62), 0.02) * (0.7 + 0.3 * np.cos(v * 110.0))
    sternum = _soft(0.025 - np.abs(u + 0.66 + 0.1 * (v - 0.4)), 0.01) * (v > 0.12) * (v < 0.55)
    img += 0.12 * spine + 0.10 * sternum
    if s.devices & 3:
        rows = slice(0, int(0.3 * h))
        _line(img, u, v, rows, np.full(rows.stop, -0.25, np.float32), 0.012, 0.3)
    return img


def finish(img: np.ndarray, ap: bool, rng: np.random.Generator) -> np.ndarray:
    """Exposure, contrast and quantum noise (AP portable films are noisier) -> uint8."""
    gain = rng.uniform(0.85, 1.15)
    gamma = rng.uniform(0.8, 1.2)
    offset = rng.uniform(0.0, 0.08)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * (0.045 if ap else 0.022)
    out = np.clip(img * gain + offset, 0, 1) ** gamma + noise
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def render(s: ViewState, h: int, w: int, seed: tuple[int, ...]) -> np.ndarray:
    """The image as uint8 (h, w). Anatomy is smooth, so it is drawn at half resolution and
    upsampled (4x less work); noise is added at full resolution."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
    hh, hw = (h + 1) // 2, (w + 1) // 2
    img = frontal(s, hh, hw, rng) if s.view == "frontal" else lateral(s, hh, hw, rng)
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
    return finish(img, s.ap, rng)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
