"""The rules of the `tune:` section (chexops tune's search space, objective, sampler, pruner and
storage): checked before any trial trains, each a one-line ConfigError naming the key and the
fix. A sampled value must pass the param's own rules (chexops.config.rules.validate)."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union

import yaml

from chexops.config.coerce import build
from chexops.config.rules import need, validate
from chexops.config.schema import (
    HELDOUT_KEY,
    TUNE_DIRECTIONS,
    TUNE_FORBIDDEN,
    TUNE_PRUNERS,
    TUNE_SAMPLERS,
    TUNE_STORAGE_SCHEMES,
    ConfigError,
    Params,
    TuneDistribution,
)
from chexops.redact import redact_url

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a git ref part: names experiments
DISTRIBUTIONS = tuple(f.name for f in dataclasses.fields(TuneDistribution))


def validate_tune(p: Params) -> None:
    """The search of `chexops tune`: the study's settings, its objective and every searched
    param (see _validate_space). Only that command checks it: a search that no longer fits
    the params (a custom augmentation beside a searched preset) stops the search, never the
    pipeline."""
    t = p.tune
    need(bool(STUDY_NAME.fullmatch(t.study)),
         f"tune.study: {t.study!r} must be 1-64 letters, digits, '-' or '_' starting with a "
         f"letter or digit (it names the DVC experiments <study>-t<number>)")
    scheme = t.storage.split("://", 1)[0].split("+", 1)[0] if "://" in t.storage else ""
    need(scheme in TUNE_STORAGE_SCHEMES,
         f"tune.storage: {redact_url(t.storage)!r} is not a database URL; use "
         f"sqlite:///optuna.db or postgresql://user@host/db (see docs/TEAM.md)")
    need(t.direction in TUNE_DIRECTIONS, f"tune.direction: {t.direction!r} must be maximize or minimize")
    need(t.sampler.kind in TUNE_SAMPLERS, f"tune.sampler.kind: {t.sampler.kind!r} must be tpe or random")
    need(t.pruner.kind in TUNE_PRUNERS, f"tune.pruner.kind: {t.pruner.kind!r} must be median or none")
    for key in ("sampler.startup_trials", "pruner.startup_trials", "pruner.warmup_rounds"):
        section, name = key.split(".")
        value = getattr(getattr(t, section), name)
        need(value >= 0, f"tune.{key}: {value} must be >= 0")
    need(t.sampler.seed is None or t.sampler.seed >= 0, "tune.sampler.seed: must be >= 0 or null")
    need(t.heartbeat_s >= 1, f"tune.heartbeat_s: {t.heartbeat_s} must be >= 1 second")
    need(t.pruner.kind == "none" or t.direction == "maximize",
         "tune.pruner: rounds report their validation AUROC (higher is better), so pruning needs "
         "tune.direction: maximize; set tune.pruner.kind: none to minimize a metric")
    head = t.metric.split(".", 1)[0]
    groups = list(p.targets) + (["mean"] if len(p.targets) > 1 else [])
    need(t.metric == "auto" or (head in groups and "." in t.metric),
         f"tune.metric: {t.metric!r} is not a validation metric of evaluate; use auto or "
         f"<group>.<metric> with group one of {', '.join(groups)} (e.g. {groups[-1]}.auroc); "
         f"a held-out test cohort is never the objective")
    need(HELDOUT_KEY not in t.metric.split("."),
         f"tune.metric: {t.metric!r} scores the held-out test cohort, which nothing may select on; "
         f"use a validation metric such as {groups[-1]}.auroc")
    for name, dist in t.space.items():
        _validate_space(p, name, dist)


def _unwrap(tp: Any) -> Any:
    """X from Optional[X]; a union's dataclass option, else its first one."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return tp
    options = [o for o in typing.get_args(tp) if o is not type(None)]
    return next((o for o in options if dataclasses.is_dataclass(o)), options[0])


def _param_type(p: Params, name: str) -> Any:
    """The annotated type of the value a dotted name (as in `dvc exp run -S`) points to; None
    when params.yaml has no such value (rounds take r1..r5, other mappings any key)."""
    tp: Any = Params
    node: Any = p
    for i, part in enumerate(name.split(".")):
        tp = _unwrap(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints or (i == 0 and part in TUNE_FORBIDDEN):
                return None
            tp, node = hints[part], getattr(node, part, None)
        elif typing.get_origin(tp) is dict:
            if i == 1 and name.startswith("rounds.") and part not in node:
                return None
            tp, node = typing.get_args(tp)[1], (node or {}).get(part)
        else:
            return None
    return tp


def _candidates(name: str, dist: TuneDistribution) -> list[Any]:
    """The values a distribution can give that the params rules must accept: the ends of a range
    (those rules are bounds) or every choice."""
    given = {f: getattr(dist, f) for f in DISTRIBUTIONS if getattr(dist, f) is not None}
    need(len(given) == 1, f"tune.space.{name}: give exactly one distribution of "
                          f"{', '.join(DISTRIBUTIONS)}; got {', '.join(given) or 'none'}")
    (kind, values), = given.items()
    if kind == "choice":
        need(len(values) >= 1 and len(set(map(repr, values))) == len(values),
             f"tune.space.{name}.choice: give one or more distinct values, got {list(values)}")
        for v in (v for v in values if isinstance(v, str)):  # DVC writes -S values as YAML
            read = yaml.safe_load(v)
            need(read == v, f"tune.space.{name}.choice: {v!r} would read back from YAML as "
                            f"{read!r}, not text; choose another value")
        return list(values)
    lo, hi = values
    need(lo < hi, f"tune.space.{name}.{kind}: range {list(values)} is empty or reversed; "
                  f"give [lo, hi] with lo < hi")
    need(not kind.startswith("log") or lo > 0,
         f"tune.space.{name}.{kind}: a log range needs lo > 0, got {list(values)}")
    return [lo, hi]


def _validate_space(p: Params, name: str, dist: TuneDistribution) -> None:
    """A searched param: it exists, its distribution is one well-formed range or choice, and the
    params rules accept the values it can give (so no trial fails on its params)."""
    tp = _param_type(p, name)
    need(tp is not None, f"tune.space: unknown param {name!r}; name a value of params.yaml as "
                         f"`dvc exp run -S` does (e.g. lr, rounds.r2.lr, train.augment.preset); "
                         f"{', '.join(TUNE_FORBIDDEN)} change no result and are not searched")
    need(not (dataclasses.is_dataclass(_unwrap(tp)) or typing.get_origin(_unwrap(tp)) is dict),
         f"tune.space: {name!r} is a whole section; search one of its values")
    for value in _candidates(name, dist):
        raw = dataclasses.asdict(p)
        *parents, last = name.split(".")
        node = raw
        for part in parents:  # a section that is null (a round without resample) is made
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[last] = value
        try:
            validate(build(Params, raw, ""))
        except ConfigError as exc:
            raise ConfigError(f"tune.space.{name}: {value!r} is not a valid value ({exc})") from None
