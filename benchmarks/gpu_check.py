"""GPU check: on a fresh GPU machine, within a hard deadline (8 min), build a synthetic CheXpert
of ~20,000 images and its 320 px image store, measure DenseNet121 training (our loader + loop
against a bare timm loop on batches already on the GPU, at the `batch_size: auto` batch and at
32), run two deterministic rounds and compare their weights, run a round through torchrun, force
an out-of-memory error and check the fallback, and run the gpu-marked tests.

    benchmarks/gpu_check.sh [OUT_DIR] [--tiny] [--deadline S] [--scale F] [--phases a,b]
                            [--work DIR] [--list-imports]

Each phase runs in its own process (benchmarks/gpu_phases.py) under its own time budget; the
JSON in OUT_DIR (default benchmarks/results) is rewritten after every phase, so a run cut short
still returns what it measured. --tiny (or CHEXOPS_GPU_CHECK_TINY=1) is the CPU dry run at toy
sizes, written to gpu_check.cpu-dryrun.json. This file imports only the standard library: it
checks that the phases' third-party modules are there before anything runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import closure
import gpu_summary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PHASES_PY = HERE / "gpu_phases.py"
GPU_TESTS = ("tests/training/test_gpu_round.py", "tests/model/test_network.py")
FORBIDDEN = ("mlflow", "dvc")      # not on the GPU machine: nothing on the check's path may need them
RUNTIME_ONLY = {"pyarrow": "pandas' parquet engine (the synthetic truth table)"}
RESERVE_S = 5.0                    # kept back from the deadline to write the JSON
MIN_PHASE_S = 10.0                 # a phase is not started with less than this left
POLL_S = 5.0                       # the JSON is rewritten this often while a phase runs


@dataclass(frozen=True)
class CheckConfig:
    """What the phases read from WORK/config.json."""
    work: str
    tiny: bool
    device: str            # cuda | cpu
    arch: str
    images: int            # synthetic images, train + valid, about
    valid_patients: int
    image_size: int        # px, square, of the image store and the model input
    fixed_batch: int       # the batch measured beside the auto one
    images_per_epoch: int  # per timed epoch of each arm
    repeats: int           # rounds of the bare / ours / control rotation
    workers: int           # DataLoader workers of our loader (params' runtime.workers)
    threads: int           # torch threads; 0 keeps torch's default
    data_workers: int      # processes rendering the images and filling the store
    round_batch: int       # the short rounds (determinism, torchrun)
    round_batches: int
    oom_batch: int
    third_party: tuple[str, ...] = ()


GPU = dict(device="cuda", arch="densenet121", images=20_000, valid_patients=70, image_size=320,
           fixed_batch=32, images_per_epoch=4096, repeats=3, workers=0, threads=0,
           round_batch=32, round_batches=8, oom_batch=64)
# resnet18: DenseNet121 alone takes most of two minutes on two shared cores
TINY = dict(device="cpu", arch="resnet18", images=80, valid_patients=8, image_size=32,
            fixed_batch=8, images_per_epoch=16, repeats=1, workers=0, threads=1,
            round_batch=8, round_batches=2, oom_batch=8)
# seconds per phase; the deadline cuts the last ones short when earlier ones run long
BUDGETS = {"gpu": {"setup": 90, "throughput": 150, "determinism": 45, "torchrun": 50, "oom": 40,
                   "gpu-tests": 60},
           # ceilings for two cores shared with other work (the dry run took 198 s at load 7-8
           # on 2 cores, 57 s of it CPU time), not estimates
           "tiny": {"setup": 90, "throughput": 105, "determinism": 90, "torchrun": 120, "oom": 75,
                    "gpu-tests": 120}}
DEADLINE_S = {"gpu": 480, "tiny": 510}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(HERE / "results"))
    parser.add_argument("--tiny", action="store_true",
                        default=os.environ.get("CHEXOPS_GPU_CHECK_TINY", "") not in ("", "0"))
    parser.add_argument("--deadline", type=float, help="hard limit for the whole check, s")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--phases", help=f"comma list of {','.join(BUDGETS['gpu'])}")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every phase budget (and the default deadline) by this")
    parser.add_argument("--list-imports", action="store_true",
                        help="print the third-party modules the phases need, and exit")
    args = parser.parse_args(argv)
    unknown = sorted(set((args.phases or "").split(",")) - set(BUDGETS["gpu"]) - {""})
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(BUDGETS['gpu'])}")
    return args


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- imports


def needed_modules() -> dict[str, list[closure.Use]]:
    return closure.third_party([PHASES_PY])


def import_report(found: dict[str, list[closure.Use]]) -> dict:
    """What the phases import (from the source), which of it is missing here, and the modules
    that must stay off the path (mlflow, dvc)."""
    names = sorted(set(found) | set(RUNTIME_ONLY))
    return {"third_party": {top: closure.describe({top: found[top]})[0] if top in found
                            else f"{top}: {RUNTIME_ONLY[top]}" for top in names},
            "missing": [m for m in names if importlib.util.find_spec(m) is None],
            "forbidden_on_path": [m for m in FORBIDDEN if m in found]}


def missing_line(report: dict) -> str | None:
    if report["forbidden_on_path"]:
        return (f"gpu_check: the phases import {', '.join(report['forbidden_on_path'])}, which the "
                f"GPU machine lacks; keep it off training/data/model imports (see `--list-imports`)")
    if report["missing"]:
        pips = [closure.DISTRIBUTION.get(m, m) for m in report["missing"]]
        return (f"gpu_check: missing Python modules: {', '.join(report['missing'])}; carry the wheels "
                f"({' '.join(pips)}) in $CHEXOPS_WHEELS (default shared/wheels), see benchmarks/README.md")
    return None


# ---------------------------------------------------------------- phases


def phase_command(name: str, work: Path) -> list[str]:
    if name == "gpu-tests":
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                *GPU_TESTS]
    return [sys.executable, str(PHASES_PY), name, str(work)]


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def run_phase(name: str, work: Path, limit: float, log: Path,
              tick: Callable[[int], None] = lambda offset: None) -> tuple[str, float, int]:
    """Run one phase in its own process group under `limit` seconds, its output appended to
    `log`; (status, seconds, where its output starts in the log). A phase past its limit is
    killed with everything it started (DataLoader workers, torchrun ranks). tick(offset) runs
    every POLL_S meanwhile (the caller rewrites the JSON, so if this process is killed from
    outside, what the phase had measured is already on disk, and its output in the log)."""
    start = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"===== {name} (limit {limit:.0f} s)\n".encode())
        out.flush()
        offset = out.tell()
        proc = subprocess.Popen(phase_command(name, work), cwd=ROOT, env=child_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            left = limit - (time.monotonic() - start)
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "timeout", time.monotonic() - start, offset
            try:
                code = proc.wait(timeout=min(POLL_S, left))
                return ("ok" if code == 0 else "failed"), time.monotonic() - start, offset
            except subprocess.TimeoutExpired:
                tick(offset)


def phase_output(log: Path, offset: int) -> str:
    with open(log, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or ["(no output)"])[-1][:400]


def pytest_counts(output: str) -> dict[str, int]:
    """{passed: n, skipped: n, ...} from pytest's last summary line."""
    lines = [ln for ln in output.splitlines()
             if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def phase_result(name: str, work: Path, status: str, seconds: float, limit: float,
                 output: str) -> dict:
    """The phase's own JSON (what it measured so far) with its status, time and limit."""
    result: dict = {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit, 1)}
    partial = work / f"{name}.json"
    if partial.is_file():
        result.update(json.loads(partial.read_text()))
    if name == "gpu-tests":
        result["pytest"] = pytest_counts(output)
    if status == "timeout":
        result["error"] = f"stopped at its {limit:.0f} s limit"
    elif status == "failed":
        result["error"] = last_error(output)
    return result


