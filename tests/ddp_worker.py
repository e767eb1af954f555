"""One rank of the 2-process gloo test (tests/training/test_distributed.py), started by torchrun:

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR [exact|oom]

Trains `tiny_round()` with DistributedDataParallel; rank 0 writes best.safetensors and
result.json (history, best epoch, and the gathered vs whole-set validation logits).
`oom`: the `exact` model for one epoch, with an out-of-memory error injected on rank 1 only, in
the forward of its second step (rank 0 never fails); result.json adds every rank's final
micro-batch and injected-error count.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chexops.config import ModelConfig, RuntimeConfig, TrainConfig  # noqa: E402
from chexops.data.batches import ArraySet, make_loader  # noqa: E402
from chexops.inference.predictor import predict_logits
from chexops.inference.settings import Settings
from chexops.model.network import build_model  # noqa: E402
from chexops.training import distributed  # noqa: E402
from chexops.training.loop import RoundPlan, train_round

SEED = 7
N_TRAIN, N_VALID, SIZE, BATCH = 64, 21, 32, 16  # 21: the validation shards need padding


def tiny_data() -> tuple[ArraySet, ArraySet]:
    """Positives are brighter; fixed by the seed, identical in every process."""
    rng = np.random.default_rng(SEED)

    def make(n: int) -> ArraySet:
        y = (np.arange(n) % 2).astype(np.float32)
        images = rng.integers(0, 150, (n, SIZE, SIZE)) + 60 * y[:, None, None]
        return ArraySet.from_labels(images.astype(np.uint8), y)

    return make(N_TRAIN), make(N_VALID)


def tiny_plan(epochs: int = 2) -> RoundPlan:
    return RoundPlan(epochs=epochs, lr=1e-3, freeze=False, seed=SEED, targets=("Cardiomegaly",),
                     # the tests compare trained epochs: no epoch 0 (the start) to hand on
                     train=TrainConfig(image_size=SIZE, batch_size=BATCH, score_start=False),
                     runtime=RuntimeConfig(device="cpu", threads=1, workers=0))


def _drop_batchnorm(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            _drop_batchnorm(child)


def tiny_model(exact: bool) -> torch.nn.Module:
    """resnet18 + the fastai head; `exact`: without BatchNorm and dropout, the two things that
    legitimately differ between one process and several (per-rank batch statistics, masks)."""
    torch.manual_seed(SEED)
    model = build_model(ModelConfig(arch="resnet18", ps=0.0 if exact else 0.5), 1)
    if exact:
        _drop_batchnorm(model)
    return model


def inject_oom_once(model: torch.nn.Module, at_forward: int = 2) -> dict:
    """Raise torch.OutOfMemoryError in the at_forward-th training forward (only for chunks of
    more than 4 items, so the halved retry fits); returns the counters."""
    state = {"forwards": 0, "raised": 0}

    def hook(module, args):
        if module.training:
            state["forwards"] += 1
            if state["forwards"] == at_forward and args[0].shape[0] > 4:
                state["raised"] += 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected on this rank)")

    model.register_forward_pre_hook(hook)
    return state


def tiny_round(out_dir: Path, exact: bool, epochs: int = 2, oom: bool = False) -> dict:
    """The round both the single-process and the 2-process runs train."""
    train, valid = tiny_data()
    model = tiny_model(exact)
    injected = inject_oom_once(model) if oom else {"raised": 0}
    result = train_round(model, train, valid, tiny_plan(epochs), out_dir / "best.safetensors",
                         "cpu")
    return {"history": result.history, "best_epoch": result.best_epoch,
            "batch_size": result.batch_size, "micro_batch": result.micro_batch,
            "ooms": injected["raised"], "model": model, "valid": valid}


def gathered_vs_whole(model: torch.nn.Module, valid: ArraySet) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits from the rank shards, gathered, and from the whole set on one rank."""
    s = Settings(torch.device("cpu"))
    sharded = make_loader(valid, 4, False, None, 0, False, distributed.eval_sampler)
    gathered = distributed.gather_rows(predict_logits(model, sharded, s)[0], len(valid))
    whole = predict_logits(model, make_loader(valid, 4, False, None), s)[0]
    return gathered, whole


def main(out_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu")) as ctx:
        oom = mode == "oom"
        out = tiny_round(out_dir, mode in ("exact", "oom"), epochs=1 if oom else 2,
                         oom=oom and ctx.rank == 1)
        gathered, whole = gathered_vs_whole(out["model"], out["valid"])
        ranks: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(ranks, {"micro_batch": out["micro_batch"],
                                                    "ooms": out["ooms"]})
        if ctx.is_main:
            (out_dir / "result.json").write_text(json.dumps({
                "world_size": ctx.world_size, "history": out["history"],
                "best_epoch": out["best_epoch"], "batch_size": out["batch_size"],
                "ranks": ranks, "gathered": gathered.tolist(), "whole": whole.tolist()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "recipe")
