"""Data-parallel training through torchrun: the relaunch, the process group, and the few
collectives the training loop needs. Every helper is a no-op in a single process, so the loop
calls them unconditionally and a plain run never touches torch.distributed.

Semantics (docs/DISTRIBUTED.md): `train.batch_size` is the effective (global) batch; each of the
W ranks gets batch_size / W items per step, and the union of the ranks' items at step i is exactly
the single-process run's batch i (`train_sampler`: one seeded permutation per epoch, rank r takes
every W-th item). BatchNorm statistics are per rank (plain BatchNorm, as torchvision's default;
SyncBatchNorm does not run on CPU), so results match a single-process run closely, not bitwise.
Only rank 0 writes files and talks to MLflow.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from chexops import runtime
from chexops.errors import ChexopsError

# multi-node: set on the node that runs `dvc repro` (see docs/DISTRIBUTED.md)
ENV_NNODES = "CHEXOPS_NNODES"
ENV_RDZV_ENDPOINT = "CHEXOPS_RDZV_ENDPOINT"   # host:port of the rendezvous (node 0)
ENV_RDZV_ID = "CHEXOPS_RDZV_ID"               # same id on every node
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits; the default is a single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- launching

def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    found = os.environ if env is None else env
    return all(k in found for k in TORCHRUN_ENV)


def launcher_args(nproc: int, environ: Mapping[str, str] | None = None) -> list[str]:
    """--standalone on one node; c10d rendezvous at $CHEXOPS_RDZV_ENDPOINT for several."""
    env = os.environ if environ is None else environ
    if nproc < 1:
        raise ChexopsError(f"runtime.nproc_per_node: {nproc} must be >= 1; set the number of "
                           f"processes (GPUs) per node")
    nnodes = env.get(ENV_NNODES, "1").strip() or "1"
    if nnodes == "1":
        return ["--standalone", f"--nproc_per_node={nproc}"]
    endpoint = env.get(ENV_RDZV_ENDPOINT, "").strip()
    if not endpoint:
        raise ChexopsError(f"${ENV_NNODES}={nnodes} needs ${ENV_RDZV_ENDPOINT} (host:port of "
                           f"node 0); set it on every node")
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={env.get(ENV_RDZV_ID, 'chexops')}"]


def torchrun_command(cli_args: list[str], nproc: int,
                     env: dict[str, str] | None = None) -> list[str]:
    """`torchrun <launcher args> -m chexops <cli_args>`, with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args(nproc, env),
            "-m", "chexops", *cli_args]


def relaunch(command: list[str], cwd: str | Path) -> None:
    """Run the torchrun command in the foreground (DVC waits on it); fail when any rank failed."""
    print(f"chexops: relaunching under torchrun: {' '.join(command[1:])}", file=sys.stderr)
    code = subprocess.run(command, cwd=cwd).returncode
    if code != 0:
        raise ChexopsError(f"torchrun exited with status {code}; the failing rank's error is "
                           f"printed above")


# ---------------------------------------------------------------- the process group

def _context(device: torch.device) -> DistContext:
    env = os.environ
    local_rank = int(env["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    return DistContext(int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank,
                       int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), device)


@contextlib.contextmanager
def process_group(device: torch.device, threads: int = 0) -> Iterator[DistContext]:
    """Under torchrun: join the group (nccl on CUDA, gloo on CPU), one GPU per local rank, the
    CPU threads shared between the node's ranks. Otherwise a single-process context."""
    if not under_torchrun():
        yield DistContext(device=device)
        return
    ctx = _context(device)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    elif threads > 0:
        torch.set_num_threads(max(1, threads // ctx.local_world_size))
    dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return runtime.rank()


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds the image cache), then the others (reuse it)."""
    if not active():
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


# ---------------------------------------------------------------- batches and samplers

def per_rank_batch(batch_size: int) -> int:
    """The global batch split evenly over the ranks (the effective batch is unchanged)."""
    w = world_size()
    if batch_size % w:
        raise ChexopsError(f"train.batch_size {batch_size} is not divisible by the {w} processes; "
                           f"use a multiple of {w} (it is the effective batch over all ranks)")
    return batch_size // w


def train_sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler:
    """One permutation per epoch from seed + epoch, truncated to a multiple of the world size
    (so step i covers the same items as a single-process run's batch i); rank r takes every
    W-th item. Call set_epoch before each epoch."""
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),
                                               shuffle=True, seed=seed, drop_last=True)


def eval_sampler(dataset) -> torch.utils.data.DistributedSampler | None:
    """Validation sharded over the ranks (padded by repeating items; `gather_rows` drops them)."""
    if world_size() == 1:
        return None
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),
                                               shuffle=False)


def set_epoch(loader, epoch: int) -> None:
    set_sampler_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if set_sampler_epoch is not None:
        set_sampler_epoch(epoch)


# ---------------------------------------------------------------- model and collectives

def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel in a group, else the model itself. Buffers are not broadcast at
    each forward; `average_buffers` syncs BatchNorm statistics once per epoch instead. The
    training step runs every backward under `no_sync` and averages the gradients itself
    (`all_reduce_grads`) once all ranks agree that no one ran out of memory."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.14 renamed the option (and still syncs buffers once at construction)
    key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
           else "broadcast_buffers")
    options: dict[str, Any] = {key: False}
    return ddp(model, device_ids=ids, **options)


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce in this backward unless `sync`."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (the tensor itself in a single process)."""
    if not active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


def any_over_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (one tiny all-reduce): how the ranks
    agree on an out-of-memory retry, so all of them retry (and make the same collectives)."""
    if not active():
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


GRAD_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


@torch.no_grad()
def all_reduce_grads(model: nn.Module) -> None:
    """Average the gradients of the trainable parameters over the ranks, in ~25 MiB flat buckets
    (what DDP's reducer does during backward; the training step calls it after every rank has
    finished its backward passes, so an out-of-memory retry never leaves a rank inside a
    collective the others skipped). A trainable parameter without a gradient counts as zeros."""
    if not active():
        return
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if isinstance(
        model, nn.parallel.DistributedDataParallel) else model
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    w = world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        last = i == len(grads) - 1
        if size >= GRAD_BUCKET_BYTES or last or grads[i + 1].dtype != g.dtype:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(w)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def min_over_ranks(value: int, device: torch.device) -> int:
    if not active():
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over the ranks, so every rank
    validates, and rank 0 saves, the same model."""
    if not active():
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world_size())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank (e.g. the checkpoint to resume, read by rank 0 only)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(local: np.ndarray, n_total: int) -> np.ndarray:
    """Undo `eval_sampler`'s sharding: rank r held items r, r + W, ...; the padding (repeated
    first items beyond n_total) is dropped. Identity in a single process."""
    if not active():
        return local
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, np.asarray(local))
    stacked = np.stack(parts, axis=1)  # (per-rank rows, W, ...): row j of rank r is j * W + r
    return stacked.reshape(-1, *stacked.shape[2:])[:n_total]


class NullRun:
    """What a non-zero rank gets instead of an MLflow run: it logs nothing."""
    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
