"""The GPU check's round phases: two deterministic rounds with their weights compared, the same
round through torchrun (whose single rank must match the plain round bit for bit), and the
out-of-memory fallback forced with a real memory limit on CUDA (a forward hook on the CPU)."""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from gpu_check import CheckConfig
from gpu_data import GIB, SEED, TARGET, Record, data_sets, device_settings, head, new_model

from chexops.config import ModelConfig, RuntimeConfig, TrainConfig
from chexops.data.batches import make_loader
from chexops.errors import ChexopsError
from chexops.inference.settings import Settings
from chexops.model.network import build_model
from chexops.runtime import prepare, seed_everything
from chexops.training import distributed
from chexops.training.loop import EpochState, RoundPlan, make_optimizer, train_one_epoch, train_round
from chexops.training.schedule import OneCycle
from chexops.training.step import train_step

FLOOR_SLACK = 32 * 2 ** 20   # bytes: the labels and mask of a step fit, no micro-batch does
PHASES_PY = Path(__file__).resolve().parent / "gpu_phases.py"


def round_plan(cfg: CheckConfig) -> RoundPlan:
    runtime = RuntimeConfig(device=cfg.device, threads=cfg.threads, deterministic=True)
    train = TrainConfig(image_size=cfg.image_size, batch_size=cfg.round_batch,
                        max_batches=cfg.round_batches)
    return RoundPlan(epochs=1, lr=(1e-4, 1e-3), freeze=False, seed=SEED, targets=(TARGET,),
                     train=train, runtime=runtime)


def short_round(cfg: CheckConfig, device: torch.device, out: Path) -> dict:
    """One deterministic epoch of round_batches batches through train_round; the best weights go
    to `out`."""
    train, valid = data_sets(cfg)
    seed_everything(SEED)
    model = build_model(ModelConfig(arch=cfg.arch), 1)
    start = time.perf_counter()
    result = train_round(model, head(train, cfg.round_batch * cfg.round_batches), valid,
                         round_plan(cfg), out, device)
    row = result.history[-1]
    return {"seconds": time.perf_counter() - start, "batch_size": result.batch_size,
            "train_loss": row["train_loss"], "valid_auroc": row["auroc"]}


def same_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    shared = sorted(set(x) & set(y))
    differ = [k for k in shared if not torch.equal(x[k], y[k])]
    diff = max((float((x[k].double() - y[k].double()).abs().max()) for k in differ), default=0.0)
    return {"identical": not differ and x.keys() == y.keys(), "tensors": len(shared),
            "differing": len(differ), "max_abs_diff": diff, "first_differing": differ[:3]}


def determinism(cfg: CheckConfig, rec: Record) -> None:
    device = prepare(round_plan(cfg).runtime)  # before CUDA starts: cuBLAS's fixed workspace
    outs = [Path(cfg.work) / f"deterministic-{i}.safetensors" for i in (1, 2)]
    for i, out in enumerate(outs, 1):
        rec.update(**{f"round_{i}": short_round(cfg, device, out)})
    rec.update(weights=same_weights(*outs))


def torchrun(cfg: CheckConfig, rec: Record) -> None:
    """Relaunch this file's torchrun-round under torchrun, as `runtime.distributed: torchrun`
    relaunches a stage (chexops.training.distributed builds and runs the command)."""
    command = [sys.executable, "-m", "torch.distributed.run", *distributed.launcher_args(1),
               str(PHASES_PY), "torchrun-round", cfg.work]
    rec.update(command=" ".join(command[1:]))
    start = time.perf_counter()
    distributed.relaunch(command, Path(__file__).resolve().parents[1])
    rec.update(launch_s=time.perf_counter() - start)


def torchrun_round(cfg: CheckConfig, rec: Record) -> None:
    runtime = round_plan(cfg).runtime
    with distributed.process_group(prepare(runtime), runtime.threads) as ctx:
        out = Path(cfg.work) / "torchrun.safetensors"
        result = short_round(cfg, ctx.device, out)
        if not ctx.is_main:
            return
        rec.update(world_size=distributed.world_size(),
                   backend=str(torch.distributed.get_backend()), round=result)
        plain = Path(cfg.work) / "deterministic-1.safetensors"
        if plain.is_file():  # W = 1 takes the same steps as a plain round: the same weights
            rec.update(matches_plain_round=same_weights(plain, out))


def _step_peak(model, batch, optimizer, micro: int, s: Settings) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(s.device)
    train_step(model, batch, optimizer, micro, s)
    torch.cuda.synchronize(s.device)
    return torch.cuda.max_memory_reserved(s.device)


@contextlib.contextmanager
def memory_cap(s: Settings, cap: float | None = None) -> Iterator[None]:
    """A real CUDA out-of-memory above `cap` bytes (the caching allocator's per-process limit);
    None: what is held once the cache is emptied, plus FLOOR_SLACK for a step's small tensors."""
    total = torch.cuda.get_device_properties(s.device).total_memory
    torch.cuda.empty_cache()
    if cap is None:
        cap = torch.cuda.memory_reserved(s.device) + FLOOR_SLACK
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), s.device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, s.device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def oom_above(model: torch.nn.Module, items: int) -> Iterator[None]:
    """The CPU dry run's stand-in: an out-of-memory error from any forward of more than `items`."""
    def hook(module, args):
        if args[0].shape[0] > items:
            raise torch.OutOfMemoryError(f"injected: more than {items} items (CPU dry run)")

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def oom_injections(model, batch, optimizer, s: Settings, b: int) -> tuple[dict, Callable, Callable]:
    """(facts, fallback, floor): context managers making batch b run out of memory while b // 2
    fits, and making every micro-batch run out; real memory limits on CUDA."""
    if s.device.type != "cuda":
        return ({"method": f"forward hook raising torch.OutOfMemoryError above {b // 2} items"},
                lambda: oom_above(model, b // 2), lambda: oom_above(model, 0))
    train_step(model, batch, optimizer, b, s)       # warm-up: AdamW state, cuDNN's kernel choice
    train_step(model, batch, optimizer, b // 2, s)
    full, half = (_step_peak(model, batch, optimizer, m, s) for m in (b, b // 2))
    cap = half + 0.35 * (full - half)
    facts = {"method": "torch.cuda.set_per_process_memory_fraction", "step_peak_gib": full / GIB,
             "half_step_peak_gib": half / GIB, "cap_gib": cap / GIB}
    return facts, lambda: memory_cap(s, cap), lambda: memory_cap(s)


def oom(cfg: CheckConfig, rec: Record) -> None:
    s = device_settings(cfg)
    train, _ = data_sets(cfg)
    b, model = cfg.oom_batch, new_model(cfg, s)
    data = head(train, 3 * b)
    loader = make_loader(data, b, True, torch.Generator().manual_seed(0), 0, s.device.type == "cuda")
    optimizer, peaks = make_optimizer(model, 1e-4, 1e-2, (0.95, 0.85))
    first = next(iter(loader))
    facts, fallback, floor = oom_injections(model, first, optimizer, s, b)
    state = EpochState(0, b)
    with fallback():
        loss = train_one_epoch(model, loader, optimizer, OneCycle(optimizer, peaks, 10 ** 6), state,
                               s, 1)
    rec.update(**facts, batch=b, steps=len(loader), micro_after=state.micro, train_loss=loss,
               fallback_ok=state.micro < b and math.isfinite(loss))
    try:
        with floor():
            train_step(model, first, optimizer, b, s)
        rec.update(floor={"raised": False})
    except ChexopsError as exc:
        rec.update(floor={"raised": True, "message": str(exc)})
