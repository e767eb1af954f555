"""params.yaml -> typed, validated dataclasses.

One typed config for every stage. Unknown keys are errors (a typo in params.yaml
must not silently fall back to a default), and every error names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from chexops.errors import ChexopsError
from chexops.redact import redact_url

OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
UNCERTAINTY_POLICIES = ("ignore", "zeros", "ones", "multiclass", "selftrained")
N_ROUNDS = 5


class ConfigError(ChexopsError, ValueError):
    """A params.yaml problem; the message names the key and the fix."""


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    threads: int = 2              # torch intra-op threads; 0 keeps torch's default
    workers: int = 0              # DataLoader worker processes
    deterministic: bool = False   # torch.use_deterministic_algorithms
    amp: str = "auto"             # auto | off | bf16 (auto: bf16 on CUDA where supported, off on CPU)
    channels_last: str = "auto"   # auto | on | off (auto: on for CUDA)
    compile: bool = False         # torch.compile; slow to compile on CPU, off by default
    distributed: str = "off"      # off | torchrun
    nproc_per_node: int = 1       # processes per node when distributed == torchrun


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 42                     # the generator's own seed (not the training `seed`)
    train_patients: int = 600
    valid_patients: int = 70
    studies_per_patient: float = 1.6   # mean, >= 1
    lateral_fraction: float = 0.15     # share of studies that also have a lateral view
    width: int = 320
    height: int = 384
    jpeg_quality: int = 90
    workers: int = 2                   # render processes; does not change the output


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"      # synthetic | url | a local CheXpert directory or .zip
    url_env: str = "CHEXPERT_URL"  # environment variable holding the (signed) URL
    sha256: str = ""               # optional checksum of the downloaded zip (64 hex digits)
    retries: int = 4               # attempts in all for transient failures (0 counts as 1)
    timeout_s: float = 60.0        # seconds to connect, and between bytes received
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class CleanConfig:
    uncertainty: dict[str, str] = field(default_factory=dict)  # per observation
    default_uncertainty: str = "zeros"
    views: str = "all"             # all | frontal | ap | pa
    sex: str = "all"               # all | male | female
    age_min: float | None = None
    age_max: float | None = None
    max_bad_fraction: float = 0.01
    image_check: str = "header"    # header: fast marker check | full: decode every image (finds truncation)
    # issue 5: U-SelfTrained's teacher (weights path or MLflow URI) and its label kind
    teacher: str | None = None     # path/to/best.safetensors | runs:/<id>/... | models:/<name>@<alias>
    teacher_labels: str = "soft"   # soft: teacher probabilities | hard: thresholded at 0.5


@dataclass(frozen=True)
class ResampleConfig:
    strategy: str = "oversample"   # none | oversample | undersample
    fraction: float = 1.0          # keep this share after resampling


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "densenet121"
    pretrained: Union[bool, str] = False  # False | True (timm hub/cache) | path to weights
    head: str = "fastai"           # fastai | timm
    ps: float = 0.5
    hidden: int = 512
    bn_final: bool = True


@dataclass(frozen=True)
class AugmentConfig:
    """Half-widths of the random draws; bounds in AUGMENT_BOUNDS (checked by _validate_recipe)."""
    preset: str = "none"           # none | lighting | light | custom
    brightness: float = 0.0        # +- shift of [0, 1] intensities, 0..0.5
    contrast: float = 0.0          # factor 1 +- this, 0..0.5
    rotate_deg: float = 0.0        # +- degrees, 0..30
    translate: float = 0.0         # +- fraction of the image side, 0..0.25
    scale: float = 0.0             # zoom 1 +- this, 0..0.5
    hflip: bool = False


@dataclass(frozen=True)
class LRFindConfig:
    """The LR range test behind `lr: auto` (issue 5)."""
    start: float = 1e-7            # first LR tried
    end: float = 10.0              # last LR tried
    num: int = 100                 # LR steps (one batch each) at most
    fallback: float | None = None  # LR used when the test diverges at once; null = error


@dataclass(frozen=True)
class TrainConfig:
    image_size: int = 64
    batch_size: Union[int, str] = 16     # int or "auto"
    wd: float = 1e-2
    pct_start: float = 0.3
    div: float = 25.0
    final_div: float = 1e4
    moms: tuple[float, float] = (0.95, 0.85)
    pos_weight: float | None = None      # None, or > 0
    max_batches: int = 0                 # 0 = whole epoch; >0 caps batches per epoch (tests)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)


@dataclass(frozen=True)
class ResampleDraw:
    """A fresh sample drawn by a round (the seed study's rounds 3 and 4)."""
    seed: int = 0
    size: int = 0                  # rows to draw after resampling; 0 = all


@dataclass(frozen=True)
class RoundConfig:
    epochs: int = 1
    lr: Union[float, tuple[float, float], str, None] = None  # None -> top-level lr (round 1)
    freeze: bool = False
    resample: ResampleDraw | None = None


@dataclass(frozen=True)
class EvaluateConfig:
    threshold: float = 0.5         # within (0, 1)
    target_sensitivity: float = 0.9  # within (0, 1)
    bootstrap: int = 1000          # resamples for the CIs, >= 1000
    tta: int = 0
    # issue 6: study-level metrics, Grad-CAM sample, model registry
    per_study: bool = False        # also report per-study metrics (max over a study's views)
    gradcam_per_kind: int = 4      # Grad-CAM sample size per kind (TP, FN, FP); 0 = none
    register: bool = True          # log the final model to MLflow and register it
    model_name: str = "chexops-cardiomegaly"
    champion: bool = False         # point the alias `champion` at the newly registered version


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "chexops"
    store: str = "mlflow.db"        # embedded SQLite file, relative to the repo root
    artifacts: str = "mlartifacts"  # embedded artifact folder, relative to the repo root


@dataclass(frozen=True)
class Params:
    seed: int = 42
    lr: float = 3e-3
    targets: tuple[str, ...] = ("Cardiomegaly",)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rounds: dict[str, RoundConfig] = field(default_factory=dict)  # keys r1..r5
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def round(self, k: int) -> RoundConfig:
        """Round k (1-based); round 1's lr defaults to the top-level `lr`."""
        cfg = self.rounds[f"r{k}"]
        if k == 1 and cfg.lr is None:
            cfg = dataclasses.replace(cfg, lr=self.lr)
        return cfg

    def uncertainty_policy(self, observation: str) -> str:
        return self.clean.uncertainty.get(observation, self.clean.default_uncertainty)


# ---------------------------------------------------------------- building

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors: dict[Any, ConfigError] = {}
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors[typing.get_origin(option) or option] = exc
        # a list that fails as a tuple (or a mapping as a section) has the telling message
        if isinstance(value, (list, tuple)) and tuple in errors:
            raise errors[tuple]
        if isinstance(value, dict):
            for option, exc in errors.items():
                if dataclasses.is_dataclass(option):
                    raise exc
        raise ConfigError(f"{key}: {value!r} is not any of "
                          f"{', '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} must be one of {typing.get_args(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vtype = typing.get_args(tp)
        return {str(k): _coerce(v, vtype, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} in params.yaml; "
                          f"known keys here: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
              for name in names if name in raw}
    return cls(**kwargs)


def _validate(p: Params) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(len(p.targets) > 0, "targets: name at least one observation, e.g. [Cardiomegaly]")
    for t in p.targets:
        need(t in OBSERVATIONS, f"targets: unknown observation {t!r}; "
                                f"choose from {', '.join(OBSERVATIONS)}")
    need(p.lr > 0, f"lr: must be > 0, got {p.lr}")
    for obs, pol in {**p.clean.uncertainty, "default": p.clean.default_uncertainty}.items():
        need(obs == "default" or obs in OBSERVATIONS,
             f"clean.uncertainty: unknown observation {obs!r}")
        need(pol in UNCERTAINTY_POLICIES,
             f"clean.uncertainty.{obs}: unknown policy {pol!r}; "
             f"choose from {', '.join(UNCERTAINTY_POLICIES)}")
    need(p.clean.views in ("all", "frontal", "ap", "pa"),
         f"clean.views: {p.clean.views!r} must be all, frontal, ap or pa")
    need(p.clean.sex in ("all", "male", "female"),
         f"clean.sex: {p.clean.sex!r} must be all, male or female")
    need(0 <= p.clean.max_bad_fraction <= 1, "clean.max_bad_fraction: must be within [0, 1]")
    need(p.clean.image_check in ("header", "full"),
         f"clean.image_check: {p.clean.image_check!r} must be header or full")
    need(p.seed >= 0, f"seed: {p.seed} must be >= 0")
    _validate_data(p.data, need)
    _validate_recipe(p, need)
    need(p.resample.strategy in ("none", "oversample", "undersample"),
         f"resample.strategy: {p.resample.strategy!r} must be none, oversample or undersample")
    need(0 < p.resample.fraction <= 1, "resample.fraction: must be within (0, 1]")
    need(p.model.head in ("fastai", "timm"), f"model.head: {p.model.head!r} must be fastai or timm")
    need(0 <= p.model.ps < 1, "model.ps: dropout must be within [0, 1)")
    bs = p.train.batch_size
    need(bs == "auto" or (isinstance(bs, int) and bs > 0),
         f"train.batch_size: {bs!r} must be a positive whole number or auto")
    need(p.train.image_size >= 32, "train.image_size: must be at least 32 pixels")
    need(p.runtime.threads >= 0 and p.runtime.workers >= 0,
         "runtime.threads and runtime.workers: must be >= 0")
    need(p.runtime.amp in ("auto", "off", "bf16"),
         f"runtime.amp: {p.runtime.amp!r} must be auto, off or bf16 (fp16 needs loss scaling, not supported)")
    need(p.runtime.distributed in ("off", "torchrun"),
         f"runtime.distributed: {p.runtime.distributed!r} must be off or torchrun")
    expected = {f"r{k}" for k in range(1, N_ROUNDS + 1)}
    need(set(p.rounds) == expected,
         f"rounds: define exactly {', '.join(sorted(expected))}; got {', '.join(sorted(p.rounds)) or 'none'}")
    for name, r in p.rounds.items():
        need(r.epochs >= 1, f"rounds.{name}.epochs: must be >= 1")
        lr = r.lr
        if isinstance(lr, str):
            need(lr == "auto", f"rounds.{name}.lr: {lr!r} must be a number, [lo, hi] or auto")
        elif isinstance(lr, tuple):
            need(0 < lr[0] <= lr[1], f"rounds.{name}.lr: range [lo, hi] needs 0 < lo <= hi, got {list(lr)}")
        elif lr is not None:
            need(lr > 0, f"rounds.{name}.lr: must be > 0, got {lr}")
        else:
            need(name == "r1", f"rounds.{name}.lr: set a learning rate "
                               f"(only r1 may inherit the top-level lr)")


def url_in_source_message(source: str, url_env: str) -> str:
    """data.source holds a URL: say where it belongs instead (its query string redacted)."""
    return (f"data.source: a URL ({redact_url(source)}) does not belong in params.yaml (a signed "
            f"link would be stored in git and dvc.lock); export {url_env or 'CHEXPERT_URL'}="
            f"'<the link>' (the variable named by data.url_env) and set data.source: url")


def _validate_data(d: DataConfig, need: Any) -> None:
    """The download section: where the data comes from and the synthetic generator's knobs."""
    need("://" not in d.source, url_in_source_message(d.source, d.url_env))
    need(bool(d.source.strip()), "data.source: empty; use synthetic, url or a local CheXpert folder/.zip")
    need(d.url_env.isidentifier(),
         f"data.url_env: {d.url_env!r} must be an environment variable name, e.g. CHEXPERT_URL")
    sha = d.sha256.strip()
    need(not sha or (len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha)),
         f"data.sha256: {d.sha256!r} is not a sha256 (64 hex digits); "
         f"copy it from `sha256sum` or leave it empty")
    need(d.retries >= 0, f"data.retries: {d.retries} must be >= 0")
    need(d.timeout_s > 0, f"data.timeout_s: {d.timeout_s} must be > 0 seconds")
    s = d.synthetic
    for name in ("train_patients", "valid_patients"):
        need(getattr(s, name) >= 1, f"data.synthetic.{name}: {getattr(s, name)} must be >= 1")
    for name in ("width", "height"):
        need(getattr(s, name) >= MIN_SYNTHETIC_SIDE,
             f"data.synthetic.{name}: {getattr(s, name)} px is too small; use at least "
             f"{MIN_SYNTHETIC_SIDE} (CheXpert-small is about 320 x 390)")
    need(s.studies_per_patient >= 1,
         f"data.synthetic.studies_per_patient: {s.studies_per_patient} is a mean number of "
         f"studies and must be >= 1")
    need(0 <= s.lateral_fraction <= 1,
         f"data.synthetic.lateral_fraction: {s.lateral_fraction} must be within [0, 1]")
    need(1 <= s.jpeg_quality <= 100,
         f"data.synthetic.jpeg_quality: {s.jpeg_quality} must be within 1..100")
    need(s.workers >= 0, f"data.synthetic.workers: {s.workers} must be >= 0")
    need(s.seed >= 0, f"data.synthetic.seed: {s.seed} must be >= 0")


MIN_SYNTHETIC_SIDE = 16
MIN_BOOTSTRAP = 1000
AUGMENT_PRESETS = ("none", "lighting", "light", "custom")
AUGMENT_FIELDS = ("brightness", "contrast", "rotate_deg", "translate", "scale", "hflip")
# The largest sane half-width of each draw: beyond these a chest film is no longer a chest film
# (contrast 1 flattens it to grey, scale 1 zooms to a point, translate 0.5 shifts half of it out).
AUGMENT_BOUNDS = {"brightness": 0.5, "contrast": 0.5, "rotate_deg": 30.0, "translate": 0.25,
                  "scale": 0.5}


def _validate_recipe(p: Params, need: Any) -> None:
    """issue 5: augmentation menu, LR finder, U-SelfTrained's teacher, TTA."""
    aug = p.train.augment
    need(aug.preset in AUGMENT_PRESETS, f"train.augment.preset: unknown preset {aug.preset!r}; "
                                        f"choose from {', '.join(AUGMENT_PRESETS)}")
    for name in AUGMENT_FIELDS:
        need(aug.preset == "custom" or not getattr(aug, name),
             f"train.augment.{name}: set, but preset {aug.preset!r} ignores it; "
             f"set train.augment.preset: custom to use the fields")
    for name, top in AUGMENT_BOUNDS.items():
        value = getattr(aug, name)
        need(0 <= value <= top, f"train.augment.{name}: {value} is outside 0..{top:g}; "
                                f"use a half-width within it (0 = off)")
    need(p.train.pos_weight is None or p.train.pos_weight > 0,
         f"train.pos_weight: {p.train.pos_weight} must be > 0 (or null for no weighting)")
    lf = p.train.lr_find
    need(0 < lf.start < lf.end, f"train.lr_find: needs 0 < start < end, got {lf.start}, {lf.end}")
    need(lf.num >= 10, f"train.lr_find.num: {lf.num} is too few steps; use at least 10")
    need(lf.fallback is None or lf.fallback > 0, "train.lr_find.fallback: must be > 0 or null")
    need(p.clean.teacher_labels in ("soft", "hard"),
         f"clean.teacher_labels: {p.clean.teacher_labels!r} must be soft or hard")
    selftrained = [t for t in p.targets if p.uncertainty_policy(t) == "selftrained"]
    need(not selftrained or bool(p.clean.teacher),
         f"clean.uncertainty.{selftrained[0] if selftrained else ''}: selftrained needs a teacher; "
         f"set clean.teacher to a weights file or an MLflow runs:/ or models:/ URI")
    need(p.evaluate.tta >= 0, f"evaluate.tta: {p.evaluate.tta} must be >= 0 (0 = off)")
    ev = p.evaluate
    need(ev.bootstrap >= MIN_BOOTSTRAP,
         f"evaluate.bootstrap: {ev.bootstrap} resamples give unstable 95 % intervals; "
         f"use at least {MIN_BOOTSTRAP}")
    for name in ("threshold", "target_sensitivity"):
        need(0 < getattr(ev, name) < 1,
             f"evaluate.{name}: {getattr(ev, name)} must be strictly between 0 and 1")


ON_OFF_KEYS = ("amp", "channels_last", "distributed")


def _on_off_text(raw: dict) -> dict:
    """YAML 1.1 (PyYAML) reads a bare on/off as true/false, and `dvc exp run -S` rewrites
    params.yaml with "off" unquoted; map them back to the words these runtime keys take."""
    runtime = raw.get("runtime")
    if not isinstance(runtime, dict):
        return raw
    fixed = {k: ({True: "on", False: "off"}[v] if k in ON_OFF_KEYS and isinstance(v, bool) else v)
             for k, v in runtime.items()}
    return {**raw, "runtime": fixed}


def params_from_dict(raw: dict) -> Params:
    params = _build(Params, _on_off_text(raw), "")
    _validate(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the repository root "
                          f"or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    return params_from_dict(raw)


def to_dict(params: Any) -> Any:
    """Plain dict/list form (for logging the resolved config as is)."""
    if dataclasses.is_dataclass(params):
        return {f.name: to_dict(getattr(params, f.name)) for f in dataclasses.fields(params)}
    if isinstance(params, dict):
        return {k: to_dict(v) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return [to_dict(v) for v in params]
    return params


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form (MLflow params are flat)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d if not isinstance(d, (list, tuple)) else str(list(d))
    return out
