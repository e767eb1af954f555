"""The synthetic CheXpert: layout, determinism, label mix, and that the findings are drawn."""
from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chexops.config import SyntheticConfig
from chexops.data.schema import CSV_COLUMNS
from chexops.data.synthetic import phantom
from chexops.data.synthetic.generate import build_cohort, generate_zip
from tests.helpers import TINY_SYNTHETIC

TINY = SyntheticConfig(**TINY_SYNTHETIC)
PATH_RE = re.compile(r"^CheXpert-v1\.0-small/(train|valid|test)/patient(\d{5})/study(\d+)/"
                     r"view(\d)_(frontal|lateral)\.jpg$")


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    truth = generate_zip(TINY, 7, d / "a.zip", d / "a.parquet")
    with zipfile.ZipFile(d / "a.zip") as zf:
        train = pd.read_csv(io.BytesIO(zf.read("CheXpert-v1.0-small/train.csv")))
        valid = pd.read_csv(io.BytesIO(zf.read("CheXpert-v1.0-small/valid.csv")))
        test = pd.read_csv(io.BytesIO(zf.read("CheXpert-v1.0-small/test.csv")))
        names = zf.namelist()
        first = Image.open(io.BytesIO(zf.read(train["Path"].iloc[0])))
        first.load()
    return {"dir": d, "truth": truth, "train": train, "valid": valid, "test": test, "names": names,
            "img": first}


def test_layout_matches_chexpert_small(tiny):
    train, valid, test, names = tiny["train"], tiny["valid"], tiny["test"], tiny["names"]
    assert all(tuple(f.columns) == CSV_COLUMNS for f in (train, valid, test))
    all_rows = pd.concat([train, valid, test])
    assert set(all_rows["Path"]) == {n for n in names if n.endswith(".jpg")}
    parsed = [PATH_RE.match(p) for p in all_rows["Path"]]
    assert all(parsed)
    ids = [int(m.group(2)) for m in parsed]
    assert max(ids[:len(train)]) < min(ids[len(train):])
    assert min(ids[len(train) + len(valid):]) == 64741     # CheXpert's test numbering
    lateral = all_rows["Frontal/Lateral"] == "Lateral"
    assert lateral.any() and (~lateral).any()
    assert all_rows.loc[lateral, "AP/PA"].isna().all()
    assert set(all_rows.loc[~lateral, "AP/PA"]) <= {"AP", "PA"}
    assert set(all_rows["Sex"]) <= {"Male", "Female"}


def test_valid_and_test_hold_only_zero_one_and_train_has_uncertain_and_blank(tiny):
    obs = list(CSV_COLUMNS[5:])
    assert set(np.unique(tiny["valid"][obs].to_numpy())) <= {0.0, 1.0}
    assert set(np.unique(tiny["test"][obs].to_numpy())) <= {0.0, 1.0}
    train = tiny["train"][obs].to_numpy()
    assert np.isnan(train).any() and (train == -1).any()


def test_images_are_portrait_greyscale_jpegs_of_the_configured_size(tiny):
    img = tiny["img"]
    assert img.format == "JPEG" and img.mode == "L" and img.size == (TINY.width, TINY.height)


def test_truth_table_has_ctr_and_true_labels_per_path(tiny):
    truth, train = tiny["truth"], tiny["train"]
    assert set(train["Path"]) <= set(truth["Path"])
    assert ((truth["ctr"] > 0.5).astype(int) == truth["Cardiomegaly"]).all()
    assert (truth["apparent_ctr"] >= truth["ctr"]).all()
    assert pd.read_parquet(tiny["dir"] / "a.parquet").equals(truth)


def test_same_seed_same_bytes_any_worker_count_other_seed_differs(tmp_path):
    cfg = replace(TINY, train_patients=40)          # enough images to use the process pool
    generate_zip(cfg, 3, tmp_path / "a.zip", tmp_path / "a.parquet")
    generate_zip(replace(cfg, workers=2), 3, tmp_path / "b.zip", tmp_path / "b.parquet")
    generate_zip(cfg, 4, tmp_path / "c.zip", tmp_path / "c.parquet")
    assert md5(tmp_path / "a.zip") == md5(tmp_path / "b.zip")
    assert md5(tmp_path / "a.parquet") == md5(tmp_path / "b.parquet")
    assert md5(tmp_path / "a.zip") != md5(tmp_path / "c.zip")


