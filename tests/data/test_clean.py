"""The clean stage: label table, policies, filters, counts, bad images, bad CSVs."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from chexops.data import clean
from chexops.errors import ChexopsError
from chexops.stages import clean as clean_stage
from tests.helpers import chexpert_rows, csv_text, jpeg_bytes, make_params, write_chexpert_zip


def repo_with(tmp_path, **kw):
    root = tmp_path / "repo"
    (root / "data/raw").mkdir(parents=True)
    write_chexpert_zip(root / "data/raw/chexpert.zip", **kw)
    return root


def test_main_writes_table_report_and_counts(tmp_path, stage_runs, capsys):
    root = repo_with(tmp_path)
    clean_stage.main(make_params(), root)
    df = pd.read_parquet(root / "data/clean/labels.parquet")
    train, valid = chexpert_rows()
    assert len(df) == len(train) + len(valid)
    assert df["valid"].dtype == bool and int(df["valid"].sum()) == len(valid)
    assert df["patient"].iloc[0] == "patient00001"
    assert df["Cardiomegaly"].dtype == np.int8 and set(df["Cardiomegaly"]) <= {0, 1}   # U-Zeros
    metrics = json.loads((root / "metrics/clean.json").read_text())
    before = metrics["labels_before"]["train"]["Cardiomegaly"]
    raw = train["Cardiomegaly"]
    assert before == {"1": int((raw == 1).sum()), "0": int((raw == 0).sum()),
                      "-1": int((raw == -1).sum()), "blank": int(raw.isna().sum())}
    after = metrics["labels_after"]["train"]["Cardiomegaly"]
    assert after["1"] == before["1"] and after["-1"] == 0
    assert pd.read_csv(root / "data/clean/bad_images.csv").empty
    assert "clean before train Cardiomegaly: 1: " in capsys.readouterr().out
    assert stage_runs[0][0] == "clean" and stage_runs[0][1].metrics["valid_rows"] == len(valid)


def test_policies_per_observation_apply_to_train_only():
    train, valid = chexpert_rows(train_patients=20)
    valid.loc[0, "Edema"] = -1.0      # a stray -1 in the expert set is zeroed, never kept
    df = clean.combine(train, valid, "CheXpert-v1.0-small")
    params = make_params({"clean": {"uncertainty": {"Edema": "ones", "Atelectasis": "ignore",
                                                    "Pneumonia": "multiclass"}}})
    out = clean.apply_policies(df, params)
    tr, va = out[~out["valid"]], out[out["valid"]]
    edema_unc = (train["Edema"] == -1).to_numpy()
    assert (tr["Edema"].to_numpy()[edema_unc] == 1).all()
    assert (tr["Atelectasis"] == -1).sum() == (train["Atelectasis"] == -1).sum() > 0
    assert (tr["Pneumonia"] == -1).sum() == (train["Pneumonia"] == -1).sum()
    assert (tr["Cardiomegaly"] != -1).all()
    assert set(np.unique(va[list(clean.OBSERVATIONS)].to_numpy())) <= {0, 1}
    assert (tr["Lung Lesion"].to_numpy()[train["Lung Lesion"].isna().to_numpy()] == 0).all()


@pytest.mark.parametrize("views, expect", [("frontal", {"Frontal"}), ("ap", {"AP"}), ("pa", {"PA"})])
def test_view_filter(views, expect):
    train, valid = chexpert_rows(train_patients=9)
    df = clean.combine(train, valid, "CheXpert-v1.0-small")
    out = clean.filter_rows(df, make_params({"clean": {"views": views}}))
    column = "Frontal/Lateral" if views == "frontal" else "AP/PA"
    assert set(out[column]) == expect and 0 < len(out) < len(df)


def test_sex_and_age_filters():
    train, valid = chexpert_rows(train_patients=9)
    df = clean.combine(train, valid, "CheXpert-v1.0-small")
    out = clean.filter_rows(df, make_params({"clean": {"sex": "female", "age_min": 43, "age_max": 47}}))
    assert set(out["Sex"]) == {"Female"} and out["Age"].between(43, 47).all() and len(out) > 0


def with_blank_demographics(train: pd.DataFrame, valid: pd.DataFrame):
    """Blank Age on train rows 0, 1 (frontal, lateral) and valid row 0; blank Sex on train row 2
    and valid row 1; a padded blank and CheXpert's own "Unknown" too."""
    train, valid = train.astype({"Age": object}), valid.astype({"Age": object})
    train.loc[[0, 1], "Age"] = ["", "  "]
    valid.loc[0, "Age"] = ""
    train.loc[2, "Sex"] = ""
    valid.loc[1, "Sex"] = "Unknown"
    return train, valid


