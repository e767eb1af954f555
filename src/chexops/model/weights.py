"""Weights files: safetensors writes and strict reads, and the one loader that rebuilds a trained
network together with its `Recipe` (chexops.model.recipe: architecture, targets in output order,
output coding, image size, normalisation, chexops version), as the file's metadata records it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from chexops import atomic
from chexops.config import Params
from chexops.errors import ChexopsError
from chexops.model.network import ChexNet, build_model
from chexops.model.recipe import Recipe, check_normalisation, recipe_from_metadata


def read_recipe(weights: str | Path, params: Params) -> Recipe:
    """The recipe of a weights file (`recipe_from_metadata` of its metadata: params stand in
    for what an older file does not record). Raises ChexopsError when the file is missing or
    not safetensors."""
    return recipe_from_metadata(weights_metadata(weights), params)


def load_model(weights: str | Path, params: Params | None = None, *,
               recipe: Recipe | None = None) -> tuple[ChexNet, Recipe]:
    """The network of a safetensors weights file, with its recipe.

    By default the recipe is the file's own (`read_recipe(weights, params)`); a caller that must
    run what params (or a pyfunc config) describe passes `recipe`, and a file made with other
    params then fails the strict load. The model comes back on the CPU in train mode (as built).
    Raises ChexopsError: file missing, not safetensors, coding not covering the targets, inputs
    normalised otherwise than this chexops does, or weights that do not match the network."""
    meta = weights_metadata(weights)
    if recipe is None:
        if params is None:
            raise TypeError("load_model needs params or a recipe")
        recipe = recipe_from_metadata(meta, params)
    check_normalisation(meta, str(weights))  # whichever recipe runs it, the file says how it was fed
    model = build_model(recipe.model, recipe.coding.n_outputs)
    load_weights(model, weights)
    return model, recipe


def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BN running stats), detached on the CPU, independent copies."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_weights(model: nn.Module | dict, path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write of a model (or an already copied state dict); metadata values
    are stored as strings."""
    state = model if isinstance(model, dict) else state_to_save(model)
    atomic.save_safetensors(path, state, {str(k): str(v) for k, v in (metadata or {}).items()})


def weights_metadata(weights: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a weights file ({} when it has none). Raises
    ChexopsError when the file is missing or not safetensors."""
    from safetensors import safe_open

    weights = Path(weights)
    if not weights.is_file():
        raise ChexopsError(f"weights file {weights} not found; give a .safetensors path or a "
                           f"models:/<name>@champion URI")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:
        raise ChexopsError(f"{weights} is not a safetensors file; give the best.safetensors "
                           f"a training round wrote") from None


def load_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a chexops safetensors file into `model` (strict: same keys and shapes); returns the
    file's metadata. Raises ChexopsError when the file is missing or does not match."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ChexopsError(f"weights file {path} not found; train the round that writes it first")
    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        which = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ChexopsError(f"{path} does not match the model ({which}); "
                           f"use weights made with the same model params (arch, head, targets)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # shape mismatch
        raise ChexopsError(f"{path} does not match the model ({str(exc).splitlines()[-1].strip()}); "
                           f"use weights made with the same model params") from None
    return weights_metadata(path)