def skip_reason(name: str, results: dict, left: float) -> str | None:
    setup = results["phases"].get("setup", {}).get("status")
    if name != "setup" and setup != "ok":
        return "setup did not finish"
    if name == "gpu-tests" and importlib.util.find_spec("pytest") is None:
        return "pytest is not installed here: the gpu-marked tests did not run (carry a pytest wheel)"
    if left < MIN_PHASE_S:
        return f"deadline: {left:.0f} s left"
    return None


def run_all(names: list[str], budgets: dict, work: Path, deadline: float, results: dict,
            out: Path, log: Path) -> None:
    for name in names:
        left = deadline - time.monotonic() - RESERVE_S
        reason = skip_reason(name, results, left)
        if reason:
            results["phases"][name] = {"status": "skipped", "reason": reason}
            print(f"gpu_check: {name}: skipped ({reason})", flush=True)
            continue
        limit = min(budgets[name], left)
        print(f"gpu_check: {name} (limit {limit:.0f} s) ...", flush=True)
        start = time.monotonic()

        def snapshot(offset: int, status: str = "running", seconds: float | None = None) -> None:
            seconds = time.monotonic() - start if seconds is None else seconds
            results["phases"][name] = phase_result(name, work, status, seconds, limit,
                                                   phase_output(log, offset))
            results["summary"] = gpu_summary.summary(results)
            write_json(out, results)

        status, seconds, offset = run_phase(name, work, limit, log, snapshot)
        snapshot(offset, status, seconds)
        with open(log, "a") as fh:
            fh.write(f"===== {name}: {status} in {seconds:.1f} s\n")
        note = f": {results['phases'][name]['error']}" if status != "ok" else ""
        print(f"gpu_check: {name}: {status} in {seconds:.1f} s{note}", flush=True)