def test_blank_age_and_sex_are_kept_as_unknown_and_counted(tmp_path, stage_runs, capsys):
    train, valid = with_blank_demographics(*chexpert_rows())
    root = repo_with(tmp_path, train=train, valid=valid)
    clean_stage.main(make_params(), root)
    df = pd.read_parquet(root / "data/clean/labels.parquet")
    assert len(df) == len(train) + len(valid)           # nothing dropped
    by_path = df.set_index("Path")
    assert by_path.loc[train.Path[:2], "Age"].isna().all() and by_path.loc[valid.Path[0], "Age"] is pd.NA
    assert by_path.loc[train.Path[3], "Age"] == train.Age[3]   # whole years stay integers
    assert by_path.loc[train.Path[2], "Sex"] == "Unknown" and by_path.loc[valid.Path[1], "Sex"] == "Unknown"
    metrics = json.loads((root / "metrics/clean.json").read_text())
    expected = {"train": {"Age": 2, "Sex": 1}, "valid": {"Age": 1, "Sex": 1}}
    assert metrics["unknown_before"] == expected and metrics["unknown_after"] == expected
    assert metrics["unknown_filtered"] == {"Age": 0, "Sex": 0}
    assert "kept 2 rows with unknown Sex, 3 rows with unknown Age" in capsys.readouterr().out


def test_age_filter_drops_unknown_ages_and_says_how_many(tmp_path, stage_runs, capsys):
    train, valid = with_blank_demographics(*chexpert_rows())
    root = repo_with(tmp_path, train=train, valid=valid)
    clean_stage.main(make_params({"clean": {"age_min": 0}}), root)
    df = pd.read_parquet(root / "data/clean/labels.parquet")
    assert df["Age"].notna().all() and len(df) == len(train) + len(valid) - 3
    metrics = json.loads((root / "metrics/clean.json").read_text())
    assert metrics["unknown_filtered"] == {"Age": 3, "Sex": 0}
    assert metrics["unknown_after"] == {"train": {"Age": 0, "Sex": 1}, "valid": {"Age": 0, "Sex": 1}}
    assert "clean.age_min / clean.age_max dropped 3 rows whose Age is unknown" in capsys.readouterr().out


def test_unknown_counts_name_only_what_the_filter_itself_dropped():
    train, valid = with_blank_demographics(*chexpert_rows())
    df = clean.combine(clean.parse_csv(csv_text(train).encode(), "train.csv"),
                       clean.parse_csv(csv_text(valid).encode(), "valid.csv"), "CheXpert-v1.0-small")
    # train row 1 (blank Age) is a lateral: the view filter drops it anyway
    frontal_age = make_params({"clean": {"views": "frontal", "age_max": 200}})
    assert clean.unknown_filtered(df, frontal_age) == {"Age": 2, "Sex": 0}
    out = clean.filter_rows(df, frontal_age)
    assert out["Age"].notna().all() and set(out["Frontal/Lateral"]) == {"Frontal"}
    female = make_params({"clean": {"sex": "female"}})
    assert clean.unknown_filtered(df, female) == {"Age": 0, "Sex": 2}
    assert set(clean.filter_rows(df, female)["Sex"]) == {"Female"}
    assert clean.unknown_filtered(df, make_params()) == {"Age": 0, "Sex": 0}


