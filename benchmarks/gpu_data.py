"""What the GPU check's phases share: the check's config read back, each phase's results file,
the synthetic CheXpert's files and the (train, valid) sets over its image store, and the model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from gpu_check import CheckConfig

from chexops import atomic
from chexops.config import ModelConfig, RuntimeConfig, SyntheticConfig, TrainConfig
from chexops.data.batches import ArraySet
from chexops.data.images import image_store
from chexops.data.synthetic.generate import VALID_ROWS_PER_PATIENT
from chexops.inference.settings import Settings, resolve_settings
from chexops.model.network import build_model
from chexops.runtime import prepare, seed_everything

SEED = 7
TARGET = "Cardiomegaly"
GIB = 2 ** 30


def load_config(work: Path) -> CheckConfig:
    raw = json.loads((work / "config.json").read_text())
    return CheckConfig(**{**raw, "third_party": tuple(raw["third_party"])})


class Record:
    """This phase's results in WORK/PHASE.json, rewritten atomically at every update (read and
    merged first: the torchrun launcher and its rank 0 add to the same file, one after the other)."""

    def __init__(self, work: Path, phase: str) -> None:
        self.path = work / f"{phase}.json"

    def update(self, **values) -> None:
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        atomic.write_json(self.path, {**data, **values})


def files(cfg: CheckConfig) -> dict[str, Path]:
    work = Path(cfg.work)
    return {"zip": work / "chexpert.zip", "truth": work / "truth.parquet", "cache": work / "cache"}


def synthetic_config(cfg: CheckConfig) -> SyntheticConfig:
    """~cfg.images images in all: train patients from the generator's expected images per patient."""
    base = SyntheticConfig()
    per_patient = base.studies_per_patient * (1 + base.lateral_fraction)
    train_images = max(cfg.images - VALID_ROWS_PER_PATIENT * cfg.valid_patients, 2 * per_patient)
    return SyntheticConfig(train_patients=round(train_images / per_patient),
                           valid_patients=cfg.valid_patients, workers=cfg.data_workers)


def data_sets(cfg: CheckConfig, workers: int = 0) -> tuple[ArraySet, ArraySet]:
    """(train, valid) over the image store (memory-mapped; filled by setup), truth labels."""
    f = files(cfg)
    truth = pd.read_parquet(f["truth"])
    pixels, slots = image_store(f["zip"], truth["Path"].tolist(), cfg.image_size, f["cache"], workers)

    def part(split: str) -> ArraySet:
        rows = (truth["split"] == split).to_numpy()
        return ArraySet.from_labels(pixels, truth.loc[rows, TARGET].to_numpy(np.float32), slots[rows])

    return part("train"), part("valid")


def head(data: ArraySet, n: int) -> ArraySet:
    index = None if data.index is None else data.index[:n]
    return ArraySet(data.images, data.labels[:n], data.mask[:n], index)


def new_model(cfg: CheckConfig, s: Settings) -> torch.nn.Module:
    seed_everything(SEED)
    model = build_model(ModelConfig(arch=cfg.arch), 1).to(s.device)
    return model.to(memory_format=torch.channels_last) if s.channels_last else model


def device_settings(cfg: CheckConfig) -> Settings:
    """prepare() the runtime (threads, cuDNN benchmarking) and resolve how to run on the device:
    bf16 autocast and channels_last on CUDA, fp32 on the CPU (what a round does)."""
    runtime = RuntimeConfig(device=cfg.device, threads=cfg.threads)
    return resolve_settings(runtime, TrainConfig(image_size=cfg.image_size), prepare(runtime))
