"""The `clean` stage: train.csv + valid.csv -> one clean label table (the seed's prep_data).

Adds `valid` and `patient`, fills blanks with 0, applies each observation's uncertainty
policy to the training split, filters views / sex / age, checks every image path and
header against the decoder's policy (chexops.data.decode: transparency is dropped, colour is
counted) or, with clean.image_check: full, decodes every image, and records label counts
before and after. A blank Sex or Age is kept as unknown and counted; an active sex or age
filter drops such rows (their value cannot be known to pass) and the metrics say how many.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chexops.config import OBSERVATIONS, Params
from chexops.data.decode import ImageProblem, decode_image
from chexops.data.schema import CSV_COLUMNS, LABEL_VALUES
from chexops.data.zipimages import ZipImages, check_images, check_member_path, find_root
from chexops.errors import ChexopsError

STAGE = "clean"
# Demographics feed only the filters here and evaluate's subgroups, so a blank one is kept as
# unknown: Sex reads as CheXpert's own "Unknown", Age as missing (NaN).
DEMOGRAPHICS = ("Sex", "Age")
SEX_VALUES = ("Male", "Female", "Unknown")     # CheXpert's; matched without regard to case
UNKNOWN_SEX = "Unknown"
_PATIENT = re.compile(r"/(patient\d+)/")


# ---------------------------------------------------------------- reading and validating

def parse_csv(data: bytes, name: str, fill_meta: bool = False) -> pd.DataFrame:
    """A CheXpert CSV as a frame (labels float, NaN = blank); clear errors for bad files.

    `fill_meta` (a test.csv): Stanford's released test labels carry Path and the observations
    only, so a missing Sex / Age is unknown, AP/PA blank, Frontal/Lateral read from the file name."""
    if not data.strip():
        raise ChexopsError(f"{name} is empty; restore the CheXpert CSV (header + one row per image)")
    df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    if fill_meta and "Path" in df.columns:
        df = fill_missing_meta(df)
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ChexopsError(f"{name}: missing required column {missing[0]!r}; "
                           f"the CSV needs the 19 CheXpert columns ({', '.join(CSV_COLUMNS[:5])}, ...)")
    if df.empty:
        raise ChexopsError(f"{name} has a header but no rows; restore the CheXpert CSV")
    for col in OBSERVATIONS:
        df[col] = parse_labels(df[col], col, name)
    df = parse_demographics(df, name)
    dup = df["Path"].duplicated()
    if dup.any():
        raise ChexopsError(f"{name}: duplicate path {df.loc[dup, 'Path'].iloc[0]}; "
                           f"each image must appear once, remove the repeated row")
    return df


def fill_missing_meta(df: pd.DataFrame) -> pd.DataFrame:
    """Blank Sex / Age / AP/PA and Frontal/Lateral from `_frontal` / `_lateral` in the file
    name, for the meta columns a CSV lacks."""
    fill = {"Sex": "", "Age": "", "AP/PA": "",
            "Frontal/Lateral": np.where(df["Path"].str.contains("lateral", case=False),
                                        "Lateral", "Frontal")}
    return df.assign(**{col: value for col, value in fill.items() if col not in df.columns})


def parse_demographics(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Age as a number (NaN when blank) and Sex as Male / Female / Unknown (blank -> Unknown);
    a value that is neither blank nor valid is a one-line error naming its row."""
    text = df["Age"].str.strip()
    age = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad = (text != "") & ~np.isfinite(age)
    if bad.any():
        row = df.loc[bad, ["Path", "Age"]].iloc[0]
        raise ChexopsError(f"{name}: non-numeric Age {row['Age']!r} for {row['Path']}; "
                           f"fix the Age column (whole years, or blank when unknown)")
    sex = df["Sex"].str.strip()
    canonical = sex.str.lower().map({v.lower(): v for v in SEX_VALUES})
    bad = (sex != "") & canonical.isna()
    if bad.any():
        row = df.loc[bad, ["Path", "Sex"]].iloc[0]
        raise ChexopsError(f"{name}: Sex {row['Sex']!r} for {row['Path']} is not "
                           f"{', '.join(SEX_VALUES)} or blank; fix the Sex column")
    return df.assign(Age=age, Sex=canonical.fillna(UNKNOWN_SEX).astype(df["Sex"].dtype))


def parse_labels(col: pd.Series, column: str, name: str) -> pd.Series:
    """1 / 0 / -1 / blank only."""
    text = col.str.strip()
    values = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad = (text != "") & ~values.isin(LABEL_VALUES)
    if bad.any():
        raise ChexopsError(f"{name}: label {text[bad].iloc[0]!r} in column {column!r} is not one of "
                           f"1, 0, -1 or blank; fix the CSV")
    return values


def read_split_csvs(zip_path: Path) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """(root folder, train rows, valid rows, test rows or None) from the CheXpert zip; test.csv
    (a held-out labelled test set beside train.csv and valid.csv) is optional."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (FileNotFoundError, zipfile.BadZipFile) as exc:
        raise ChexopsError(f"{zip_path}: cannot open ({exc.__class__.__name__}); "
                           f"run `dvc repro download`") from None
    with zf:
        root = find_root(zf.namelist())
        if root is None:
            raise ChexopsError(f"{zip_path} has no CheXpert train.csv and valid.csv; "
                               f"run `dvc repro download` with a CheXpert source")
        frames = [parse_csv(zf.read(f"{root}/{s}.csv"), f"{s}.csv") for s in ("train", "valid")]
        test = (parse_csv(zf.read(f"{root}/test.csv"), "test.csv", fill_meta=True)
                if f"{root}/test.csv" in zf.namelist() else None)
    return root, frames[0], frames[1], test


# ---------------------------------------------------------------- transforming

def patient_of(path: str) -> str:
    m = _PATIENT.search(path)
    if m is None:
        raise ChexopsError(f"image path {path!r} names no patient folder (patientNNNNN); "
                           f"fix the CSV paths to the CheXpert layout")
    return m.group(1)


def combine(train: pd.DataFrame, valid: pd.DataFrame, root: str,
            test: pd.DataFrame | None = None) -> pd.DataFrame:
    """One table with `split` (train / valid / test), `valid` and `patient`; every path checked
    to stay under the data root, and no test patient in train or valid (a held-out cohort that
    shares patients with training would score memory, not generalisation)."""
    parts = [train.assign(split="train"), valid.assign(split="valid")]
    if test is not None:
        parts.append(test.assign(split="test"))
    df = pd.concat(parts, ignore_index=True)
    df["valid"] = df["split"] == "valid"
    for p in df["Path"]:
        check_member_path(p, root)
    df["patient"] = [patient_of(p) for p in df["Path"]]
    dup = df["Path"].duplicated()
    if dup.any():
        raise ChexopsError(f"path {df.loc[dup, 'Path'].iloc[0]} is in more than one of train.csv, "
                           f"valid.csv, test.csv; each image must belong to one split")
    held = df["split"] == "test"
    shared = set(df.loc[held, "patient"]) & set(df.loc[~held, "patient"])
    if shared:
        raise ChexopsError(f"test.csv patient {min(shared)} is also in train.csv or valid.csv; "
                           f"a held-out test cohort must share no patient with them")
    return df


def filter_masks(df: pd.DataFrame, params: Params) -> dict[str, pd.Series]:
    """{"views" | "Sex" | "Age": the rows that filter keeps} (all True when it is off). An
    unknown Sex or Age fails an active sex or age filter: it cannot be known to pass."""
    c = params.clean
    views = pd.Series(True, index=df.index)
    if c.views != "all":
        views &= df["Frontal/Lateral"].str.lower() == "frontal"
    if c.views in ("ap", "pa"):
        views &= df["AP/PA"].str.upper() == c.views.upper()
    sex = df["Sex"].str.lower() == c.sex if c.sex != "all" else pd.Series(True, index=df.index)
    age = pd.Series(True, index=df.index)
    if c.age_min is not None:
        age &= df["Age"] >= c.age_min       # NaN (unknown) compares False
    if c.age_max is not None:
        age &= df["Age"] <= c.age_max
    return {"views": views, "Sex": sex, "Age": age}


def filter_rows(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """View, sex and age filters (both splits, so validation matches the training population)."""
    keep = np.logical_and.reduce(list(filter_masks(df, params).values()))
    return df[keep].reset_index(drop=True)


def unknown_masks(df: pd.DataFrame) -> dict[str, pd.Series]:
    """{demographic: rows where it is unknown}."""
    return {"Sex": df["Sex"] == UNKNOWN_SEX, "Age": df["Age"].isna()}


def splits_of(df: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """(split, its rows) for train, valid and, when the data has one, test."""
    names = ["train", "valid"] + (["test"] if "test" in set(df["split"]) else [])
    return [(name, df["split"] == name) for name in names]


def unknown_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {demographic: rows where it is unknown}}."""
    return {split: {field: int((unknown & part).sum()) for field, unknown in unknown_masks(df).items()}
            for split, part in splits_of(df)}


def unknown_filtered(df: pd.DataFrame, params: Params) -> dict[str, int]:
    """{demographic: rows that pass every other filter and are dropped by its own filter only
    because it is unknown}; 0 when that filter is off."""
    masks, unknown = filter_masks(df, params), unknown_masks(df)
    out = {}
    for field in DEMOGRAPHICS:
        others = np.logical_and.reduce([m for k, m in masks.items() if k != field])
        out[field] = int((others & unknown[field] & ~masks[field]).sum())
    return out


def whole_years(age: pd.Series) -> pd.Series:
    """int64 ages when every known one is whole (nullable Int64 when some are unknown), else as is."""
    if not (age.dropna() % 1 == 0).all():
        return age
    return age.astype("Int64" if age.isna().any() else "int64")


def apply_policies(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Blank -> 0; -1 per observation policy on train rows; valid and test rows (expert reads)
    end as 0/1 only."""
    out = df.copy()
    train = (out["split"] == "train").to_numpy()
    for obs in OBSERVATIONS:
        y = out[obs].fillna(0.0).to_numpy(dtype=float, copy=True)
        policy = params.uncertainty_policy(obs)
        unc = y == -1
        if policy == "zeros":
            y[unc & train] = 0
        elif policy == "ones":
            y[unc & train] = 1
        y[unc & ~train] = 0        # expert labels hold no -1; if one does, U-Zeros it
        out[obs] = y.astype(np.int8)
    return out


def label_counts(df: pd.DataFrame, targets: tuple[str, ...]) -> dict[str, Any]:
    """{split: {target: {"1": n, "0": n, "-1": n, "blank": n}}} (blank only before cleaning)."""
    out: dict[str, Any] = {}
    for split, rows in splits_of(df):
        part = df[rows]
        out[split] = {}
        for t in targets:
            col = part[t]
            counts = {str(int(v)): int((col == v).sum()) for v in (1, 0, -1)}
            if col.isna().any() or col.dtype.kind == "f":
                counts["blank"] = int(col.isna().sum())
            out[split][t] = counts
    return out


def decode_failures(zip_path: Path, paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) for every image the decoder (chexops.data.decode) refuses on a full decode:
    truncated or corrupt data the header check lets through, float or deep images outside the
    range they declare. Slow: every image is decompressed."""
    bad: list[tuple[str, str]] = []
    with ZipImages(zip_path) as zi:
        for p in paths:
            try:
                with zi.zf.open(p) as fh:
                    decode_image(fh)
            except ImageProblem as exc:
                bad.append((p, f"undecodable: {exc.problem}"))
    return bad


def drop_bad_images(df: pd.DataFrame, zip_path: Path, max_bad: float,
                    full: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(rows with readable images, report of the bad ones, images stored in colour); error above
    `max_bad` share. Images the decoder's policy refuses (transparency) are bad images too.

    `full` decodes every image that passes the header check (clean.image_check: full)."""
    found, colour = check_images(zip_path, df["Path"].tolist())
    if full:
        flagged = {p for p, _ in found}
        found += decode_failures(zip_path, [p for p in df["Path"] if p not in flagged])
    bad = pd.DataFrame(found, columns=["Path", "reason"])
    share = len(bad) / max(len(df), 1)
    if share > max_bad:
        examples = ", ".join(f"{p} ({r})" for p, r in found[:3])
        raise ChexopsError(f"{len(bad)} of {len(df)} images ({share:.1%}) are missing, unreadable "
                           f"or refused, above clean.max_bad_fraction={max_bad}; repair the data "
                           f"(e.g. {examples}) or raise clean.max_bad_fraction")
    return df[~df["Path"].isin(bad["Path"])].reset_index(drop=True), bad, colour


def clean_table(zip_path: Path, params: Params) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(labels table, bad-image report, metrics) from the zip; the table's `split` column says
    train / valid / test (the held-out cohort, when the data has a test.csv: `split_test`)."""
    root, train, valid, test = read_split_csvs(zip_path)
    df = combine(train, valid, root, test)
    metrics: dict[str, Any] = {"rows_before": split_rows(df),
                               "labels_before": label_counts(df, params.targets),
                               "unknown_before": unknown_counts(df),
                               "unknown_filtered": unknown_filtered(df, params)}
    df = filter_rows(df, params)
    df, bad, colour = drop_bad_images(df, zip_path, params.clean.max_bad_fraction,
                                      full=params.clean.image_check == "full")
    for split, n in split_rows(df).items():
        if n == 0 and split != "test":
            raise ChexopsError(f"no {split} rows left after the clean filters; "
                               f"relax clean.views / clean.sex / clean.age_min / clean.age_max")
    df = apply_policies(df, params)
    df["AP/PA"] = df["AP/PA"].fillna("")
    df["Age"] = whole_years(df["Age"])
    metrics.update(rows_after=split_rows(df), bad_images=len(bad), colour_images=colour,
                   labels_after=label_counts(df, params.targets), unknown_after=unknown_counts(df))
    columns = [*CSV_COLUMNS, "split", "valid", "patient"]
    return df[columns], bad, metrics


def split_test(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train + valid labels, held-out test labels) of a clean table: the rounds read the first
    only, so nothing they select on can see the test cohort."""
    held = df["split"] == "test"
    labels = df[~held].drop(columns="split").reset_index(drop=True)
    test = df[held].drop(columns=["split", "valid"]).reset_index(drop=True)
    return labels, test


def split_rows(df: pd.DataFrame) -> dict[str, int]:
    return {split: int(rows.sum()) for split, rows in splits_of(df)}


def print_counts(metrics: dict) -> None:
    for when in ("labels_before", "labels_after"):
        for split, per_target in metrics[when].items():
            for target, counts in per_target.items():
                text = ", ".join(f"{k}: {v}" for k, v in counts.items())
                print(f"clean {when.split('_')[1]:6s} {split:5s} {target}: {text}")
    rows = metrics["rows_after"]
    test = f" + {rows['test']} held-out test" if "test" in rows else ""
    print(f"clean: {rows['train']} train + {rows['valid']} valid{test} rows kept, "
          f"{metrics['bad_images']} bad images dropped")
    if metrics["colour_images"]:
        print(f"clean: warning: {metrics['colour_images']} images are stored in colour; they are "
              f"read as their luminance (greyscale), as predict reads them")
    kept = {f: sum(split[f] for split in metrics["unknown_after"].values()) for f in DEMOGRAPHICS}
    if any(kept.values()):
        print("clean: kept " + ", ".join(f"{n} rows with unknown {f}" for f, n in kept.items())
              + " (the `unknown` subgroup in evaluate)")
    for field, n in metrics["unknown_filtered"].items():
        if n:
            knob = "clean.sex" if field == "Sex" else "clean.age_min / clean.age_max"
            print(f"clean: {knob} dropped {n} rows whose {field} is unknown (blank in the CSV)")
