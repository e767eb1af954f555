"""params.yaml -> typed, validated dataclasses.

One typed config for every stage. Unknown keys are errors (a typo in params.yaml
must not silently fall back to a default), and every error names the key and the fix.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from chexops.config.coerce import build
from chexops.config.rules import url_in_source_message, validate
from chexops.config.schema import (
    AUGMENT_BOUNDS,
    AUGMENT_FIELDS,
    AUGMENT_PRESETS,
    HELDOUT_KEY,
    LOSSES,
    MIN_BOOTSTRAP,
    MIN_SYNTHETIC_SIDE,
    N_ROUNDS,
    OBSERVATIONS,
    TEST_FIRST_PATIENT,
    UNCERTAINTY_POLICIES,
    AUCMarginConfig,
    AugmentConfig,
    CleanConfig,
    ConfigError,
    DataConfig,
    EvaluateConfig,
    LRFindConfig,
    ModelConfig,
    Params,
    ResampleConfig,
    ResampleDraw,
    RoundConfig,
    RuntimeConfig,
    SyntheticConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    TuneDistribution,
)

__all__ = ["AUGMENT_BOUNDS", "AUGMENT_FIELDS", "AUGMENT_PRESETS", "HELDOUT_KEY", "LOSSES",
           "MIN_BOOTSTRAP", "MIN_SYNTHETIC_SIDE", "N_ROUNDS", "OBSERVATIONS", "TEST_FIRST_PATIENT",
           "UNCERTAINTY_POLICIES", "AUCMarginConfig", "AugmentConfig", "CleanConfig", "ConfigError",
           "DataConfig", "EvaluateConfig",
           "LRFindConfig", "ModelConfig", "Params", "ResampleConfig", "ResampleDraw",
           "RoundConfig", "RuntimeConfig", "SyntheticConfig", "TrackingConfig", "TrainConfig",
           "TuneConfig", "TuneDistribution", "flatten", "load_params", "params_from_dict",
           "to_dict", "url_in_source_message"]

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
    params = build(Params, _on_off_text(raw), "")
    validate(params)
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
