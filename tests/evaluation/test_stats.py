"""stats: checked against sklearn, a brute-force DeLong, the bootstrap, and hand-made cases."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from chexops.evaluation import stats


def scores(n: int = 234, seed: int = 1, rounding: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A validation-sized split with ties (rounded probabilities), ~35 % positive."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    p = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.2, n), 0, 1), rounding)
    return y, p


def brute_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong (1988) from its definition: O(m n) kernel, structural components, covariance."""
    def components(p):
        psi = (p[y == 1][:, None] > p[y == 0][None, :]) + 0.5 * (p[y == 1][:, None] == p[y == 0][None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)
    ca, cb = components(a), components(b)
    s10 = np.cov(np.vstack([ca[1], cb[1]]))
    s01 = np.cov(np.vstack([ca[2], cb[2]]))
    return np.array([ca[0], cb[0]]), s10 / (y == 1).sum() + s01 / (y == 0).sum()


def test_fast_delong_equals_sklearn_and_the_brute_force_definition():
    y, p = scores()
    q = np.round(np.clip(p + np.random.default_rng(5).normal(0, 0.1, len(p)), 0, 1), 2)
    aucs, cov = stats.fast_delong(np.vstack([p, q])[:, y == 1], np.vstack([p, q])[:, y == 0])
    assert aucs == pytest.approx([roc_auc_score(y, p), roc_auc_score(y, q)], abs=1e-12)
    ref_aucs, ref_cov = brute_delong(y, p, q)
    assert aucs == pytest.approx(ref_aucs, abs=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)


def test_delong_variance_agrees_with_the_bootstrap():
    y, p = scores()
    d = stats.delong_auroc(y, p)
    rng = np.random.default_rng(0)
    pos, neg = p[y == 1], p[y == 0]
    boot = [roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))],
                          np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
            for _ in range(1500)]
    assert d["var"] == pytest.approx(np.var(boot), rel=0.15)
    assert d["lo"] < d["auroc"] < d["hi"]
    assert d["hi"] - d["lo"] == pytest.approx(2 * 1.96 * np.sqrt(d["var"]), rel=1e-3)


def test_paired_delong_is_antisymmetric_and_its_p_value_symmetric():
    y, p = scores()
    q = np.clip(p + np.random.default_rng(7).normal(0, 0.15, len(p)), 0, 1)
    ab, ba = stats.paired_delong(y, p, q), stats.paired_delong(y, q, p)
    assert ab["diff"] == pytest.approx(-ba["diff"]) and ab["p_value"] == pytest.approx(ba["p_value"])
    assert ab["diff"] == pytest.approx(roc_auc_score(y, q) - roc_auc_score(y, p))
    assert ab["lo"] < ab["diff"] < ab["hi"] and 0 < ab["p_value"] < 1
    same = stats.paired_delong(y, p, p)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    assert stats.verdict(same) == "no detectable difference at the 5 % level"


def test_paired_delong_detects_a_clearly_better_model_and_names_it():
    y, p = scores(n=400)
    good = y * 0.6 + np.random.default_rng(3).random(len(y)) * 0.5
    test = stats.paired_delong(y, p, good)
    assert test["p_value"] < 0.001 and test["diff"] > 0
    assert stats.verdict(test) == "B is better than A at the 5 % level"
    assert stats.verdict(stats.paired_delong(y, good, p)) == "A is better than B at the 5 % level"


def test_paired_delong_refuses_a_single_class():
    with pytest.raises(ValueError, match="one class"):
        stats.paired_delong(np.ones(5), np.random.rand(5), np.random.rand(5))


def test_weighted_auroc_of_a_resample_equals_sklearn_with_sample_weights():
    y, p = scores(n=120)
    pos, neg = p[y == 1], p[y == 0]
    rng = np.random.default_rng(11)
    c_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=3).astype(float)
    c_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=3).astype(float)
    got = stats._auroc_weighted(pos, neg, c_pos, c_neg)
    for b in range(3):
        want = roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg],
                             sample_weight=np.r_[c_pos[b], c_neg[b]])
        assert got[b] == pytest.approx(want, abs=1e-12)


def test_bootstrap_ci_is_seeded_and_brackets_the_point_estimate():
    y, p = scores()
    ci = stats.bootstrap_ci(y, p, threshold=0.5, n_boot=1000, seed=42)
    assert ci == stats.bootstrap_ci(y, p, threshold=0.5, n_boot=1000, seed=42)
    assert ci != stats.bootstrap_ci(y, p, threshold=0.5, n_boot=1000, seed=43)
    assert ci["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    for name in ("auroc", "precision", "recall", "specificity"):
        assert ci[name]["lo"] <= ci[name]["value"] <= ci[name]["hi"], name
    # about the DeLong width: the two ways of estimating the spread agree
    d = stats.delong_auroc(y, p)
    assert ci["auroc"]["hi"] - ci["auroc"]["lo"] == pytest.approx(d["hi"] - d["lo"], rel=0.2)
    empty = stats.bootstrap_ci(np.zeros(4), np.random.rand(4))
    assert empty["auroc"] == {"value": None, "lo": None, "hi": None}


def test_operating_point_reaches_the_target_sensitivity_at_the_highest_threshold():
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([.95, .9, .85, .8, .7, .6, .5, .4, .3, .2, .65, .1, .35, .05])
    op = stats.operating_point(y, p, 0.9)
    assert op["threshold"] == 0.3 and op["sensitivity"] == pytest.approx(0.9)
    assert op["confusion"] == [[2, 2], [1, 9]] and op["specificity"] == pytest.approx(0.5)
    assert stats.threshold_for_sensitivity(y, p, 1.0) == 0.2
    assert stats.threshold_for_sensitivity(y, p, 0.85) == 0.3  # ceil(8.5) = 9 positives
    assert stats.operating_point(np.zeros(3), p[:3], 0.9)["threshold"] is None


def test_calibration_curve_ece_and_brier():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.15, 0.95])
    curve = stats.reliability_curve(y, p, n_bins=10)
    assert list(curve["count"]) == [1, 2, 1, 2]
    assert curve.loc[curve.lower == 0.1, "frac_pos"].item() == 0.5
    # |0-.05|*1 + |.5-.15|*2 + |1-.85|*1 + |.5-.95|*2, over 6
    assert stats.expected_calibration_error(y, p) == pytest.approx((0.05 + 0.7 + 0.15 + 0.9) / 6)
    assert stats.brier_score(y, p) == pytest.approx(brier_score_loss(y, p))
    perfect = stats.reliability_curve(np.r_[np.zeros(50), np.ones(50)], np.r_[np.zeros(50), np.ones(50)])
    assert stats.expected_calibration_error(np.r_[np.zeros(50), np.ones(50)],
                                            np.r_[np.zeros(50), np.ones(50)]) == 0
    assert len(perfect) == 2


def test_subgroups_by_sex_age_view_and_ap_pa():
    y, p = scores(n=200)
    rng = np.random.default_rng(2)
    lateral = rng.random(200) < 0.2
    df = pd.DataFrame({"Sex": rng.choice(["Male", "Female"], 200),
                       "Age": rng.integers(18, 95, 200),
                       "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
                       "AP/PA": np.where(lateral, "", rng.choice(["AP", "PA"], 200))},
                      index=np.arange(1000, 1200))  # a non-default index must not matter
    table = stats.subgroup_auroc(df, y, p)
    assert set(table.kind) == {"sex", "age", "view", "ap_pa"}
    male = table[(table.kind == "sex") & (table.group == "Male")].iloc[0]
    sel = df["Sex"].to_numpy() == "Male"
    assert male.n == sel.sum() and male.auroc == pytest.approx(roc_auc_score(y[sel], p[sel]))
    assert male.lo < male.auroc < male.hi
    appa = table[table.kind == "ap_pa"]
    assert set(appa.group) == {"AP", "PA"} and appa.n.sum() == (~lateral).sum()
    assert table[table.kind == "age"].n.sum() == 200
    one_class = stats.subgroup_auroc(df.iloc[:3], np.ones(3), p[:3])
    assert one_class.auroc.isna().all()


def test_blank_sex_and_missing_age_form_an_unknown_subgroup():
    y, p = scores(n=200)
    rng = np.random.default_rng(3)
    age = pd.array(rng.integers(18, 95, 200), dtype="Int64")   # the clean table's dtype with blanks
    age[:30] = pd.NA
    sex = rng.choice(["Male", "Female"], 200).astype(object)
    sex[:10], sex[10:15], sex[15:20] = "Unknown", "", None
    df = pd.DataFrame({"Sex": sex, "Age": age})
    table = stats.subgroup_auroc(df, y, p)
    unknown_age = table[(table.kind == "age") & (table.group == "unknown")].iloc[0]
    assert unknown_age.n == 30 and unknown_age.auroc == pytest.approx(roc_auc_score(y[:30], p[:30]))
    ages = table[table.kind == "age"]
    assert ages.n.sum() == 200 and list(ages.group)[-1] == "unknown"   # listed after the bins
    unknown_sex = table[(table.kind == "sex") & (table.group == "unknown")].iloc[0]
    assert unknown_sex.n == 20 and set(table[table.kind == "sex"].group) == {"Female", "Male", "unknown"}


def test_study_aggregation_takes_the_max_over_views():
    paths = ["CheXpert-v1.0-small/valid/patient00001/study1/view1_frontal.jpg",
             "CheXpert-v1.0-small/valid/patient00001/study1/view2_lateral.jpg",
             "CheXpert-v1.0-small/valid/patient00001/study2/view1_frontal.jpg",
             "CheXpert-v1.0-small/valid/patient00002/study1/view1_frontal.jpg"]
    out = stats.aggregate_studies(paths, [1, 1, 0, 0], [0.2, 0.7, 0.4, 0.1])
    assert list(out.study) == ["patient00001/study1", "patient00001/study2", "patient00002/study1"]
    assert list(out.prob) == [0.7, 0.4, 0.1] and list(out.label) == [1, 0, 0]
    assert list(out.views) == [2, 1, 1]


def test_summary_table_lists_per_study_and_tta_results_beside_the_cis():
    from types import SimpleNamespace

    from chexops.evaluation import analysis

    rng = np.random.default_rng(0)
    y = np.array([(i // 2) % 2 for i in range(120)])  # both views of a study share its label
    p = np.clip(0.35 * y + 0.65 * rng.random(len(y)), 0, 1)
    valid = pd.DataFrame({
        "Path": [f"CheXpert-v1.0-small/valid/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.jpg"
                 for i in range(len(y))],
        "Cardiomegaly": y, "Sex": "Male", "Age": 60, "Frontal/Lateral": "Frontal", "AP/PA": "AP"})
    cfg = SimpleNamespace(per_study=True, bootstrap=1000, target_sensitivity=0.9, threshold=0.5)
    result = analysis.analyse(valid, p, ("Cardiomegaly",), cfg, seed=0)
    metrics = {"Cardiomegaly": {"tta": {"auroc": 0.81, "recall": 0.7, "views": 4},
                                "ceiling_auroc": 0.99}}
    table = analysis.summary_table(metrics, result, ("Cardiomegaly",)).set_index("metric")
    study = result.metrics["Cardiomegaly"]["per_study"]
    row = table.loc[f"auroc_per_study ({study['n']} studies)"]
    assert study["n"] == 60 and row["lo"] <= row["value"] <= row["hi"]
    assert table.loc["auroc_tta (4 views)", "value"] == 0.81
    assert table.loc["recall_tta (4 views)", "value"] == 0.7
    assert table.loc["ceiling_auroc", "value"] == 0.99
    assert "auroc" in table.index  # the bootstrap CI rows are still there
