"""The typed config: one frozen dataclass per params.yaml section, with the field's default,
its unit and its allowed values in a comment. The rules that check values live in rules.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

from chexops.errors import ChexopsError

OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
UNCERTAINTY_POLICIES = ("ignore", "zeros", "ones", "multiclass", "selftrained")
LOSSES = ("bce", "auc_margin")   # train.loss / rounds.rK.loss
PESG_MODES = ("sgd", "adam")
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
    test_patients: int = 2000          # the held-out test cohort (0: none); one study each
    test_seed: int = 7                 # the test cohort's own seed: nothing else draws from it


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
    # U-SelfTrained's teacher (weights path or MLflow URI) and its label kind
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
    """The LR range test behind `lr: auto` (fastai's lr_find)."""
    start: float = 1e-7            # first LR tried
    end: float = 10.0              # last LR tried
    num: int = 100                 # LR steps (one batch each) at most
    fallback: float | None = None  # LR used when the test diverges at once; null = error


@dataclass(frozen=True)
class AUCMarginConfig:
    """A round with loss auc_margin: LibAUC's AUC-margin loss (AUCMLoss) and its PESG optimizer
    (Yuan et al., "Large-scale Robust Deep AUC Maximization", ICCV 2021); the names and defaults
    are libauc 1.3's AUCMLoss / PESG arguments."""
    margin: float = 1.0            # AUCMLoss margin m of the squared-hinge surrogate, > 0
    lr: float | None = 0.1         # PESG peak LR (one-cycle); null: the round's lr (a range's hi)
    mode: str = "sgd"              # PESG mode: sgd | adam
    momentum: float = 0.9          # PESG sgd momentum, within [0, 1)
    weight_decay: float = 1.0e-5   # PESG L2 penalty, >= 0
    epoch_decay: float = 2.0e-3    # PESG epoch-level L2 pull toward the reference weights, >= 0


@dataclass(frozen=True)
class TrainConfig:
    image_size: int = 64
    batch_size: Union[int, str] = 16     # int or "auto"
    wd: float = 1e-2
    pct_start: float = 0.3
    div: float = 25.0
    final_div: float = 1e4
    moms: tuple[float, float] = (0.95, 0.85)
    pos_weight: float | None = None      # None, or > 0 (BCE rounds only)
    loss: str = "bce"                    # bce | auc_margin (needs `pip install -e '.[auc]'`)
    auc_margin: AUCMarginConfig = field(default_factory=AUCMarginConfig)
    max_batches: int = 0                 # 0 = whole epoch; >0 caps batches per epoch (tests)
    # epoch 0: a round first scores the weights it starts from and hands them on unless an epoch
    # beats them (never lose the best); false: the seed study's behaviour, each round's best epoch
    score_start: bool = True
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
    loss: str | None = None        # bce | auc_margin; None -> train.loss


@dataclass(frozen=True)
class EvaluateConfig:
    threshold: float = 0.5         # within (0, 1)
    target_sensitivity: float = 0.9  # within (0, 1)
    bootstrap: int = 1000          # resamples for the CIs, >= 1000
    tta: int = 0
    # study-level metrics, Grad-CAM sample, model registry
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


TUNE_SAMPLERS = ("tpe", "random")
TUNE_PRUNERS = ("median", "none")
TUNE_DIRECTIONS = ("maximize", "minimize")
TUNE_STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
# params a search must not touch: how to run, where to log, the search itself (no result changes)
TUNE_FORBIDDEN = ("runtime", "tracking", "tune")


@dataclass(frozen=True)
class TuneDistribution:
    """One searched param's distribution: exactly one field set (Optuna's suggest_float,
    suggest_int and suggest_categorical; log spaces need lo > 0)."""
    uniform: tuple[float, float] | None = None        # [lo, hi], lo < hi
    log_uniform: tuple[float, float] | None = None    # [lo, hi], 0 < lo < hi
    integer: tuple[int, int] | None = None            # [lo, hi] whole numbers, lo < hi
    log_integer: tuple[int, int] | None = None        # [lo, hi] whole numbers, 0 < lo < hi
    choice: tuple[Union[bool, int, float, str, None], ...] | None = None  # 2+ distinct values


@dataclass(frozen=True)
class TuneSampler:
    kind: str = "tpe"              # tpe | random
    seed: int | None = None        # null: the top-level `seed`
    startup_trials: int = 10       # TPE: random trials before it models the results


@dataclass(frozen=True)
class TunePruner:
    """Stops a trial after a round whose best validation AUROC falls below the median of the
    finished trials' at that round (Optuna's MedianPruner)."""
    kind: str = "median"           # median | none
    startup_trials: int = 2        # finished trials before any pruning
    warmup_rounds: int = 0         # no pruning on a round number below this


@dataclass(frozen=True)
class TuneConfig:
    """`chexops tune`: not a DVC dependency of any stage (it never changes a result)."""
    study: str = "chexops"                  # default study name (git-ref safe: names experiments)
    storage: str = "sqlite:///optuna.db"    # Optuna storage URL; relative sqlite: main repo root
    metric: str = "auto"                    # validation metric of evaluate: <target>.<key> | mean.<key>
    direction: str = "maximize"             # maximize | minimize
    sampler: TuneSampler = field(default_factory=TuneSampler)
    pruner: TunePruner = field(default_factory=TunePruner)
    keep_pruned: bool = False               # keep a pruned trial's DVC experiment (its rounds so far)
    heartbeat_s: int = 30                   # a trial whose worker is silent for 2x this is failed
    space: dict[str, TuneDistribution] = field(default_factory=dict)  # dotted param -> distribution


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
    tune: TuneConfig = field(default_factory=TuneConfig)

    def round(self, k: int) -> RoundConfig:
        """Round k (1-based); round 1's lr defaults to the top-level `lr`, every round's loss
        to `train.loss`."""
        cfg = self.rounds[f"r{k}"]
        if k == 1 and cfg.lr is None:
            cfg = dataclasses.replace(cfg, lr=self.lr)
        if cfg.loss is None:
            cfg = dataclasses.replace(cfg, loss=self.train.loss)
        return cfg

    def uncertainty_policy(self, observation: str) -> str:
        return self.clean.uncertainty.get(observation, self.clean.default_uncertainty)



MIN_SYNTHETIC_SIDE = 16
TEST_FIRST_PATIENT = 64741   # CheXpert numbers its test patients from patient64741
HELDOUT_KEY = "test"         # metrics/evaluate.json: <target>.test holds the held-out cohort's
MIN_BOOTSTRAP = 1000
AUGMENT_PRESETS = ("none", "lighting", "light", "custom")
AUGMENT_FIELDS = ("brightness", "contrast", "rotate_deg", "translate", "scale", "hflip")
# The largest sane half-width of each draw: beyond these a chest film is no longer a chest film
# (contrast 1 flattens it to grey, scale 1 zooms to a point, translate 0.5 shifts half of it out).
AUGMENT_BOUNDS = {"brightness": 0.5, "contrast": 0.5, "rotate_deg": 30.0, "translate": 0.25,
                  "scale": 0.5}