# ---------------------------------------------------------------- main


def write_config(work: Path, tiny: bool, third_party: tuple[str, ...]) -> dict:
    """WORK/config.json, which every phase reads; returned as a dict for the results."""
    work.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(CheckConfig(work=str(work), tiny=tiny, third_party=third_party,
                                            data_workers=os.cpu_count() or 1,
                                            **(TINY if tiny else GPU)))
    (work / "config.json").write_text(json.dumps(config, indent=2))
    return config


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    started = time.monotonic()
    mode = "tiny" if args.tiny else "gpu"
    deadline = started + (args.deadline or DEADLINE_S[mode] * args.scale)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check.cpu-dryrun" if args.tiny else "gpu_check"
    out, log = out_dir / f"{stem}.json", out_dir / f"{stem}.log"
    found = needed_modules()
    report = import_report(found)
    if args.list_imports:
        print("\n".join(report["third_party"].values()))
        return 0
    results = {"check": "gpu_check", "mode": "cpu-dryrun" if args.tiny else "gpu",
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "deadline_s": round(deadline - started), "imports": report, "phases": {},
               "status": "running"}  # what a run killed from outside leaves
    problem = missing_line(report)
    if problem:
        write_json(out, {**results, "status": "missing-modules"})
        print(problem, file=sys.stderr)
        return 2
    budgets = {name: s * args.scale for name, s in BUDGETS[mode].items()}
    names = [n for n in budgets if not args.phases or n in args.phases.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="chexops-gpu-check-"))
    results["config"] = write_config(work, args.tiny, tuple(report["third_party"]))
    log.write_text("")
    try:
        run_all(names, budgets, work, deadline, results, out, log)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["summary"] = gpu_summary.summary(results)
    results["status"] = gpu_summary.status(results)
    write_json(out, results)
    print("\n".join(gpu_summary.lines(results)), flush=True)
    print(f"gpu_check: wrote {out} ({results['status']}, {results['elapsed_s']} s)", flush=True)
    return 0 if results["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