def test_test_cohort_has_its_own_seed_and_leaves_train_and_valid_unchanged():
    rows = build_cohort(TINY, 7)
    without = build_cohort(replace(TINY, test_patients=0), 7)
    other_seed = build_cohort(replace(TINY, test_seed=8), 7)
    other_data_seed = build_cohort(TINY, 9)
    kept = ["Path", "ctr", "Cardiomegaly"]
    held = rows["split"] == "test"
    assert rows.loc[~held, kept].reset_index(drop=True).equals(without[kept])
    assert not rows.loc[held, kept].reset_index(drop=True).equals(
        other_seed.loc[other_seed["split"] == "test", kept].reset_index(drop=True))
    assert rows.loc[held, kept].reset_index(drop=True).equals(     # the data seed leaves it be
        other_data_seed.loc[other_data_seed["split"] == "test", kept].reset_index(drop=True))
    test = rows[held]
    studies = test.groupby("patient_id")["study"].max().sum()
    assert test["patient_id"].nunique() == TINY.test_patients == studies


def test_default_test_cohort_is_large_expert_read_and_like_validation():
    rows = build_cohort(SyntheticConfig(), 42)
    test, valid = rows[rows["split"] == "test"], rows[rows["split"] == "valid"]
    assert test["patient_id"].nunique() >= 2000
    assert set(test["Cardiomegaly"].unique()) <= {0.0, 1.0}
    # the same population as validation (expert reads, enriched), so valid - test is selection
    assert abs(test["Cardiomegaly"].mean() - valid["Cardiomegaly"].mean()) < 0.08


def test_default_cardiomegaly_mix_is_near_chexpert():
    rows = build_cohort(SyntheticConfig(train_patients=4000, valid_patients=70), 11)
    c = rows.loc[rows["split"] == "train", "Cardiomegaly"]
    assert abs((c == 1).mean() - 0.12) < 0.015
    assert abs((c == 0).mean() - 0.05) < 0.015
    assert abs((c == -1).mean() - 0.036) < 0.012
    assert abs(c.isna().mean() - 0.79) < 0.025


def test_default_sizes_ctr_depends_on_age_and_uncertain_near_threshold():
    rows = build_cohort(SyntheticConfig(), 42)
    n_valid = int((rows["split"] == "valid").sum())
    assert (rows["split"] == "train").sum() >= 1000 and 200 <= n_valid <= 270
    train = rows[rows["split"] == "train"]
    assert np.corrcoef(train["age"], train["ctr"])[0, 1] > 0.15
    unc = train.loc[train["Cardiomegaly"] == -1, "ctr"]
    pos = train.loc[train["Cardiomegaly"] == 1, "ctr"]
    assert (unc - 0.5).abs().median() < (pos - 0.5).abs().median()


def _state(**kw) -> phantom.ViewState:
    base = dict(view="frontal", ap=False, ctr=0.45, thorax=0.78, effusion=0.0, effusion_side=0,
                edema=0.0, devices=0, age=50.0, female=False)
    return phantom.ViewState(**{**base, **kw})


def heart_width(img: np.ndarray) -> int:
    """Bright pixels on the row through the heart, inside the thorax."""
    h, w = img.shape
    row = img[int(0.63 * h), int(0.1 * w):int(0.9 * w)].astype(float)
    return int((row > 0.5 * (row.max() + row.min())).sum())


def test_heart_width_follows_ctr_and_ap_magnifies_it():
    seed = (1, 1)
    small = phantom.render(_state(ctr=0.38), 192, 160, seed)
    big = phantom.render(_state(ctr=0.58), 192, 160, seed)
    ap = phantom.render(_state(ctr=0.38, ap=True), 192, 160, seed)
    assert heart_width(big) > heart_width(small) * 1.3
    assert heart_width(ap) > heart_width(small)


def test_effusion_edema_and_devices_change_the_picture():
    seed = (2, 2)
    plain = phantom.render(_state(), 192, 160, seed).astype(float)
    lower_lungs = (slice(int(0.55 * 192), int(0.72 * 192)), slice(10, 150))
    effusion = phantom.render(_state(effusion=0.12), 192, 160, seed).astype(float)
    assert effusion[lower_lungs].mean() > plain[lower_lungs].mean() + 5
    edema = phantom.render(_state(edema=1.0), 192, 160, seed).astype(float)
    assert edema[60:110].mean() > plain[60:110].mean() + 2
    devices = phantom.render(_state(devices=15), 192, 160, seed).astype(float)
    assert devices.max() >= plain.max() and np.abs(devices - plain).sum() > 1000
