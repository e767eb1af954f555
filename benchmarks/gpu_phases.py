"""The GPU check's phases (benchmarks/gpu_check.py runs each in its own process):

    python benchmarks/gpu_phases.py PHASE WORK_DIR

setup: the machine's facts, the synthetic CheXpert and its image store; throughput: our loader
+ loop against a bare timm loop on batches already on the device; determinism: two deterministic
rounds, weights compared; torchrun: the same round through torchrun (torchrun-round is its rank);
oom: the out-of-memory fallback. Each reads WORK_DIR/config.json and rewrites WORK_DIR/PHASE.json
at every step, so a phase stopped at its limit leaves what it had measured. Nothing here needs
mlflow or dvc: the phases drive chexops.training.loop directly, not the train-round stage.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from benchkit import device_name
from gpu_check import CheckConfig
from gpu_data import GIB, SEED, TARGET, Record, data_sets, files, load_config, synthetic_config
from gpu_rounds import determinism, oom, torchrun, torchrun_round
from gpu_speed import throughput

from chexops.data.synthetic.generate import generate_zip
from chexops.errors import ChexopsError


def machine_facts() -> dict:
    from importlib.metadata import version  # not `import timm`: seconds the setup does not need

    facts = {"python": platform.python_version(), "platform": platform.platform(),
             "cpu_count": os.cpu_count(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
             "timm": version("timm"), "numpy": np.__version__, "pandas": pd.__version__,
             "pillow": version("pillow"), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                     capability=f"{props.major}.{props.minor}",
                     bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
    else:
        facts["device_name"] = device_name(torch.device("cpu"))
    return facts


def setup(cfg: CheckConfig, rec: Record) -> None:
    rec.update(machine=machine_facts())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ChexopsError("no CUDA device is visible to torch; run the CPU dry run with --tiny")
    f, syn = files(cfg), synthetic_config(cfg)
    start = time.perf_counter()
    truth = generate_zip(syn, SEED, f["zip"], f["truth"])
    seconds = time.perf_counter() - start
    rec.update(synthetic={"images": len(truth), "train": int((truth["split"] == "train").sum()),
                          "valid": int((truth["split"] == "valid").sum()), "width": syn.width,
                          "height": syn.height, "processes": syn.workers, "seconds": seconds,
                          "images_per_s": len(truth) / seconds,
                          "zip_mib": f["zip"].stat().st_size / 2 ** 20})
    start = time.perf_counter()
    train, valid = data_sets(cfg, cfg.data_workers)
    seconds = time.perf_counter() - start
    rec.update(store={"image_size": cfg.image_size, "images": len(truth), "processes": cfg.data_workers,
                      "seconds": seconds, "images_per_s": len(truth) / seconds,
                      "gib": len(truth) * cfg.image_size ** 2 / GIB,
                      "valid_positives": int(valid.labels.sum()), "valid": len(valid)})
    if not 0 < valid.labels.sum() < len(valid):
        raise ChexopsError(f"the synthetic validation split holds one {TARGET} class only; "
                           f"raise valid_patients in the check's config")

PHASES = {"setup": setup, "throughput": throughput, "determinism": determinism,
          "torchrun": torchrun, "torchrun-round": torchrun_round, "oom": oom}


def main(argv: list[str]) -> None:
    name, work = argv[0], Path(argv[1])
    cfg = load_config(work)
    rec = Record(work, "torchrun" if name == "torchrun-round" else name)
    try:
        PHASES[name](cfg, rec)
    finally:  # what this process loaded: the GPU machine has no mlflow or dvc
        loaded = {m.split(".")[0] for m in sys.modules}
        prefix = "rank_" if name == "torchrun-round" else ""
        if os.environ.get("RANK", "0") == "0":
            rec.update(**{f"{prefix}imports_loaded": sorted(loaded & set(cfg.third_party)),
                          f"{prefix}loaded_mlflow_or_dvc": sorted(loaded & {"mlflow", "dvc"})})


if __name__ == "__main__":
    main(sys.argv[1:])
