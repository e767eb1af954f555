"""What the benchmark scripts share: the machine they ran on, device-synchronised timing, the
rotated bare / ours / control comparison with its ratio summary, and the one bare timm training
step every "bare" arm runs (what a user would write with timm and nothing else)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch
from machine import git_commit, meminfo


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_bytes": meminfo().get("MemTotal"), **git_commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn() with the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bare_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
              optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module, amp: bool) -> None:
    """One plain step: gradients freed before the forward (the step order of ours, so neither
    loop carries the last step's gradients through its forward), bf16 autocast when amp."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    loss = loss_fn(out.float(), labels)
    loss.backward()
    optimizer.step()


def rotate(arms: list[tuple[str, Callable[[], object]]], repeats: int,
           device: torch.device) -> dict[str, list[float]]:
    """Each distinct arm once as a warm-up (allocator, oneDNN/cuDNN kernel choice), then all arms
    `repeats` times, the order rotated each round: whichever arm runs first pays for any drift
    (caches, a neighbour). Returns the seconds of each run per arm name."""
    warmed: list[Callable[[], object]] = []
    for _, fn in arms:
        if fn not in warmed:
            fn()
            warmed.append(fn)
    times: dict[str, list[float]] = {name: [] for name, _ in arms}
    for i in range(repeats):
        k = i % len(arms)
        for name, fn in arms[k:] + arms[:k]:
            times[name].append(timed(fn, device))
    return times


def summarize(times: dict[str, list[float]], n_images: int) -> dict:
    """Median images/s of "bare" and "ours", and ours/bare in seconds (`overhead_ratio`), quoted
    only when the bare-against-bare "control" reads 1.00 within its pair-to-pair spread."""
    bare_s, ours_s = statistics.median(times["bare"]), statistics.median(times["ours"])
    control_s = statistics.median(times["control"])
    pair_ratios = [o / b for o, b in zip(times["ours"], times["bare"])]
    control_ratios = [c / b for c, b in zip(times["control"], times["bare"])]
    control_ok = min(control_ratios) <= 1.0 <= max(control_ratios)
    return {"bare_images_per_s": n_images / bare_s, "ours_images_per_s": n_images / ours_s,
            "overhead_ratio": ours_s / bare_s if control_ok else None,
            "overhead_ratio_unchecked": ours_s / bare_s,
            "pair_ratio_min_max": [min(pair_ratios), max(pair_ratios)],
            "control_ratio": control_s / bare_s,
            "control_ratio_min_max": [min(control_ratios), max(control_ratios)],
            "control_reads_one": control_ok,
            "bare_s": times["bare"], "ours_s": times["ours"], "control_s": times["control"]}
