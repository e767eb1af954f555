"""A weights file's recipe: what it takes to use the weights right, recorded in the file's
safetensors metadata by the round that trained them, and what to do when params disagree.

A round records the network (`model`: arch, head, hidden, ps, bn_final; `arch` also alone),
the targets in output order, the output coding (U-MultiClass), the image size it trained at,
the input normalisation and the chexops version (`chexops_version`). Whoever uses the weights
(predict, the registry model, evaluate and its Grad-CAM, the teacher) takes all of it from the
file: where params say otherwise the weights win and one warning line per key says so, or the
caller refuses where running would be wrong (`refuse`: evaluate needs params' targets, a round
continues only weights trained as params say).

A file from before chexops recorded a key falls back to params for it, with a warning naming
the keys (`assumed`); a missing coding means all binary (U-MultiClass came later), a missing
normalisation ImageNet's (the only one chexops has used).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any, Collection, Mapping

from chexops import __version__
from chexops.config import ModelConfig, Params
from chexops.data.batches import NORMALISATION
from chexops.errors import ChexopsError
from chexops.model.coding import OutputCoding, coding_from_metadata, output_coding

# the model params that shape or train the network; `pretrained` is replaced by the weights
MODEL_KEYS = ("arch", "head", "hidden", "ps", "bn_final")
CODING_KEY = "output coding (clean.uncertainty)"
# scoring against labels (evaluate) needs the weights' outputs to be params' targets, in order
SCORED_KEYS = ("targets",)
SCORED_FIX = ("their scores would land in the wrong columns: evaluate weights trained on params' "
              "targets (`dvc repro` re-trains them), or set targets as the weights have them")


@dataclass(frozen=True)
class Recipe:
    """How to rebuild a trained network, feed it and read its outputs.

    model: the model params (pretrained always False: the weights replace any pretrained body);
    targets: the output order; coding: how logits become probabilities; image_size: the side in
    px of the square inputs it trained on; normalisation: how uint8 pixels became its input
    (chexops.data.batches.NORMALISATION); version: the chexops that wrote it ("" unknown);
    assumed: the params keys taken from params because the file does not record them."""
    model: ModelConfig
    targets: tuple[str, ...]
    coding: OutputCoding
    image_size: int
    normalisation: str = NORMALISATION
    version: str = ""
    assumed: tuple[str, ...] = ()

    @property
    def arch(self) -> str:
        return self.model.arch


def params_recipe(params: Params) -> Recipe:
    """The recipe params train: what a round starts from and records in its weights."""
    return Recipe(dataclasses.replace(params.model, pretrained=False), tuple(params.targets),
                  output_coding(params), params.train.image_size, NORMALISATION, __version__)


def model_fields(model: ModelConfig) -> dict[str, Any]:
    return {k: getattr(model, k) for k in MODEL_KEYS}


def recipe_metadata(recipe: Recipe) -> dict[str, str]:
    """The safetensors metadata (all strings) that records `recipe`."""
    return {"arch": recipe.arch, "model": json.dumps(model_fields(recipe.model)),
            "targets": ",".join(recipe.targets), "coding": recipe.coding.to_str(),
            "image_size": str(recipe.image_size), "normalisation": recipe.normalisation,
            "chexops_version": recipe.version}


def _bad(key: str, value: Any) -> ChexopsError:
    return ChexopsError(f"weights metadata {key} {str(value)[:80]!r} is not understood; use "
                        f"weights written by chexops")


def _model(meta: Mapping[str, Any], params: Params) -> tuple[ModelConfig, tuple[str, ...]]:
    """The recorded network, or params' for what is not recorded (with the keys assumed)."""
    base = dataclasses.replace(params.model, pretrained=False)
    if not meta.get("model"):
        assumed = [f"model.{k}" for k in MODEL_KEYS if k != "arch" or not meta.get("arch")]
        return dataclasses.replace(base, arch=meta.get("arch") or base.arch), tuple(assumed)
    try:
        recorded = json.loads(meta["model"]) if isinstance(meta["model"], str) else meta["model"]
        return dataclasses.replace(base, **{k: recorded[k] for k in MODEL_KEYS}), ()
    except (ValueError, TypeError, KeyError):
        raise _bad("model", meta["model"]) from None


def _image_size(meta: Mapping[str, Any], params: Params) -> tuple[int, tuple[str, ...]]:
    if not meta.get("image_size"):
        return params.train.image_size, ("train.image_size",)
    try:
        size = int(meta["image_size"])
    except (ValueError, TypeError):
        raise _bad("image_size", meta["image_size"]) from None
    if size < 1:
        raise _bad("image_size", size)
    return size, ()


