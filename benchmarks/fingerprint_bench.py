"""The source fingerprint's cost at CheXpert scale: a CheXpert-v1.0-small-shaped folder of
223,414 + 234 (empty) image files in 64,540 + 200 patient folders. Timed: the first
fingerprint (a full walk, which writes the listing memo), then an unchanged source in process
(`folder_fingerprint`: stats only) and as the whole `chexops source-fingerprint` command (Python
start included), each the best of `--repeats`, wall and CPU seconds (the CPU figure is what a
busy shared machine cannot inflate); `find` over the same tree for scale; and the md5 rate a
replaced zip is re-hashed at. Writes benchmarks/results/fingerprint_bench.json.

    python benchmarks/fingerprint_bench.py [--train 223414] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "src")]

from chexops.data.fingerprint import folder_fingerprint  # noqa: E402
from chexops.hashing import file_md5  # noqa: E402

TRAIN_PATIENTS, VALID_PATIENTS = 64_540, 200


def build_folder(dest: Path, train: int, valid: int = 234) -> int:
    """CheXpert-v1.0-small/{train,valid}.csv and <split>/patientNNNNN/studyK/view1_frontal.jpg,
    ~3.5 images per patient as in CheXpert, one per study folder (more folders than CheXpert's
    187,641 studies: an upper bound on the walk)."""
    root = dest / "CheXpert-v1.0-small"
    count = 0
    for split, images, patients, first in (("train", train, TRAIN_PATIENTS, 1),
                                           ("valid", valid, VALID_PATIENTS, TRAIN_PATIENTS + 1)):
        for i in range(images):
            patient, rest = first + i % patients, i // patients
            study = root / split / f"patient{patient:05d}" / f"study{rest + 1}"
            study.mkdir(parents=True, exist_ok=True)
            (study / "view1_frontal.jpg").touch()
            count += 1
    for split in ("train", "valid"):
        (root / f"{split}.csv").write_text("Path,Sex,Age\n")
    return count


def cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> dict[str, float]:
    wall, cpu = time.perf_counter(), cpu_s()
    fn()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_s() - cpu}


def best_of(repeats: int, fn) -> dict[str, float]:
    runs = [timed(fn) for _ in range(repeats)]
    return {key: min(r[key] for r in runs) for key in runs[0]}


def command(folder: Path, root: Path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(folder)
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "chexops", "--root", str(root), "source-fingerprint"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return lambda: subprocess.run(cmd, check=True, env=env, capture_output=True)


def md5_mb_per_s(tmp: Path, mb: int = 512) -> float:
    path = tmp / "blob.zip"
    with path.open("wb") as fh:
        for _ in range(mb):
            fh.write(os.urandom(1 << 20))
    return mb / best_of(2, lambda: file_md5(path))["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=223_414)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None,
                        help="build the tree here, or reuse the one there (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        user = (args.folder or tmp) / "user"
        start, reused = time.perf_counter(), user.exists()
        files = args.train + 234 if reused else build_folder(user, args.train)
        built = None if reused else time.perf_counter() - start
        memo = tmp / "memo.tsv"
        first = timed(lambda: folder_fingerprint(user, memo))
        assert folder_fingerprint(user, memo)["files"] == files + 2
        run_command = command(user, tmp / "repo")
        first_command = timed(run_command)    # the repo's own memo: a full walk
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "load_avg_1min": os.getloadavg()[0]},
            "image_files": files, "folders": sum(1 for _ in user.rglob("*/")),
            "build_s": built,
            "first_walk": first, "first_command": first_command,
            "unchanged_in_process": best_of(args.repeats, lambda: folder_fingerprint(user, memo)),
            "unchanged_command": best_of(args.repeats, run_command),
            "find_s": timed(lambda: subprocess.run(["find", str(user), "-printf", "%s %T@\n"],
                                                   check=True, capture_output=True))["wall_s"],
            "md5_mb_per_s": md5_mb_per_s(tmp),
            "goal": "unchanged source <= 5 s",
        }
        result["zip_11gb_rehash_s_estimate"] = 11 * 1024 / result["md5_mb_per_s"]
    out = HERE / "results" / "fingerprint_bench.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
