"""The synthetic CheXpert: a zip laid out exactly like CheXpert-v1.0-small, plus a truth table.

A latent cohort (patients -> studies -> views) is drawn first with one seeded generator; the
images are then rendered in parallel, each from its own seed (seed, patient, study, view), so
the output does not depend on the number of workers. The zip is byte-for-byte reproducible:
entries in sorted order, fixed timestamps and attributes, JPEGs stored, CSVs deflated.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from chexops import atomic
from chexops.config import OBSERVATIONS, TEST_FIRST_PATIENT, SyntheticConfig
from chexops.data.schema import CHEXPERT_ROOTS, CSV_COLUMNS, META_COLUMNS
from chexops.data.synthetic import labeler, phantom

ROOT = CHEXPERT_ROOTS[0]
VALID_ROWS_PER_PATIENT = 234 / 70   # the real valid.csv: 234 rows; default 70 valid patients
VALID_CTR_SHIFT = 0.03              # the expert-read valid set is enriched, as CheXpert's is
AP_SHARE = 0.80                     # most CheXpert frontals are portable AP films
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------- the latent cohort

def draw_patients(rng: np.random.Generator, n: int, first_id: int, valid: bool) -> pd.DataFrame:
    """Age, sex, thorax size and cardiothoracic ratio; the CTR grows with age, women's a bit higher."""
    female = rng.random(n) < 0.41
    age = np.clip(np.round(rng.normal(61, 17, n)), 18, 90).astype(int)
    ctr = (0.433 + 0.0012 * (age - 60) + 0.012 * female + rng.normal(0, 0.052, n)
           + (VALID_CTR_SHIFT if valid else 0.0))
    return pd.DataFrame({"patient_id": np.arange(first_id, first_id + n), "female": female,
                         "age": age, "thorax": np.clip(rng.normal(0.78, 0.025, n), 0.7, 0.86),
                         "ctr": np.clip(ctr, 0.30, 0.72), "valid": valid})


def draw_studies(rng: np.random.Generator, patients: pd.DataFrame, mean_studies: float,
                 lateral_fraction: float) -> pd.DataFrame:
    """Studies per patient (1 + Poisson), each with its findings, devices and views."""
    counts = 1 + rng.poisson(max(mean_studies - 1.0, 0.0), len(patients))
    st = patients.loc[np.repeat(patients.index.to_numpy(), counts)].reset_index(drop=True)
    st["study"] = st.groupby("patient_id").cumcount() + 1
    n = len(st)
    st["ctr"] = np.clip(st["ctr"] + rng.normal(0, 0.008, n), 0.30, 0.72)
    st["ap"] = rng.random(n) < AP_SHARE
    big = (st["ctr"] > labeler.CTR_THRESHOLD).to_numpy()
    st["effusion_truth"] = rng.random(n) < np.where(big, 0.60, 0.38)
    st["effusion"] = np.where(st["effusion_truth"], rng.uniform(0.05, 0.16, n), 0.0)
    st["effusion_side"] = rng.integers(-1, 2, n)
    st["edema_truth"] = rng.random(n) < np.where(big, 0.45, 0.24)
    st["edema"] = np.where(st["edema_truth"], rng.uniform(0.5, 1.0, n), 0.0)
    st["devices_truth"] = rng.random(n) < np.where(st["ap"], 0.66, 0.12)
    st["devices"] = np.where(st["devices_truth"], rng.integers(1, 16, n), 0)
    st["lateral"] = rng.random(n) < lateral_fraction
    return st


