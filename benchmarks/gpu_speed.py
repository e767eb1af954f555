"""The GPU check's throughput phase: our loader + training loop against a bare timm loop on
batches already on the device, rotated with a bare-against-bare control, at the batch
`batch_size: auto` picks and at a fixed batch; images/s, their ratio, peak GPU memory."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from benchkit import bare_step, device_name, rotate, summarize, timed
from gpu_check import CheckConfig
from gpu_data import GIB, Record, data_sets, device_settings, new_model

from chexops.data.batches import ArraySet, make_loader, to_input
from chexops.inference.settings import Settings
from chexops.training.loop import EpochState, make_optimizer, train_one_epoch
from chexops.training.schedule import OneCycle
from chexops.training.step import auto_batch_size


def staged(data: ArraySet, batch: int, n: int, s: Settings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches converted once (float, normalised, channels_last as ours) and left on the device:
    the bare loop's input, so it pays for no loading at all."""
    rows = np.arange(n * batch)
    images = torch.from_numpy(np.ascontiguousarray(data.images[data.image_rows(rows)]))
    labels = torch.from_numpy(data.labels[rows])
    return [(to_input(images[i * batch:(i + 1) * batch], s.device, s.channels_last),
             labels[i * batch:(i + 1) * batch].to(s.device)) for i in range(n)]


def staged_count(s: Settings, batch: int, image_size: int, peak_gib: float) -> int:
    """2 staged batches (so the bare loop does not re-read one batch out of the GPU's L2 cache)
    where they fit beside ours' peak with 5 % of the GPU to spare, else 1."""
    if s.device.type != "cuda":
        return 2
    total = torch.cuda.get_device_properties(s.device).total_memory
    one = batch * 3 * image_size ** 2 * 4  # float32
    return 2 if peak_gib * GIB + 2 * one < 0.95 * total else 1


@contextlib.contextmanager
def peak(device: torch.device, into: dict, key: str) -> Iterator[None]:
    """The largest GPU memory allocated inside the block, in GiB, kept as the max in into[key]."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into[key] = max(into.get(key, 0.0), torch.cuda.max_memory_allocated(device) / GIB)


def compare(cfg: CheckConfig, model: torch.nn.Module, train: ArraySet, batch: int,
            s: Settings) -> dict:
    """Ours (make_loader over the image store + train_one_epoch) against the bare loop, then
    bare again as the control, rotated; images/s, their ratio, peak GPU memory of each."""
    n_batches = max(1, min(cfg.images_per_epoch, len(train)) // batch)
    loader = make_loader(train, batch, True, torch.Generator().manual_seed(0), cfg.workers,
                         s.device.type == "cuda")
    optimizer, peaks = make_optimizer(model, 1e-4, 1e-2, (0.95, 0.85))
    schedule, state = OneCycle(optimizer, peaks, 10 ** 6), EpochState(0, batch)
    memory: dict[str, float] = {}

    def ours() -> None:
        with peak(s.device, memory, "ours_peak_gib"):
            train_one_epoch(model, loader, optimizer, schedule, state, s, 1, n_batches)

    ours()  # its peak before the bare loop's batches take their memory (also a warm-up)
    count = staged_count(s, batch, cfg.image_size, memory.get("ours_peak_gib", 0.0))
    inputs = staged(train, batch, min(count, n_batches), s)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def bare() -> None:
        model.train()
        with peak(s.device, memory, "bare_peak_gib"):
            for i in range(n_batches):
                x, y = inputs[i % len(inputs)]
                bare_step(model, x, y, optimizer, loss_fn, s.amp_dtype is not None)

    times = rotate([("bare", bare), ("ours", ours), ("control", bare)], cfg.repeats, s.device)
    result = {"batch": batch, "batches": n_batches, "images_per_epoch": n_batches * batch,
              "repeats": cfg.repeats, "micro_batch": state.micro, "bare_staged_batches": len(inputs),
              **summarize(times, n_batches * batch), **memory}
    result["speed_ratio"] = result["ours_images_per_s"] / result["bare_images_per_s"]
    return result


def throughput(cfg: CheckConfig, rec: Record) -> None:
    s = device_settings(cfg)
    device = s.device
    train, _ = data_sets(cfg)
    model = new_model(cfg, s)
    rec.update(arch=cfg.arch, image_size=cfg.image_size, device_name=device_name(device),
               precision="bf16-autocast" if s.amp_dtype is not None else "fp32",
               channels_last=s.channels_last, loader_workers=cfg.workers, train_images=len(train))
    holder: dict[str, int] = {}
    probe_s = timed(lambda: holder.update(batch=auto_batch_size(model, cfg.image_size, 1, s,
                                                                len(train))), device)
    rec.update(auto_batch=holder["batch"], auto_probe_s=probe_s)
    for key, batch in (("auto", holder["batch"]), ("fixed", cfg.fixed_batch)):
        if key == "fixed" and batch == holder["batch"]:
            rec.update(fixed={"same_as_auto": True})
            continue
        rec.update(**{key: compare(cfg, model, train, batch, s)})
