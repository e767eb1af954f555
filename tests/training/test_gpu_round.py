"""A training round on a real CUDA device: bf16 autocast, channels_last, the periodic
finiteness check, `batch_size: auto` with its real out-of-memory probe, and deterministic mode.
Skipped without CUDA: run them on a GPU machine with `pytest -m gpu`."""
from __future__ import annotations

import pytest
import torch

from chexops.config import RuntimeConfig, TrainConfig
from chexops.inference.settings import resolve_settings
from chexops.runtime import configure_torch
from chexops.training.loop import RoundPlan, train_round
from tests.training.test_loop import new_model, tiny_data, weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def gpu_plan(batch_size: int | str = "auto", deterministic: bool = False) -> RoundPlan:
    runtime = RuntimeConfig(device="cuda", amp="auto", channels_last="auto",
                            deterministic=deterministic)
    return RoundPlan(epochs=2, lr=(1e-4, 1e-3), freeze=False, seed=7, targets=("Cardiomegaly",),
                     train=TrainConfig(image_size=32, batch_size=batch_size), runtime=runtime)


def test_cuda_settings_are_bf16_and_channels_last():
    s = resolve_settings(RuntimeConfig(device="cuda"), TrainConfig(), CUDA)
    assert s.channels_last
    assert s.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    assert s.sync_every > 1  # the finiteness check syncs only every few batches on CUDA


def test_round_trains_on_cuda_with_the_auto_batch(tmp_path):
    out = tmp_path / "best.safetensors"
    result = train_round(new_model().to(CUDA), tiny_data(64), tiny_data(16, seed=1), gpu_plan(),
                         out, CUDA)
    assert 2 <= result.batch_size <= 64  # the probe never asks for more items than there are
    assert result.micro_batch == result.batch_size
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.history)
    assert result.best_metrics["auroc"] is not None and out.is_file()
    assert all(v.device.type == "cpu" for v in weights(out).values())  # saved from the CPU copy


def test_deterministic_rounds_on_cuda_are_bit_identical(tmp_path):
    configure_torch(RuntimeConfig(device="cuda", deterministic=True))
    try:
        runs = []
        for i in range(2):
            out = tmp_path / f"run{i}.safetensors"
            train_round(new_model().to(CUDA), tiny_data(32), tiny_data(16, seed=1),
                        gpu_plan(batch_size=8, deterministic=True), out, CUDA)
            runs.append(weights(out))
        assert runs[0].keys() == runs[1].keys()
        assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    finally:
        torch.use_deterministic_algorithms(False)
