"""Training-loop benchmark: our train_one_epoch against a bare timm
forward/backward/step loop on the same model, batches and data, side by side in one run, with
a bare-against-bare control (the same bare loop timed as a second arm): the ratio is quoted only
when the control reads 1.00 within its own pair-to-pair spread;
CPU images/s for the default (64 px) and reduced (32 px) profiles; on CUDA, DenseNet121 at
320 px with bf16 autocast and channels_last.

    python benchmarks/train_bench.py [--batches 6] [--threads 2] [--out benchmarks/results/train_bench.json]

Writes JSON with the machine it ran on. Short by default (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from benchkit import bare_step, device_name, machine, rotate, summarize

from chexops.config import ModelConfig, RuntimeConfig, TrainConfig
from chexops.data.batches import ArraySet, make_loader, to_input
from chexops.inference.settings import resolve_settings
from chexops.model.network import build_model
from chexops.training.loop import EpochState, make_optimizer, train_one_epoch
from chexops.training.schedule import OneCycle

ROOT = Path(__file__).resolve().parents[1]
ARCH = "densenet121"


def data(n: int, size: int) -> ArraySet:
    rng = np.random.default_rng(0)
    return ArraySet.from_labels(rng.integers(0, 255, (n, size, size), dtype=np.uint8),
                                (np.arange(n) % 2).astype(np.float32))


def bare_epoch(model, loader, optimizer, device, amp, channels_last) -> None:
    """What a user would write with timm and nothing else (same input conversion)."""
    model.train()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for images, labels, _ in loader:
        bare_step(model, to_input(images, device, channels_last),
                  labels.to(device, non_blocking=True), optimizer, loss_fn, amp)


def compare(size: int, batch: int, n_batches: int, device: torch.device, repeats: int) -> dict:
    """Rotate bare, ours and bare again (the control) `repeats` times after a warm-up; median
    seconds per epoch each, and each ratio's spread over the rounds of the rotation."""
    runtime = RuntimeConfig(device=device.type)
    s = resolve_settings(runtime, TrainConfig(image_size=size, batch_size=batch), device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=ARCH), 1).to(device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(data(batch * n_batches, size), batch, True,
                         torch.Generator().manual_seed(0), 0, device.type == "cuda")
    optimizer, peaks = make_optimizer(model, 1e-4, 1e-2, (0.95, 0.85))
    schedule = OneCycle(optimizer, peaks, 10 ** 6)
    state = EpochState(0, batch)
    amp = s.amp_dtype is not None

    def bare():
        bare_epoch(model, loader, optimizer, device, amp, s.channels_last)

    def ours():
        train_one_epoch(model, loader, optimizer, schedule, state, s, 1)

    times = rotate([("bare", bare), ("ours", ours), ("control", bare)], repeats, device)
    return {"arch": ARCH, "image_size": size, "batch": batch, "batches": n_batches,
            "device": str(device), "device_name": device_name(device),
            "precision": "bf16-autocast" if amp else "fp32",
            "channels_last": s.channels_last, "repeats": repeats,
            **summarize(times, batch * n_batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12, help="batches per timed epoch (CPU)")
    parser.add_argument("--repeats", type=int, default=6, help="rounds of the 3-arm rotation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu-batch", type=int, default=128)
    parser.add_argument("--gpu-batches", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    results = {"machine": machine(), "goal": "overhead_ratio <= 1.05; GPU >= 1500 images/s",
               "cpu_default_64px": compare(64, 16, args.batches, cpu, args.repeats),
               "cpu_reduced_32px": compare(32, 16, args.batches, cpu, args.repeats)}
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        gpu = compare(320, args.gpu_batch, args.gpu_batches, torch.device("cuda"), args.repeats)
        gpu["meets_goal_1500"] = gpu["ours_images_per_s"] >= 1500
        gpu["seed_round_epoch_s"] = 117_848 / gpu["ours_images_per_s"]  # the seed's 118k round
        results["cuda_320px"] = gpu
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for key, r in results.items():
        if key != "machine" and isinstance(r, dict):
            ratio = (f"ratio {r['overhead_ratio']:.3f}" if r["control_reads_one"] else
                     f"no ratio: the control read {r['control_ratio']:.3f}")
            print(f"{key}: bare {r['bare_images_per_s']:.1f} img/s, ours "
                  f"{r['ours_images_per_s']:.1f} img/s, {ratio} (control "
                  f"{r['control_ratio_min_max'][0]:.3f}-{r['control_ratio_min_max'][1]:.3f})",
                  file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