def test_bad_images_below_limit_are_dropped_and_listed(tmp_path, stage_runs):
    train, valid = chexpert_rows(train_patients=60)
    missing = train["Path"].iloc[3]
    root = repo_with(tmp_path, train=train, valid=valid, skip_images=(missing,))
    clean_stage.main(make_params({"clean": {"max_bad_fraction": 0.05}}), root)
    df = pd.read_parquet(root / "data/clean/labels.parquet")
    report = pd.read_csv(root / "data/clean/bad_images.csv")
    assert missing not in set(df["Path"]) and list(report["Path"]) == [missing]
    assert report["reason"].iloc[0] == "missing"


def assert_nothing_written(root):
    assert not (root / "data/clean").exists()
    assert not (root / "metrics/clean.json").exists()
    leftovers = [p.name for p in (root / "data").iterdir() if p.name != "raw"]
    assert leftovers == []


def test_too_many_bad_images_stop_the_stage(tmp_path, stage_runs):
    train, valid = chexpert_rows()
    root = repo_with(tmp_path, train=train, valid=valid,
                     corrupt_images=tuple(train["Path"][:3]))
    with pytest.raises(ChexopsError, match=r"3 of 18 images .* above clean.max_bad_fraction"):
        clean_stage.main(make_params(), root)
    assert_nothing_written(root)


def bad_csv_cases():
    train, _ = chexpert_rows()
    no_col = csv_text(train.drop(columns=["Cardiomegaly"]))
    bad_label = csv_text(train).replace(",1.0,", ",2.0,", 1)
    bad_age = csv_text(train.assign(Age=["forty"] + list(train["Age"][1:])))
    abc_age = csv_text(train.assign(Age=list(train["Age"][:4]) + ["abc"] + list(train["Age"][5:])))
    nan_age = csv_text(train.assign(Age=["nan"] + list(train["Age"][1:])))
    bad_sex = csv_text(train.assign(Sex=["F"] + list(train["Sex"][1:])))
    dup = csv_text(pd.concat([train, train.iloc[:1]]))
    escape = csv_text(train.assign(Path=["CheXpert-v1.0-small/../../etc/x.jpg"] + list(train["Path"][1:])))
    absolute = csv_text(train.assign(Path=["/etc/passwd"] + list(train["Path"][1:])))
    header_only = csv_text(train.iloc[:0])
    return [(no_col, "missing required column 'Cardiomegaly'"),
            (bad_label, "label '2.0' in column .* is not one of 1, 0, -1 or blank"),
            (bad_age, "non-numeric Age 'forty'"),
            (abc_age, r"train.csv: non-numeric Age 'abc' for \S+patient00003\S+; fix the Age column"),
            (nan_age, "non-numeric Age 'nan'"),
            (bad_sex, "Sex 'F' for .* is not Male, Female, Unknown or blank; fix the Sex column"),
            ("", "train.csv is empty"),
            (header_only, "header but no rows"),
            (dup, "duplicate path"),
            (escape, "escapes the data root"),
            (absolute, "is absolute")]


@pytest.mark.parametrize("text, message", bad_csv_cases())
def test_bad_csvs_give_one_line_errors_and_write_nothing(tmp_path, stage_runs, text, message):
    root = repo_with(tmp_path, train_csv=text)
    with pytest.raises(ChexopsError, match=message) as info:
        clean_stage.main(make_params(), root)
    assert "\n" not in str(info.value) and ";" in str(info.value)
    assert_nothing_written(root)


def test_missing_zip_names_the_fix(tmp_path):
    with pytest.raises(ChexopsError, match="run `dvc repro download` first"):
        clean_stage.main(make_params(), tmp_path)


def test_filters_that_leave_nothing_are_an_error(tmp_path, stage_runs):
    root = repo_with(tmp_path)
    with pytest.raises(ChexopsError, match="no train rows left"):
        clean_stage.main(make_params({"clean": {"age_min": 200}}), root)
    assert_nothing_written(root)


