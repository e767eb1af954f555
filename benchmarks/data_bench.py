"""Data benchmark: synthetic generation speed, and clean + resample time and memory.

    python benchmarks/data_bench.py                   # small: 5,000 rows, under a minute
    python benchmarks/data_bench.py --scale chexpert  # 223,414 + 234 rows with images (minutes)
        [--images realistic|tiny] [--rows N] [--patients 300] [--out FILE]

The CheXpert-shaped zip holds, with `--images realistic` (the default), a distinct JPEG the size
of CheXpert-small's for every row (benchmarks/fake_jpegs.py: ~50 KB, ~11 GB at CheXpert scale);
with `--images tiny`, one 64 x 56 JPEG repeated for every row (the old, 544 MB zip). The JSON
records the zip's bytes, so per-byte costs show. clean + resample run in a fresh interpreter so
that its peak resident memory (ru_maxrss) is theirs alone.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fake_jpegs  # noqa: E402
from machine import machine  # noqa: E402

SCALES = {"small": {"rows": 5_000}, "chexpert": {"rows": 223_414}}
SEED_COUNTS = (27_000, 11_116, 8_087, 177_211)   # Cardiomegaly 1 / 0 / -1 / blank at 223,414 rows


def bench_synthetic(patients: int, workers: int) -> dict:
    from chexops.config import SyntheticConfig
    from chexops.data.synthetic.generate import generate_zip

    cfg = SyntheticConfig(train_patients=patients, valid_patients=max(patients // 10, 1), workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        truth = generate_zip(cfg, 0, Path(tmp) / "s.zip", Path(tmp) / "t.parquet")
        seconds = time.perf_counter() - start
        size = (Path(tmp) / "s.zip").stat().st_size
    return {"images": len(truth), "workers": workers, "width": cfg.width, "height": cfg.height,
            "seconds": seconds, "images_per_s": len(truth) / seconds,
            "images_per_s_per_core": len(truth) / seconds / workers, "zip_mb": size / 2**20}


def scaled_counts(rows: int) -> list[int]:
    counts = [round(c * rows / sum(SEED_COUNTS)) for c in SEED_COUNTS]
    counts[-1] += rows - sum(counts)
    return counts


def tiny_jpegs(n: int) -> Iterator[bytes]:
    """One 64 x 56 JPEG, n times (the old mode: the zip's bytes are far below CheXpert's)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 56), np.uint8)).save(buf, "JPEG")
    for _ in range(n):
        yield buf.getvalue()


def build_scale_zip(path: Path, rows: int, images: str = "realistic", workers: int = 2) -> dict:
    """CheXpert-shaped zip: `rows` train + 234 valid rows, each with its JPEG (`images`:
    realistic or tiny, see the module doc). Returns the mode and the zip's and JPEGs' bytes."""
    from chexops.config import OBSERVATIONS
    from chexops.data.schema import CSV_COLUMNS

    rng = np.random.default_rng(1)
    labels = np.repeat(["1.0", "0.0", "-1.0", ""], scaled_counts(rows))[rng.permutation(rows)]
    blanks = "," * (len(OBSERVATIONS) - 1)
    cardio_at = OBSERVATIONS.index("Cardiomegaly")

    def line(split, i, label):
        obs = blanks.split(",")
        obs[cardio_at] = label
        path = f"CheXpert-v1.0-small/{split}/patient{i // 3 + 1:05d}/study1/view{i % 3 + 1}_frontal.jpg"
        return f"{path},Female,60,Frontal,AP," + ",".join(obs)

    train = [line("train", i, lab) for i, lab in enumerate(labels)]
    valid = [line("valid", rows * 3 + i, "1.0" if i % 3 == 0 else "0.0") for i in range(234)]
    with zipfile.ZipFile(path, "w") as zf:
        for split, lines in (("train", train), ("valid", valid)):
            zf.writestr(f"CheXpert-v1.0-small/{split}.csv", "\n".join([",".join(CSV_COLUMNS), *lines]) + "\n",
                        compress_type=zipfile.ZIP_DEFLATED)
        n = len(train) + len(valid)
        jpegs = fake_jpegs.jpegs(n, 0, workers) if images == "realistic" else tiny_jpegs(n)
        jpeg_bytes = 0
        for text, data in zip(train + valid, jpegs):
            zf.writestr(text.split(",", 1)[0], data)
            jpeg_bytes += len(data)
    return {"images": images, "jpeg_count": n, "jpeg_bytes": jpeg_bytes,
            "mean_jpeg_bytes": jpeg_bytes / n, "zip_bytes": path.stat().st_size}


def measure(zip_path: str) -> None:
    """Child process: the clean and resample stages' work, timed; prints JSON."""
    sys.path.insert(0, str(HERE.parent))
    from chexops.data.clean import clean_table
    from chexops.data.resample import resample_frame, split_frames
    from tests.helpers import make_params

    params = make_params()
    t0 = time.perf_counter()
    df, bad, _ = clean_table(Path(zip_path), params)
    t1 = time.perf_counter()
    train, valid = split_frames(df)
    over = resample_frame(train, "Cardiomegaly", "oversample", 0.3, 42)
    under = resample_frame(train, "Cardiomegaly", "undersample", 1.0, 42)
    t2 = time.perf_counter()
    print(json.dumps({"rows": len(df), "bad_images": len(bad), "clean_s": t1 - t0,
                      "resample_s": t2 - t1, "total_s": t2 - t0, "oversample_0.3_rows": len(over),
                      "undersample_rows": len(under),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_clean_resample(rows: int, images: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "chexpert.zip"
        start = time.perf_counter()
        built = build_scale_zip(zip_path, rows, images, workers)
        build_s = time.perf_counter() - start
        out = subprocess.run([sys.executable, __file__, "--measure", str(zip_path)], check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    return {"train_rows": rows, "zip_build_s": build_s, **built, **measured,
            "zip_mb_per_s": built["zip_bytes"] / 2**20 / measured["total_s"]}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--rows", type=int, help="train rows (default: the scale's)")
    parser.add_argument("--images", choices=("realistic", "tiny"), default="realistic",
                        help="JPEG bytes in the zip (module doc)")
    parser.add_argument("--patients", type=int, default=300, help="synthetic train patients")
    parser.add_argument("--workers", type=int, default=2,
                        help="synthetic worker processes (also runs 1); processes making the zip")
    parser.add_argument("--out", default=str(HERE / "results/data_bench.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure)
        return None
    rows = args.rows or SCALES[args.scale]["rows"]
    result = {"machine": machine(),
              "synthetic": [bench_synthetic(args.patients, w) for w in sorted({1, args.workers})],
              "clean_resample": bench_clean_resample(rows, args.images, args.workers),
              "scale": args.scale if args.rows is None else f"{rows} rows"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
