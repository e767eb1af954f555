"""Every rule about params values (the `tune:` search's in its sibling tune_rules): each failed
rule is a ConfigError that names the key and the fix. Stages and commands trust a validated
Params and never re-check it."""
from __future__ import annotations

from typing import Any

from chexops.config.schema import (
    AUGMENT_BOUNDS,
    AUGMENT_FIELDS,
    AUGMENT_PRESETS,
    LOSSES,
    MIN_BOOTSTRAP,
    MIN_SYNTHETIC_SIDE,
    N_ROUNDS,
    OBSERVATIONS,
    PESG_MODES,
    TEST_FIRST_PATIENT,
    UNCERTAINTY_POLICIES,
    ConfigError,
    DataConfig,
    Params,
)
from chexops.redact import redact_url


def need(ok: bool, msg: str) -> None:
    """A rule: raise ConfigError(msg) unless it holds."""
    if not ok:
        raise ConfigError(msg)


def validate(p: Params) -> None:
    """Check every section of a built Params; the first broken rule raises ConfigError."""
    need(len(p.targets) > 0, "targets: name at least one observation, e.g. [Cardiomegaly]")
    for t in p.targets:
        need(t in OBSERVATIONS, f"targets: unknown observation {t!r}; "
                                f"choose from {', '.join(OBSERVATIONS)}")
    need(p.lr > 0, f"lr: must be > 0, got {p.lr}")
    need(p.seed >= 0, f"seed: {p.seed} must be >= 0")
    _validate_clean(p, need)
    _validate_data(p.data, need)
    _validate_recipe(p, need)
    _validate_model(p, need)
    _validate_runtime(p, need)
    _validate_rounds(p, need)
    _validate_loss(p, need)
    need(not _has_password(p.tune.storage),
         f"tune.storage: {redact_url(p.tune.storage)} holds a password, which would be stored in "
         f"git and logged with the params; put it in ~/.pgpass or PGPASSWORD (docs/TEAM.md)")


def _has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return bool(urlsplit(url).password)
    except ValueError:  # not a URL at all: validate_tune says so
        return False


def _validate_clean(p: Params, need: Any) -> None:
    """Uncertainty policies, view and sex filters, the bad-image budget."""
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


def _validate_model(p: Params, need: Any) -> None:
    """Resampling, the head, dropout, batch and image size."""
    need(p.resample.strategy in ("none", "oversample", "undersample"),
         f"resample.strategy: {p.resample.strategy!r} must be none, oversample or undersample")
    need(0 < p.resample.fraction <= 1, "resample.fraction: must be within (0, 1]")
    need(p.model.head in ("fastai", "timm"), f"model.head: {p.model.head!r} must be fastai or timm")
    need(0 <= p.model.ps < 1, "model.ps: dropout must be within [0, 1)")
    bs = p.train.batch_size
    need(bs == "auto" or (isinstance(bs, int) and bs > 0),
         f"train.batch_size: {bs!r} must be a positive whole number or auto")
    need(p.train.image_size >= 32, "train.image_size: must be at least 32 pixels")


def _validate_runtime(p: Params, need: Any) -> None:
    """Threads, workers, precision, memory format and the launcher."""
    need(p.runtime.threads >= 0 and p.runtime.workers >= 0,
         "runtime.threads and runtime.workers: must be >= 0")
    need(p.runtime.amp in ("auto", "off", "bf16"),
         f"runtime.amp: {p.runtime.amp!r} must be auto, off or bf16 "
         f"(fp16 needs loss scaling, not supported)")
    need(p.runtime.channels_last in ("auto", "on", "off"),
         f"runtime.channels_last: {p.runtime.channels_last!r} must be auto, on or off")
    need(p.runtime.distributed in ("off", "torchrun"),
         f"runtime.distributed: {p.runtime.distributed!r} must be off or torchrun")


def _validate_rounds(p: Params, need: Any) -> None:
    """Exactly r1..r5, each with epochs and a learning rate (a number, [lo, hi] or auto)."""
    expected = {f"r{k}" for k in range(1, N_ROUNDS + 1)}
    need(set(p.rounds) == expected,
         f"rounds: define exactly {', '.join(sorted(expected))}; "
         f"got {', '.join(sorted(p.rounds)) or 'none'}")
    for name, r in p.rounds.items():
        need(r.epochs >= 1, f"rounds.{name}.epochs: must be >= 1")
        lr = r.lr
        if isinstance(lr, str):
            need(lr == "auto", f"rounds.{name}.lr: {lr!r} must be a number, [lo, hi] or auto")
        elif isinstance(lr, tuple):
            need(0 < lr[0] <= lr[1],
                 f"rounds.{name}.lr: range [lo, hi] needs 0 < lo <= hi, got {list(lr)}")
        elif lr is not None:
            need(lr > 0, f"rounds.{name}.lr: must be > 0, got {lr}")
        else:
            need(name == "r1", f"rounds.{name}.lr: set a learning rate "
                               f"(only r1 may inherit the top-level lr)")


def _validate_loss(p: Params, need: Any) -> None:
    """train.loss and rounds.rK.loss name a known loss; AUC margin needs one score per target
    (not U-MultiClass's 3-way softmax) and sane PESG params (libauc 1.3's ranges)."""
    named = [("train.loss", p.train.loss)] + [(f"rounds.{n}.loss", r.loss)
                                             for n, r in sorted(p.rounds.items()) if r.loss]
    for key, loss in named:
        need(loss in LOSSES, f"{key}: unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    auc = [key for key, loss in named if loss == "auc_margin"
           if key != "train.loss" or any(r.loss is None for r in p.rounds.values())]
    multiclass = [t for t in p.targets if p.uncertainty_policy(t) == "multiclass"]
    need(not (auc and multiclass),
         f"{auc[0] if auc else ''}: auc_margin needs one score per target, but "
         f"{multiclass[0] if multiclass else ''} is multiclass (U-MultiClass, a 3-way softmax); "
         f"use bce or another clean.uncertainty policy")
    a = p.train.auc_margin
    need(a.margin > 0, f"train.auc_margin.margin: {a.margin} must be > 0")
    need(a.lr is None or a.lr > 0, f"train.auc_margin.lr: {a.lr} must be > 0 (or null)")
    need(a.mode in PESG_MODES, f"train.auc_margin.mode: {a.mode!r} must be sgd or adam")
    need(0 <= a.momentum < 1, f"train.auc_margin.momentum: {a.momentum} must be within [0, 1)")
    for name in ("weight_decay", "epoch_decay"):
        need(getattr(a, name) >= 0, f"train.auc_margin.{name}: {getattr(a, name)} must be >= 0")


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
    need(s.test_seed >= 0, f"data.synthetic.test_seed: {s.test_seed} must be >= 0")
    need(s.test_patients >= 0, f"data.synthetic.test_patients: {s.test_patients} must be >= 0 "
                               f"(0: no held-out test cohort)")
    need(s.train_patients + s.valid_patients < TEST_FIRST_PATIENT,
         f"data.synthetic: train_patients + valid_patients = {s.train_patients + s.valid_patients}"
         f" must stay below {TEST_FIRST_PATIENT}, where the test cohort's patient ids start")


def _validate_recipe(p: Params, need: Any) -> None:
    """The training recipe: augmentation menu, LR finder, U-SelfTrained's teacher, TTA."""
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
