from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from chexops import atomic


def test_safetensors_bytes_are_canonical_and_loadable(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.int64)}
    meta = {f"k{i}": str(i) for i in range(12)}
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    atomic.save_safetensors(first, tensors, meta)
    atomic.save_safetensors(second, dict(reversed(tensors.items())), dict(reversed(meta.items())))
    assert first.read_bytes() == second.read_bytes()
    loaded = load_file(first)
    assert torch.equal(loaded["b"], tensors["b"]) and torch.equal(loaded["a"], tensors["a"])
    with safe_open(first, "pt") as fh:
        assert fh.metadata() == meta


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