def report_labels(rng: np.random.Generator, st: pd.DataFrame, valid: bool) -> pd.DataFrame:
    """The 14 observation columns (float, NaN = blank) and their truth, per study; `valid`:
    expert reads (validation and test), else the report labeler's (train)."""
    n = len(st)
    labels: dict[str, np.ndarray] = {}
    truth: dict[str, np.ndarray] = {}
    ctr = st["ctr"].to_numpy()
    truth["Cardiomegaly"] = ctr > labeler.CTR_THRESHOLD
    visible = {"Edema": "edema_truth", "Pleural Effusion": "effusion_truth",
               "Support Devices": "devices_truth"}
    for name, col in visible.items():
        truth[name] = st[col].to_numpy()
    for name in labeler.LABEL_ONLY:
        labels[name], truth[name] = labeler.label_only(rng, n, name)
    if valid:   # expert reads: 0/1 only, the CTR measured with a little error
        read = ctr + rng.normal(0, 0.01, n)
        labels = {k: v.astype(float) for k, v in truth.items()}
        labels["Cardiomegaly"] = (read > labeler.CTR_THRESHOLD).astype(float)
    else:
        labels["Cardiomegaly"] = labeler.cardiomegaly_report(rng, ctr)
        for name in visible:
            labels[name] = labeler.visible_report(rng, truth[name], name)
    labels["No Finding"] = labeler.no_finding(labels)
    truth["No Finding"] = ~np.any([t for k, t in truth.items() if k != "Support Devices"], axis=0)
    if valid:
        labels["No Finding"] = np.nan_to_num(labels["No Finding"], nan=0.0)
    out = pd.DataFrame({name: labels[name] for name in OBSERVATIONS})
    for name in OBSERVATIONS:
        out[f"truth_{name}"] = truth[name].astype(np.int8)
    return out


def expand_views(st: pd.DataFrame, split: str) -> pd.DataFrame:
    """One row per image: view1 frontal always, view2 lateral when the study has one."""
    frontal = st.assign(view="frontal", view_no=1)
    lateral = st[st["lateral"]].assign(view="lateral", view_no=2)
    rows = pd.concat([frontal, lateral]).sort_values(["patient_id", "study", "view_no"])
    rows["Path"] = [f"{ROOT}/{split}/patient{p:05d}/study{s}/view{v}_{name}.jpg" for p, s, v, name
                    in zip(rows["patient_id"], rows["study"], rows["view_no"], rows["view"])]
    return rows.reset_index(drop=True)


def build_test_cohort(cfg: SyntheticConfig) -> pd.DataFrame:
    """The held-out test cohort: its own generator (test_seed), patient ids from CheXpert's
    test numbering, one study each (CheXpert's test set: one study per patient) and expert reads
    drawn like validation's, so test minus validation AUROC measures selection optimism alone."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.test_seed, 20190102]))
    patients = draw_patients(rng, cfg.test_patients, TEST_FIRST_PATIENT, valid=True)
    st = draw_studies(rng, patients, 1.0, cfg.lateral_fraction)
    st = pd.concat([st, report_labels(rng, st, valid=True)], axis=1)
    return expand_views(st, "test").assign(split="test")


def build_cohort(cfg: SyntheticConfig, seed: int) -> pd.DataFrame:
    """Every image row of train, valid, then test, with CSV columns and latent state; train and
    valid come from `seed` alone, so adding or resizing the test cohort leaves them unchanged."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 20190101]))
    valid_mean = max(VALID_ROWS_PER_PATIENT / (1 + cfg.lateral_fraction), 1.0)
    parts = []
    first = 1
    for split, n, mean in (("train", cfg.train_patients, cfg.studies_per_patient),
                           ("valid", cfg.valid_patients, valid_mean)):
        patients = draw_patients(rng, n, first, split == "valid")
        st = draw_studies(rng, patients, mean, cfg.lateral_fraction)
        st = pd.concat([st, report_labels(rng, st, split == "valid")], axis=1)
        parts.append(expand_views(st, split).assign(split=split))
        first += n
    if cfg.test_patients:
        parts.append(build_test_cohort(cfg))
    rows = pd.concat(parts, ignore_index=True)
    rows["Sex"] = np.where(rows["female"], "Female", "Male")
    rows["Age"] = rows["age"]
    rows["Frontal/Lateral"] = np.where(rows["view"] == "frontal", "Frontal", "Lateral")
    rows["AP/PA"] = np.where(rows["view"] == "frontal", np.where(rows["ap"], "AP", "PA"), "")
    return rows