def recipe_from_metadata(meta: Mapping[str, Any], params: Params) -> Recipe:
    """The recipe a weights file's metadata (or a pyfunc config) records, params standing in for
    what it does not record (listed in `assumed`). Raises ChexopsError for metadata chexops
    cannot read or a coding that does not cover the targets."""
    targets = tuple(str(meta["targets"]).split(",")) if meta.get("targets") else tuple(params.targets)
    model, assumed = _model(meta, params)
    size, assumed_size = _image_size(meta, params)
    return Recipe(model, targets, coding_from_metadata(meta, targets), size,
                  str(meta.get("normalisation") or NORMALISATION),
                  str(meta.get("chexops_version") or ""),
                  ("targets",) * (not meta.get("targets")) + assumed + assumed_size)


# ---------------------------------------------------------------- weights against params

def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _params_side(params: Params) -> dict[str, Any]:
    return {**{f"model.{k}": getattr(params.model, k) for k in MODEL_KEYS},
            "targets": tuple(params.targets), "train.image_size": params.train.image_size}


def _weights_side(recipe: Recipe) -> dict[str, Any]:
    return {**{f"model.{k}": getattr(recipe.model, k) for k in MODEL_KEYS},
            "targets": recipe.targets, "train.image_size": recipe.image_size}


def differences(recipe: Recipe, params: Params) -> list[tuple[str, str, str]]:
    """(params key, the weights' value, params' value) wherever they differ, keys the file
    does not record (taken from params) left out; values as written in messages."""
    theirs, ours = _weights_side(recipe), _params_side(params)
    if recipe.targets == tuple(params.targets):  # else the targets line says it all
        theirs[CODING_KEY], ours[CODING_KEY] = recipe.coding.to_str(), output_coding(params).to_str()
    return [(key, _show(theirs[key]), _show(ours[key])) for key in theirs
            if key not in recipe.assumed and theirs[key] != ours[key]]


def refuse(recipe: Recipe, params: Params, keys: Collection[str], what: str, fix: str) -> None:
    """Raise ChexopsError at the first difference in `keys` ("*": any): "<what> were trained
    with <key> <value>, params say <value>; <fix>"."""
    for key, w, p in differences(recipe, params):
        if key in keys or "*" in keys:
            raise ChexopsError(f"{what} were trained with {key} {w}, params say {p}; {fix}")


def warn(line: str) -> None:
    print(line, file=sys.stderr)


def warn_assumed(recipe: Recipe, params: Params, where: str, what: str = "the weights") -> None:
    """One line when the file does not record some keys: params' values stand in."""
    if not recipe.assumed:
        return
    ours = _params_side(params)
    shown = ", ".join(f"{key} {_show(ours[key])}" for key in recipe.assumed)
    warn(f"{where}: warning: {what} do not record {', '.join(recipe.assumed)} (written "
         f"before chexops recorded them); assuming params' {shown}")


def warn_differences(recipe: Recipe, params: Params, where: str) -> None:
    """One line per key where params disagree with the weights: the weights' value is used."""
    for key, w, p in differences(recipe, params):
        warn(f"{where}: warning: the weights were trained with {key} {w}; using {w}, not "
             f"params' {p}")


def check_recipe(recipe: Recipe, params: Params, where: str, refuse_keys: Collection[str] = (),
                 fix: str = "") -> Recipe:
    """The weights win: refuse differences in `refuse_keys` (ChexopsError), warn about the
    others and about keys the file does not record; returns the recipe."""
    refuse(recipe, params, refuse_keys, "the weights", fix)
    warn_differences(recipe, params, where)
    warn_assumed(recipe, params, where)
    return recipe


def check_normalisation(meta: Mapping[str, Any], name: str) -> None:
    """Refuse weights whose metadata says they were fed inputs this chexops does not make
    (their outputs would be wrong, silently); a file that says nothing was fed ImageNet's."""
    recorded = str(meta.get("normalisation") or NORMALISATION)
    if recorded != NORMALISATION:
        version = meta.get("chexops_version")
        by = f"chexops {version}" if version else "another chexops"
        raise ChexopsError(f"{name} expects inputs normalised as {recorded!r} (written by "
                           f"{by}); this chexops {__version__} feeds {NORMALISATION!r}: use the "
                           f"chexops version that wrote the weights")
