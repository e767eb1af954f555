"""The torch runtime a stage runs under: seeds, threads, determinism and the device.

torch is imported inside each function, so light modules can import this one for free.
"""
from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from chexops.config import RuntimeConfig
from chexops.errors import ChexopsError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive NumPy/random seeds from torch's per-worker seed."""
    import numpy as np
    import torch

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def configure_torch(runtime: RuntimeConfig) -> None:
    """Thread count and deterministic algorithms, as params.yaml's runtime section asks."""
    import torch

    if runtime.threads > 0:
        torch.set_num_threads(runtime.threads)
    if runtime.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    else:  # fixed input sizes: let cuDNN time its kernels once and keep the fastest (GPU only)
        torch.backends.cudnn.benchmark = True


def resolve_device(runtime: RuntimeConfig) -> "torch.device":
    """'auto' -> cuda when available, else cpu; an explicit cuda without CUDA is an error."""
    import torch

    name = runtime.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChexopsError(f"runtime.device is {name!r} but no CUDA device is available; "
                           f"set runtime.device: auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ChexopsError(f"runtime.device: {name!r} is not a device; "
                           f"use auto, cpu, cuda or cuda:N") from None


def prepare(runtime: RuntimeConfig) -> "torch.device":
    """configure_torch, then resolve_device: what every command that runs a model does first."""
    configure_torch(runtime)
    return resolve_device(runtime)


def rank() -> int:
    """This process's rank in a torch.distributed group (0 outside one, as in a plain run)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
