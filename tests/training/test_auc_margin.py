"""loss auc_margin: LibAUC's AUC-margin loss under label masks and several targets, its params
rules, a tiny round trained with PESG (and resumed), and the one-line error without libauc."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import yaml

from chexops import cli
from chexops.config import ConfigError, params_from_dict
from chexops.errors import ChexopsError
from chexops.training import auc_margin
from chexops.training.auc_margin import MISSING, AUCMargin, imbalance_ratios
from chexops.training.loop import train_round
from chexops.training.rounds import round_metrics
from tests.test_config import with_change
from tests.training.test_loop import assert_same, kill_in_epoch, new_model, plan, tiny_data, weights

torch.set_num_threads(1)


def batch(seed: int = 0, n: int = 12, t: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, generator=g)
    labels = (torch.arange(n)[:, None] + torch.arange(t)[None, :]) % 2
    mask = torch.rand(n, t, generator=g) > 0.3
    return logits, labels.float(), mask


def loss_fn(t: int = 3) -> AUCMargin:
    loss = AUCMargin([0.3, 0.5, 0.2][:t], margin=1.0, device="cpu")
    with torch.no_grad():  # away from zero, so every term of the objective counts
        loss.a.copy_(torch.tensor([0.6, 0.7, 0.8][:t]))
        loss.b.copy_(torch.tensor([0.2, 0.3, 0.1][:t]))
        loss.alpha.copy_(torch.tensor([0.5, 1.0, 0.2][:t]))
    return loss


# ---------------------------------------------------------------- the loss

def test_masked_labels_do_not_change_the_loss_or_its_gradient():
    logits, labels, mask = batch()
    logits.requires_grad_(True)
    loss = loss_fn()
    value = loss(logits, labels, mask)
    (grad,) = torch.autograd.grad(value, logits)
    flipped = torch.where(mask, labels, 1 - labels)  # every masked label changed
    assert torch.equal(loss(logits, flipped, mask), value)
    assert torch.all(grad[~mask] == 0) and torch.any(grad[mask] != 0)


def test_several_targets_average_the_targets_with_labels():
    logits, labels, mask = batch()
    mask[:, 1] = False  # target 1 has no labels in this batch: left out of the mean
    loss = loss_fn()
    single = [AUCMargin([p], 1.0, "cpu") for p in (0.3, 0.2)]
    for j, term in zip((0, 2), single):
        with torch.no_grad():
            term.a.fill_(loss.a[j]), term.b.fill_(loss.b[j]), term.alpha.fill_(loss.alpha[j])
    one = [term(logits[:, [j]], labels[:, [j]], mask[:, [j]]) for j, term in zip((0, 2), single)]
    assert torch.allclose(loss(logits, labels, mask), (one[0] + one[1]) / 2)


def test_micro_batches_add_up_to_the_whole_batch():
    logits, labels, mask = batch(n=16)
    loss = loss_fn()
    denom = mask.float().sum(0)
    chunks = sum(loss(logits[sl], labels[sl], mask[sl], denom) for sl in (slice(0, 7), slice(7, 16)))
    assert torch.allclose(chunks, loss(logits, labels, mask), atol=1e-6)


def test_one_target_without_a_mask_equals_libaucs_aucm_loss():
    losses = pytest.importorskip("libauc.losses")
    logits, labels, _ = batch(t=1)
    mine = loss_fn(t=1)
    ref = losses.AUCMLoss(margin=1.0, imratio=0.3, device="cpu")
    ref.a, ref.b, ref.alpha = mine.a.detach(), mine.b.detach(), mine.alpha.detach()
    expected = ref(torch.sigmoid(logits), labels, auto=False)
    assert torch.allclose(mine(logits, labels, torch.ones_like(labels, dtype=torch.bool)),
                          expected.reshape(()), atol=1e-6)


def test_imbalance_ratios_count_only_labelled_rows():
    labels = np.array([[1, 1], [0, 1], [1, 0], [0, 0]], dtype=np.float32)
    mask = np.array([[True, True], [True, False], [False, True], [False, True]])
    assert imbalance_ratios(labels, mask, ("A", "B")) == [0.5, 1 / 3]
    with pytest.raises(ChexopsError, match="no labelled positive A cases"):
        imbalance_ratios(labels * 0, mask, ("A", "B"))


# ---------------------------------------------------------------- params

def test_a_round_with_auc_margin_validates_and_bce_stays_the_default():
    raw = with_change("rounds.r2", {"epochs": 1, "lr": 1e-3, "loss": "auc_margin"})
    params = params_from_dict(raw)
    assert params.round(2).loss == "auc_margin"
    assert [params.round(k).loss for k in (1, 3, 4, 5)] == ["bce"] * 4
    assert params_from_dict(with_change("train.loss", "auc_margin")).round(5).loss == "auc_margin"


@pytest.mark.parametrize("path, value, message", [
    ("train.loss", "focal", "train.loss: unknown loss 'focal'; choose from bce, auc_margin"),
    ("rounds.r3", {"epochs": 1, "lr": 1e-3, "loss": "auc"},
     "rounds.r3.loss: unknown loss 'auc'; choose from bce, auc_margin"),
    ("train.auc_margin", {"margin": 0}, "train.auc_margin.margin: 0.0 must be > 0"),
    ("train.auc_margin", {"mode": "rmsprop"}, "train.auc_margin.mode: 'rmsprop' must be sgd or adam"),
])
def test_bad_loss_params_are_one_line_errors(path, value, message):
    with pytest.raises(ConfigError) as exc:
        params_from_dict(with_change(path, value))
    assert str(exc.value) == message


def test_multiclass_with_auc_margin_is_refused():
    raw = with_change("rounds.r4", {"epochs": 1, "lr": 1e-3, "loss": "auc_margin"})
    raw["clean"]["uncertainty"] = {"Cardiomegaly": "multiclass"}
    with pytest.raises(ConfigError, match=r"^rounds.r4.loss: auc_margin needs one score per "
                                          r"target, but Cardiomegaly is multiclass") as exc:
        params_from_dict(raw)
    assert "\n" not in str(exc.value)
    params_from_dict(with_change("clean.uncertainty", {"Cardiomegaly": "multiclass"}))  # bce: fine


# ---------------------------------------------------------------- a round

def test_a_tiny_auc_margin_round_trains_finite_weights_and_records_its_loss(tmp_path):
    pytest.importorskip("libauc.optimizers")
    out = tmp_path / "best.safetensors"
    start = {k: v.clone() for k, v in new_model().state_dict().items()}
    result = train_round(new_model(), tiny_data(), tiny_data(8, 1),
                         plan(epochs=2, loss="auc_margin", score_start=False), out)
    trained = weights(out)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k in start)
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert round_metrics(result)["loss"] == "auc_margin" and result.loss == "auc_margin"


def test_an_auc_margin_round_resumed_after_a_crash_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """The last epoch's weights (not only the best's): PESG's a, b, alpha and reference weights
    come back from the checkpoint and stay tied to the loss."""
    pytest.importorskip("libauc.optimizers")
    data, valid = tiny_data(), tiny_data(8, 1)
    p = plan(epochs=3, loss="auc_margin")
    full = new_model()
    train_round(full, data, valid, p, tmp_path / "full.safetensors", checkpoint_path=tmp_path / "a.pt")
    with monkeypatch.context() as m:
        kill_in_epoch(m, epoch=3)
        with pytest.raises(KeyboardInterrupt):
            train_round(new_model(), data, valid, p, tmp_path / "r.safetensors",
                        checkpoint_path=tmp_path / "b.pt")
    resumed = new_model(seed=99)
    result = train_round(resumed, data, valid, p, tmp_path / "r.safetensors",
                         checkpoint_path=tmp_path / "b.pt")
    assert result.resumed_from == 2
    assert_same(full.state_dict(), resumed.state_dict())


# ---------------------------------------------------------------- without libauc

def test_without_libauc_an_auc_margin_round_fails_fast_with_the_install_command(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libauc", None)  # `import libauc...` raises ImportError
    monkeypatch.setitem(sys.modules, "libauc.optimizers", None)
    with pytest.raises(ChexopsError) as exc:
        auc_margin.require_libauc()
    assert str(exc.value) == MISSING == "train.loss auc_margin needs libauc: pip install -e '.[auc]'"
    with pytest.raises(ChexopsError, match="needs libauc"):
        train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(loss="auc_margin"),
                    tmp_path / "b.safetensors")
    raw = with_change("train.loss", "auc_margin")
    raw["runtime"]["threads"] = 1
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    # the stage fails before reading any data (tmp_path has none) or opening an MLflow run
    assert cli.main(["--params", str(params_file), "--root", str(tmp_path), "train-round", "2"]) != 0
    assert MISSING in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