@pytest.mark.parametrize("check", ["header", "full"])
def test_full_image_check_drops_truncated_jpegs(tmp_path, stage_runs, check):
    train, valid = chexpert_rows(train_patients=60)
    victim = train["Path"].iloc[5]
    root = repo_with(tmp_path, train=train, valid=valid, skip_images=(victim,))
    whole = jpeg_bytes(5, 200, 160)
    with zipfile.ZipFile(root / "data/raw/chexpert.zip", "a") as zf:
        zf.writestr(victim, whole[: len(whole) // 2])
    clean_stage.main(make_params({"clean": {"max_bad_fraction": 0.05, "image_check": check}}), root)
    df = pd.read_parquet(root / "data/clean/labels.parquet")
    report = pd.read_csv(root / "data/clean/bad_images.csv")
    if check == "header":      # the fast check cannot see a truncated body (training would say so)
        assert victim in set(df["Path"]) and report.empty
    else:
        assert victim not in set(df["Path"]) and list(report["Path"]) == [victim]
        assert report["reason"].iloc[0].startswith("undecodable: image is truncated or corrupt (")
        assert len(df) == len(train) + len(valid) - 1


# ---------------------------------------------------------------- the held-out test cohort

def stanford_test_rows(patients: int = 4, first: int = 64741) -> pd.DataFrame:
    """A test.csv as Stanford released CheXpert's test labels: Path and the observations only."""
    _, valid = chexpert_rows(train_patients=1, valid_patients=patients, seed=5)
    ids = iter(range(first, first + patients))
    new = {p: f"patient{next(ids):05d}" for p in valid["Path"].str.extract(r"(patient\d+)")[0].unique()}
    paths = valid["Path"].str.replace("/valid/", "/test/", regex=False)
    for old, fresh in new.items():
        paths = paths.str.replace(old, fresh, regex=False)
    return valid.assign(Path=paths).drop(columns=["Sex", "Age", "Frontal/Lateral", "AP/PA"])


def zip_with_test(tmp_path, test: pd.DataFrame):
    extra = {"CheXpert-v1.0-small/test.csv": csv_text(test).encode()}
    extra.update({p: jpeg_bytes(i) for i, p in enumerate(test["Path"])})
    return repo_with(tmp_path, extra=extra)


def test_a_test_csv_becomes_the_held_out_table_that_the_rounds_never_read(tmp_path, stage_runs,
                                                                           capsys):
    test = stanford_test_rows()
    root = zip_with_test(tmp_path, test)
    clean_stage.main(make_params(), root)
    held = pd.read_parquet(root / "data/clean/test.parquet")
    labels = pd.read_parquet(root / "data/clean/labels.parquet")
    train, valid = chexpert_rows()
    assert len(labels) == len(train) + len(valid) and "split" not in labels.columns
    assert list(held["Path"]) == list(test["Path"]) and not set(held["Path"]) & set(labels["Path"])
    # missing meta columns: views from the file name, demographics unknown
    assert list(held["Frontal/Lateral"]) == ["Frontal", "Lateral"] * 4
    assert set(held["Sex"]) == {"Unknown"} and held["Age"].isna().all()
    assert held["Cardiomegaly"].dtype == np.int8
    assert list(held["Cardiomegaly"]) == test["Cardiomegaly"].astype(int).tolist()
    metrics = json.loads((root / "metrics/clean.json").read_text())
    assert metrics["rows_before"]["test"] == metrics["rows_after"]["test"] == len(test)
    assert "+ 8 held-out test rows kept" in capsys.readouterr().out
    assert stage_runs[0][1].metrics["test_rows"] == len(test)


def test_without_a_test_csv_the_held_out_table_is_empty(tmp_path, stage_runs):
    root = repo_with(tmp_path)
    clean_stage.main(make_params(), root)
    held = pd.read_parquet(root / "data/clean/test.parquet")
    assert held.empty and "Cardiomegaly" in held.columns
    assert "test" not in json.loads((root / "metrics/clean.json").read_text())["rows_after"]


def test_a_test_patient_seen_in_training_is_refused_and_nothing_is_written(tmp_path, stage_runs):
    test = stanford_test_rows(first=1)             # patient00001 is a training patient
    root = zip_with_test(tmp_path, test)
    with pytest.raises(ChexopsError, match=r"test.csv patient patient00001 is also in train.csv "
                                           r"or valid.csv; a held-out test cohort must share no "
                                           r"patient"):
        clean_stage.main(make_params(), root)
    assert not (root / "data/clean").exists()
