"""Resumable round checkpoints: checkpoints/round-k/last.pt, written atomically every epoch.

Everything in a checkpoint is a tensor or a plain Python value (RNG states included), so it
loads with torch.load(weights_only=True): a checkpoint is never unpickled as code.
A checkpoint belongs to one fingerprint (the round's params, input hashes and code hashes); a
checkpoint with another fingerprint is stale and ignored. It also keeps the LR range test's
choice (`lr_found`, None unless `lr: auto`), so a resumed round trains with the same LR.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from chexops import atomic, paths
from chexops.errors import ChexopsError

FORMAT = 1


def checkpoint_path(root: str | Path, k: int) -> Path:
    return Path(root) / paths.CHECKPOINT_DIR / f"round-{k}" / "last.pt"


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (round params, input md5s, ...)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch (CPU, CUDA) and the sampler generator's states as tensors/lists."""
    version, py_state, gauss = random.getstate()
    np_state = cast(tuple, np.random.get_state(legacy=True))  # the tuple form, not the dict
    state: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomic torch.save: a kill mid-write leaves the previous checkpoint intact."""
    with atomic.atomic_path(path, ".pt") as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path: str | Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint when it exists and matches the fingerprint, else None (start afresh)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and how to get past it
        raise ChexopsError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}); "
                           f"delete it to start the round afresh") from None
    if state.get("format") != FORMAT or state.get("fingerprint") != expected_fingerprint:
        return None
    return state


def remove_checkpoint(path: str | Path) -> None:
    path = Path(path)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass
