"""Resampling: the seed study's contract numbers on a CheXpert-sized CSV, and the stage."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from chexops.data import clean, resample
from chexops.data.resample import resample_frame
from chexops.errors import ChexopsError
from chexops.stages import resample as resample_stage
from tests.helpers import chexpert_rows, make_params

# The real CheXpert-v1.0-small train.csv, Cardiomegaly column
N_TRAIN, POS, NEG, UNC, BLANK = 223_414, 27_000, 11_116, 8_087, 177_211


N_VALID = 234     # the real valid.csv


def chexpert_csv(split: str, cardio: np.ndarray, patient: np.ndarray) -> pd.DataFrame:
    paths = [f"CheXpert-v1.0-small/{split}/patient{p:05d}/study1/view{i % 3 + 1}_frontal.jpg"
             for i, p in enumerate(patient)]
    other = {c: "" if split == "train" else "0.0" for c in clean.OBSERVATIONS if c != "Cardiomegaly"}
    csv = pd.DataFrame({"Path": paths, "Sex": "Female", "Age": 60, "Frontal/Lateral": "Frontal",
                        "AP/PA": "AP", **other, "Cardiomegaly": cardio})[list(clean.CSV_COLUMNS)]
    return clean.parse_csv(csv.to_csv(index=False).encode(), f"{split}.csv")


@pytest.fixture(scope="module")
def chexpert_scale_labels():
    """CheXpert's row counts through clean's parsing + U-Zeros: a train.csv with the real
    Cardiomegaly mix, and 234 expert-labelled (0/1) valid rows of patients not in train."""
    assert POS + NEG + UNC + BLANK == N_TRAIN
    rng = np.random.default_rng(0)
    cardio = np.array(["1.0"] * POS + ["0.0"] * NEG + ["-1.0"] * UNC + [""] * BLANK)[rng.permutation(N_TRAIN)]
    train_patients = np.arange(N_TRAIN) // 3 + 1
    train = chexpert_csv("train", cardio, train_patients)
    valid_patients = train_patients.max() + 1 + np.arange(N_VALID) // 3
    valid = chexpert_csv("valid", rng.choice(["1.0", "0.0"], N_VALID, p=[0.29, 0.71]), valid_patients)
    return clean.apply_policies(clean.combine(train, valid, "CheXpert-v1.0-small"), make_params())


@pytest.fixture(scope="module")
def chexpert_scale_train(chexpert_scale_labels):
    df = chexpert_scale_labels
    return df[~df["valid"]].reset_index(drop=True)


def test_input_has_the_seed_counts(chexpert_scale_train):
    y = chexpert_scale_train["Cardiomegaly"]
    assert len(y) == N_TRAIN and (y == 1).sum() == POS and (y == 0).sum() == NEG + UNC + BLANK


def test_oversample_fraction_03_gives_117848_rows_half_positive(chexpert_scale_train):
    out = resample_frame(chexpert_scale_train, "Cardiomegaly", "oversample", 0.3, seed=42)
    assert len(out) == 117_848
    assert abs(out["Cardiomegaly"].mean() - 0.5) < 0.01


def test_undersample_gives_54000_rows(chexpert_scale_train):
    out = resample_frame(chexpert_scale_train, "Cardiomegaly", "undersample", 1.0, seed=42)
    assert len(out) == 54_000 and (out["Cardiomegaly"] == 1).sum() == 27_000
    assert out["Path"].is_unique     # undersampling never repeats a row


def small_frame(n_pos=5, n_neg=20, n_unc=3):
    y = [1] * n_pos + [0] * n_neg + [-1] * n_unc
    return pd.DataFrame({"Path": [f"p{i}" for i in range(len(y))], "Cardiomegaly": np.array(y, np.int8)})


def test_oversample_keeps_every_original_and_ignored_rows_once():
    df = small_frame()
    out = resample_frame(df, "Cardiomegaly", "oversample", 1.0, seed=1)
    assert (out["Cardiomegaly"] == 1).sum() == 20 and (out["Cardiomegaly"] == 0).sum() == 20
    assert (out["Cardiomegaly"] == -1).sum() == 3 and set(df["Path"]) <= set(out["Path"])


def test_seeded_and_none_keeps_a_fraction():
    df = small_frame()
    a = resample_frame(df, "Cardiomegaly", "oversample", 0.5, seed=3)
    b = resample_frame(df, "Cardiomegaly", "oversample", 0.5, seed=3)
    c = resample_frame(df, "Cardiomegaly", "oversample", 0.5, seed=4)
    assert a.equals(b) and not a.equals(c) and len(a) == round(0.5 * 43)
    none = resample_frame(df, "Cardiomegaly", "none", 0.5, seed=3)
    assert len(none) == 14 and none["Path"].is_unique


def test_one_class_only_cannot_be_balanced():
    with pytest.raises(ChexopsError, match="0 positive and 20 negative"):
        resample_frame(small_frame(n_pos=0), "Cardiomegaly", "oversample", 1.0, seed=0)


def write_labels(root, df):
    (root / "data/clean").mkdir(parents=True)
    df.to_parquet(root / "data/clean/labels.parquet")


def test_main_writes_train_and_untouched_valid(tmp_path, stage_runs):
    train, valid = chexpert_rows(train_patients=20)
    df = clean.apply_policies(clean.combine(train, valid, "CheXpert-v1.0-small"), make_params())
    write_labels(tmp_path, df)
    resample_stage.main(make_params(), tmp_path)
    out_valid = pd.read_parquet(tmp_path / "data/resampled/valid.parquet")
    out_train = pd.read_parquet(tmp_path / "data/resampled/train.parquet")
    assert out_valid.equals(df[df["valid"]].reset_index(drop=True))
    y = out_train["Cardiomegaly"]
    majority = max((df.loc[~df["valid"], "Cardiomegaly"] == v).sum() for v in (0, 1))
    assert (y == 1).sum() == (y == 0).sum() == majority
    assert not set(out_train["patient"]) & set(out_valid["patient"])
    metrics = json.loads((tmp_path / "metrics/resample.json").read_text())
    assert metrics["train"]["rows"] == len(out_train) and metrics["valid"]["rows"] == len(out_valid)
    assert stage_runs[0][0] == "resample"


def test_patients_crossing_splits_are_refused(tmp_path, stage_runs):
    train, valid = chexpert_rows(train_patients=4)
    df = clean.apply_policies(clean.combine(train, valid, "CheXpert-v1.0-small"), make_params())
    df.loc[df["valid"], "patient"] = "patient00001"
    write_labels(tmp_path, df)
    with pytest.raises(ChexopsError, match="patients are in both train and valid"):
        resample_stage.main(make_params(), tmp_path)
    assert not (tmp_path / "data/resampled").exists()


def test_missing_labels_names_the_fix(tmp_path):
    with pytest.raises(ChexopsError, match="run `dvc repro clean` first"):
        resample_stage.main(make_params(), tmp_path)


@pytest.mark.parametrize("strategy, fraction, rows, positive", [("oversample", 0.3, 117_848, None),
                                                                ("undersample", 1.0, 54_000, 27_000)])
def test_stage_on_chexpert_counts_keeps_the_234_valid_rows(tmp_path, stage_runs, chexpert_scale_labels,
                                                           strategy, fraction, rows, positive):
    labels = chexpert_scale_labels
    assert int(labels["valid"].sum()) == N_VALID and int((~labels["valid"]).sum()) == N_TRAIN
    assert not set(labels.loc[labels["valid"], "patient"]) & set(labels.loc[~labels["valid"], "patient"])
    write_labels(tmp_path, labels)
    resample_stage.main(make_params({"resample": {"strategy": strategy, "fraction": fraction}}), tmp_path)
    out_train = pd.read_parquet(tmp_path / "data/resampled/train.parquet")
    out_valid = pd.read_parquet(tmp_path / "data/resampled/valid.parquet")
    assert len(out_valid) == N_VALID
    assert out_valid.equals(labels[labels["valid"]].reset_index(drop=True))   # untouched, same order
    assert len(out_train) == rows and not out_train["valid"].any()
    y = out_train["Cardiomegaly"]
    if positive is None:
        assert abs(y.mean() - 0.5) < 0.01
    else:
        assert (y == 1).sum() == positive
    assert not set(out_train["patient"]) & set(out_valid["patient"])
    metrics = json.loads((tmp_path / "metrics/resample.json").read_text())
    assert metrics["train"]["rows"] == rows and metrics["valid"]["rows"] == N_VALID
    assert metrics["before"]["rows"] == N_TRAIN