# ---------------------------------------------------------------- files

def csv_bytes(rows: pd.DataFrame) -> bytes:
    """The CheXpert CSV: 19 columns, labels written 1.0 / 0.0 / -1.0 / blank."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    labels = rows[list(OBSERVATIONS)].to_numpy(dtype=float)
    meta = rows[list(META_COLUMNS)].itertuples(index=False)
    for m, lab in zip(meta, labels):
        writer.writerow([*m, *("" if np.isnan(x) else f"{x:.1f}" for x in lab)])
    return buf.getvalue().encode()


def truth_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Path -> latent CTR (true and as the film shows it) and the true label of each observation."""
    apparent = rows["ctr"] * np.where(rows["ap"] & (rows["view"] == "frontal"),
                                      phantom.AP_HEART_MAGNIFICATION, 1.0)
    out = pd.DataFrame({"Path": rows["Path"], "split": rows["split"],
                        "patient": [f"patient{p:05d}" for p in rows["patient_id"]],
                        "study": rows["study"], "view": rows["view"], "ap": rows["ap"],
                        "ctr": rows["ctr"].round(6), "apparent_ctr": apparent.round(6)})
    for name in OBSERVATIONS:
        out[name] = rows[f"truth_{name}"].astype(np.int8)
    return out


def image_jobs(rows: pd.DataFrame, cfg: SyntheticConfig, seed: int) -> list[tuple]:
    """(path, state, seed tuple, h, w, quality) per image, in zip (sorted path) order."""
    jobs = []
    for r in rows.sort_values("Path").itertuples(index=False):
        state = phantom.ViewState(view=r.view, ap=bool(r.ap), ctr=float(r.ctr),
                                  thorax=float(r.thorax), effusion=float(r.effusion),
                                  effusion_side=int(r.effusion_side), edema=float(r.edema),
                                  devices=int(r.devices), age=float(r.age), female=bool(r.female))
        key = (cfg.test_seed if r.split == "test" else seed, int(r.patient_id), int(r.study),
               int(r.view_no))
        jobs.append((r.Path, state, key, cfg.height, cfg.width, cfg.jpeg_quality))
    return jobs


def render_job(job: tuple) -> tuple[str, bytes]:
    path, state, key, h, w, quality = job
    return path, phantom.encode_jpeg(phantom.render(state, h, w, key), quality)


def rendered(jobs: list[tuple], workers: int) -> Iterator[tuple[str, bytes]]:
    """Images in job order; with workers > 1 from a process pool (same bytes either way)."""
    if workers <= 1 or len(jobs) < 64:
        yield from map(render_job, jobs)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(render_job, jobs, chunksize=16)


def zip_info(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.compress_type = compress
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


def write_zip(path: Path, rows: pd.DataFrame, jobs: list[tuple], workers: int) -> None:
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for split in SPLITS:  # 'train.csv' sorts before 'train/'
            if split not in set(rows["split"]):
                continue
            data = csv_bytes(rows[rows["split"] == split])
            zf.writestr(zip_info(f"{ROOT}/{split}.csv", zipfile.ZIP_DEFLATED), data,
                        compresslevel=6)
        for name, data in rendered(jobs, workers):
            zf.writestr(zip_info(name, zipfile.ZIP_STORED), data)


def generate_zip(cfg: SyntheticConfig, seed: int, zip_path: str | Path,
                 truth_path: str | Path) -> pd.DataFrame:
    """Write the synthetic CheXpert zip and its truth table (both atomically); return the truth."""
    rows = build_cohort(cfg, seed)
    jobs = image_jobs(rows, cfg, seed)
    with atomic.atomic_path(zip_path, ".zip") as tmp:
        write_zip(tmp, rows, jobs, cfg.workers)
    truth = truth_table(rows)
    atomic.write_parquet(truth_path, truth)
    return truth
