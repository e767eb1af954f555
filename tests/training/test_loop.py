"""train.py, schedule.py, checkpoint.py: the round loop on tiny CPU data (resnet18, 32 px)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import chexops.training.loop as train_mod
import chexops.training.step as step_mod
from chexops.config import ModelConfig, TrainConfig
from chexops.data.batches import ArraySet, make_loader, to_input
from chexops.errors import ChexopsError
from chexops.inference.predictor import predict_probs
from chexops.inference.settings import Settings
from chexops.model.coding import masked_bce
from chexops.model.network import build_model
from chexops.model.weights import state_to_save
from chexops.training.loop import RoundPlan, train_round
from chexops.training.rounds import round_metrics
from chexops.training.schedule import OneCycle, discriminative_lrs
from chexops.training.step import accumulate_grads, auto_batch_size

torch.set_num_threads(1)
CPU = torch.device("cpu")


def tiny_data(n: int = 16, seed: int = 0, size: int = 32) -> ArraySet:
    """Half positives, brighter; labels alternate so every batch holds both classes."""
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n)], dtype=np.float32)
    images = rng.integers(0, 120, (n, size, size), dtype=np.uint8)
    images[labels == 1] += 100
    return ArraySet.from_labels(images, labels)


def plan(**overrides) -> RoundPlan:
    # score_start off: these tests count the trained epochs; epoch 0 has its own tests below
    train = TrainConfig(image_size=32, batch_size=overrides.pop("batch_size", 4),
                        max_batches=overrides.pop("max_batches", 0),
                        score_start=overrides.pop("score_start", False))
    base = dict(epochs=2, lr=(1e-4, 1e-3), freeze=False, seed=7, targets=("Cardiomegaly",),
                train=train)
    return RoundPlan(**{**base, **overrides})


def new_model(seed: int = 0, arch: str = "resnet18"):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch), 1)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def kill_in_epoch(monkeypatch, epoch: int = 2):
    """Make train_one_epoch raise KeyboardInterrupt when epoch `epoch` starts (a kill mid-round);
    returns the function that puts the real one back."""
    real_epoch = train_mod.train_one_epoch

    def killed(*args, **kwargs):
        if args[6] == epoch:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", killed)
    return lambda: monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- schedule and lrs

def test_one_cycle_matches_fastai_formulas():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p]}], lr=1.0)
    total, lr = 100, 3e-3
    sched = OneCycle(opt, [lr], total, pct_start=0.3, div=25.0, final_div=1e4, moms=(0.95, 0.85))
    sched.apply(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr / 25)
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.95)
    sched.apply(30)  # end of warm-up: peak lr, lowest momentum
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert opt.param_groups[0]["betas"] == pytest.approx((0.85, 0.999))  # beta2 untouched
    sched.apply(15)  # half-way up: cosine midpoint
    assert opt.param_groups[0]["lr"] == pytest.approx((lr / 25 + lr) / 2)
    sched.apply(65)  # half-way down
    end = lr / (25 * 1e4)
    assert opt.param_groups[0]["lr"] == pytest.approx((lr + end) / 2)
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.90)
    sched.apply(total)
    assert opt.param_groups[0]["lr"] == pytest.approx(end)
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.95)
    sched.apply(total - 1)  # the last step used: fastai's cosine at pct 99/100
    pct = (99 / 100 - 0.3) / 0.7
    assert opt.param_groups[0]["lr"] == pytest.approx(end + (lr - end) / 2 * (1 + math.cos(math.pi * pct)))


def test_discriminative_lrs():
    assert discriminative_lrs(1e-3, 3) == [1e-3] * 3
    lo, mid, hi = discriminative_lrs((1e-5, 1e-3), 3)
    assert (lo, hi) == pytest.approx((1e-5, 1e-3)) and mid == pytest.approx(1e-4)
    assert discriminative_lrs([1e-5, 2e-5, 3e-5], 3) == [1e-5, 2e-5, 3e-5]


def test_lr_values_that_do_not_fit_the_layer_groups_are_a_clear_error():
    # a reversed range is refused by config.py (tests/test_config.py), before any model exists
    with pytest.raises(ChexopsError, match=r"4 values do not fit 3 layer groups"):
        discriminative_lrs([1e-5, 1e-4, 1e-3, 1e-2], 3)


def test_optimizer_groups_get_the_spread():
    model = new_model()
    opt, peaks = train_mod.make_optimizer(model, (1e-5, 1e-3), 0.01, (0.95, 0.85))
    assert peaks == pytest.approx([1e-5, 1e-4, 1e-3])
    assert [len(g["params"]) for g in opt.param_groups] == [len(g) for g in
                                                            train_mod.layer_groups(model)]


# ---------------------------------------------------------------- loss and batches

def test_masked_loss_ignores_uncertain_labels():
    logits = torch.tensor([[2.0], [-1.0], [5.0]])
    raw = np.array([[1.0], [-1.0], [0.0]])
    data = ArraySet.from_labels(np.zeros((3, 4, 4), np.uint8), raw)
    assert data.mask.tolist() == [[True], [False], [True]]
    loss = masked_bce(logits, torch.from_numpy(data.labels), torch.from_numpy(data.mask), None)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 5.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(expected.item())
    changed = logits.clone()
    changed[1] = 100.0  # the masked row's prediction does not matter
    assert masked_bce(changed, torch.from_numpy(data.labels), torch.from_numpy(data.mask),
                      None).item() == pytest.approx(loss.item())


def test_pos_weight_weights_positives():
    logits, y, m = torch.zeros(2, 1), torch.tensor([[1.0], [0.0]]), torch.ones(2, 1, dtype=torch.bool)
    assert masked_bce(logits, y, m, 3.0).item() == pytest.approx(math.log(2) * 4 / 2)


def test_input_is_normalised_three_channels():
    x = to_input(torch.full((2, 8, 8), 255, dtype=torch.uint8), CPU)
    assert x.shape == (2, 3, 8, 8)
    assert x[0, :, 0, 0].tolist() == pytest.approx([(1 - .485) / .229, (1 - .456) / .224,
                                                    (1 - .406) / .225], rel=1e-5)


def test_oversampled_rows_share_images_through_index():
    images = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 20)])
    data = ArraySet.from_labels(images, np.array([0, 1, 1], np.float32), np.array([0, 1, 1]))
    batch = next(iter(make_loader(data, 3, False, None)))
    assert batch[0][:, 0, 0].tolist() == [10, 20, 20] and batch[1].ravel().tolist() == [0, 1, 1]


# ---------------------------------------------------------------- the round

def test_round_writes_best_weights_and_history(tmp_path):
    rows = []
    result = train_round(new_model(), tiny_data(), tiny_data(8, seed=1), plan(),
                         tmp_path / "best.safetensors", on_epoch_end=rows.append)
    assert [r["epoch"] for r in result.history] == [1, 2] and rows == result.history
    assert set(rows[0]) == {"epoch", "train_loss", "valid_loss", "auroc", "precision", "recall",
                            "error_rate", "lr"}
    assert result.best_epoch in (1, 2)
    assert result.best_metrics["targets"]["Cardiomegaly"]["confusion"]
    assert (tmp_path / "best.safetensors").is_file()
    # the last of 8 steps (2 epochs x 4 batches) anneals the head's lr at pct 7/8
    pct = (7 / 8 - 0.3) / 0.7
    end = 1e-3 / (25 * 1e4)
    assert result.history[-1]["lr"] == pytest.approx(end + (1e-3 - end) / 2 * (1 + math.cos(math.pi * pct)))


def test_worse_epoch_never_overwrites_best_weights(tmp_path, monkeypatch):
    scores = iter([0.8, 0.6])
    real = train_mod.validate

    def fake_validate(*args, **kwargs):
        return {**real(*args, **kwargs), "auroc": next(scores)}

    monkeypatch.setattr(train_mod, "validate", fake_validate)
    out = tmp_path / "best.safetensors"
    snapshots = []
    result = train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(), out,
                         on_epoch_end=lambda row: snapshots.append(out.read_bytes()))
    assert result.best_epoch == 1 and result.best_metrics["auroc"] == 0.8
    assert snapshots[0] == snapshots[1] == out.read_bytes()


def scripted_aurocs(monkeypatch, scores: list[float]) -> None:
    """validate() as it is, but reporting the given AUROCs in turn (epoch 0 first, if scored)."""
    it, real = iter(scores), train_mod.validate
    monkeypatch.setattr(train_mod, "validate",
                        lambda *a, **k: {**real(*a, **k), "auroc": next(it)})


def test_a_round_whose_epochs_never_beat_its_start_hands_on_its_start(tmp_path, monkeypatch):
    scripted_aurocs(monkeypatch, [0.9, 0.6, 0.7])  # the start, then two worse epochs
    model, out, rows = new_model(), tmp_path / "best.safetensors", []
    start = {k: v.clone() for k, v in state_to_save(model).items()}
    result = train_round(model, tiny_data(), tiny_data(8, 1), plan(score_start=True), out,
                         on_epoch_end=rows.append)
    assert [r["epoch"] for r in result.history] == [0, 1, 2] and rows == result.history
    assert rows[0]["train_loss"] is None and rows[0]["lr"] is None  # scored, not trained
    assert result.best_epoch == 0 and result.best_metrics["auroc"] == 0.9
    written = load_file(str(out))
    assert written.keys() == start.keys()
    assert all(torch.equal(written[k], start[k]) for k in start)  # the very weights it started from
    assert round_metrics(result)["kept_start"] is True


def test_an_epoch_that_beats_the_start_replaces_it(tmp_path, monkeypatch):
    scripted_aurocs(monkeypatch, [0.6, 0.8, 0.7])
    result = train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(score_start=True),
                         tmp_path / "best.safetensors")
    assert result.best_epoch == 1 and round_metrics(result)["kept_start"] is False


def test_the_seed_studys_behaviour_keeps_the_rounds_best_epoch_even_below_its_start(
        tmp_path, monkeypatch):
    scripted_aurocs(monkeypatch, [0.6, 0.7])  # no epoch 0: the start is never scored
    result = train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(score_start=False),
                         tmp_path / "best.safetensors")
    assert [r["epoch"] for r in result.history] == [1, 2] and result.best_epoch == 2


def test_non_finite_loss_names_epoch_and_batch_and_keeps_best(tmp_path):
    model = new_model()
    poisoned = {"on": False}
    model.register_forward_hook(lambda m, i, o: o * float("nan") if poisoned["on"] else o)
    out = tmp_path / "best.safetensors"

    def after_epoch(row):
        poisoned["on"] = True  # epoch 2 diverges from its first batch
        after_epoch.best = out.read_bytes()

    with pytest.raises(ChexopsError, match=r"non-finite training loss .* epoch 2, batch 0; "
                                           r"lower the round's lr"):
        train_round(model, tiny_data(), tiny_data(8, 1), plan(), out, on_epoch_end=after_epoch)
    assert out.read_bytes() == after_epoch.best


def test_non_finite_loss_on_flat_images_blames_the_data_not_the_lr(tmp_path):
    model = new_model()
    model.register_forward_hook(lambda m, i, o: o * float("nan"))
    flat = tiny_data()
    flat.images[:] = 255                     # what a mis-scaled 16-bit PNG used to decode to
    with pytest.raises(ChexopsError) as info:
        train_round(model, flat, tiny_data(8, 1), plan(), tmp_path / "best.safetensors")
    msg = str(info.value)
    assert "epoch 1, batch 0; every image of the batch is one flat grey level" in msg
    assert "lr" not in msg.split(";")[1]


def test_non_finite_validation_outputs_name_the_epoch_and_keep_best(tmp_path):
    model = new_model()
    poisoned = {"on": False}
    # training stays finite; only the eval-mode outputs blow up (as diverged BatchNorm stats do)
    model.register_forward_hook(
        lambda m, i, o: o * float("inf") if poisoned["on"] and not m.training else o)
    out = tmp_path / "best.safetensors"

    def after_epoch(row):
        poisoned["on"] = True
        after_epoch.best = out.read_bytes()

    with pytest.raises(ChexopsError, match=r"validation outputs are not finite after epoch 2"):
        train_round(model, tiny_data(), tiny_data(8, 1), plan(), out, on_epoch_end=after_epoch)
    assert out.read_bytes() == after_epoch.best


def test_single_class_validation_is_refused_before_training(tmp_path):
    valid = ArraySet.from_labels(np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.float32))
    with pytest.raises(ChexopsError, match="only negative Cardiomegaly cases: AUROC is undefined"):
        train_round(new_model(), tiny_data(), valid, plan(), tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    empty = ArraySet.from_labels(np.zeros((0, 32, 32), np.uint8), np.zeros(0, np.float32))
    with pytest.raises(ChexopsError, match="validation split is empty"):
        train_round(new_model(), tiny_data(), empty, plan(), tmp_path / "b.safetensors")


def test_frozen_round_trains_head_and_batchnorm_only(tmp_path):
    model = new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_round(model, tiny_data(), tiny_data(8, 1), plan(epochs=1, freeze=True, lr=1e-3),
                tmp_path / "b.safetensors")
    after = model.state_dict()
    assert torch.equal(before["body.conv1.weight"], after["body.conv1.weight"])
    assert torch.equal(before["body.layer4.1.conv2.weight"], after["body.layer4.1.conv2.weight"])
    assert not torch.equal(before["body.bn1.weight"], after["body.bn1.weight"])
    assert not torch.equal(before["head.8.weight"], after["head.8.weight"])


def test_same_seed_gives_bit_identical_weights(tmp_path):
    for name in ("a", "b"):
        train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(epochs=1),
                    tmp_path / f"{name}.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    data, valid = tiny_data(), tiny_data(8, 1)
    full = train_round(new_model(), data, valid, plan(epochs=3), tmp_path / "full.safetensors",
                       checkpoint_path=tmp_path / "ck-full" / "last.pt", fingerprint="f")
    full_model_state = weights(tmp_path / "full.safetensors")
    assert not (tmp_path / "ck-full" / "last.pt").exists()  # a finished round removes it

    ck = tmp_path / "ck" / "last.pt"
    restore = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_round(new_model(), data, valid, plan(epochs=3), tmp_path / "r.safetensors",
                    checkpoint_path=ck, fingerprint="f", run_id="run-123")
    assert ck.is_file()
    saved = torch.load(ck, weights_only=True)  # plain tensors and values only
    assert saved["epoch"] == 1 and saved["run_id"] == "run-123"
    restore()
    (tmp_path / "r.safetensors").unlink()  # DVC removes outputs before re-running a stage
    resumed = train_round(new_model(seed=99), data, valid, plan(epochs=3),
                          tmp_path / "r.safetensors", checkpoint_path=ck, fingerprint="f")
    assert resumed.resumed_from == 1
    assert resumed.history == full.history and resumed.best_epoch == full.best_epoch
    assert_same(weights(tmp_path / "r.safetensors"), full_model_state)
    assert not ck.exists()


def test_checkpoint_with_another_fingerprint_is_ignored(tmp_path, monkeypatch):
    ck = tmp_path / "ck" / "last.pt"
    # write a checkpoint for fingerprint "old" by crashing in epoch 2
    restore = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(), tmp_path / "a.safetensors",
                    checkpoint_path=ck, fingerprint="old")
    restore()
    result = train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(epochs=1),
                         tmp_path / "b.safetensors", checkpoint_path=ck, fingerprint="new")
    assert result.resumed_from is None and len(result.history) == 1


# ---------------------------------------------------------------- memory

def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    model = new_model().eval()  # eval: BatchNorm uses running stats, so chunks are comparable
    data = tiny_data(8)
    images, labels, mask = (torch.from_numpy(data.images), torch.from_numpy(data.labels),
                            torch.from_numpy(data.mask))
    s = Settings(CPU)
    accumulate_grads(model, images, labels, mask, 8, s)
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    accumulate_grads(model, images, labels, mask, 3, s)  # chunks 3, 3, 2
    for g, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_out_of_memory_halves_micro_batch_and_keeps_effective_batch(tmp_path):
    model = new_model()
    sizes = []

    def fake_oom(module, args):
        if module.training:
            sizes.append(args[0].shape[0])
            if args[0].shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    model.register_forward_pre_hook(fake_oom)
    result = train_round(model, tiny_data(), tiny_data(8, 1), plan(epochs=1, batch_size=8),
                         tmp_path / "b.safetensors")
    assert result.batch_size == 8 and result.micro_batch == 2
    # batch 1: 8 and 4 fail, then 4 chunks of 2; batch 2 starts at 2: one step per 8 images
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 2, 2, 2]


def test_out_of_memory_at_the_smallest_micro_batch_is_a_clear_error(tmp_path):
    model = new_model()

    def always_oom(module, args):
        if module.training:
            raise torch.OutOfMemoryError("injected")

    model.register_forward_pre_hook(always_oom)
    with pytest.raises(ChexopsError, match="out of memory even at micro-batch 2"):
        train_round(model, tiny_data(), tiny_data(8, 1), plan(epochs=1, batch_size=4),
                    tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def test_auto_batch_size_on_cpu_is_16(tmp_path):
    assert auto_batch_size(new_model(), 32, 1, Settings(CPU), 1000) == 16
    result = train_round(new_model(), tiny_data(32), tiny_data(8, 1),
                         plan(epochs=1, batch_size="auto", max_batches=1),
                         tmp_path / "b.safetensors")
    assert result.batch_size == 16


class FakeCuda:
    """Only what the batch-size search reads: the device type."""
    type = "cuda"


def test_auto_batch_size_on_cuda_halves_to_the_largest_batch_that_fits(monkeypatch):
    """The GPU search, driven on CPU kernels: the probe's forward/backward raises an injected
    out-of-memory above 100 items, so 1024 -> 512 -> ... -> 64 is the answer; the probe runs on a
    copy (BatchNorm statistics untouched) and never exceeds the number of training items."""
    real = step_mod.accumulate_grads
    probed = []

    def oom_above_100(model, images, *args, **kwargs):
        probed.append(len(images))
        if len(images) > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, images, *args[:3], Settings(CPU), **kwargs)  # fits: run it on CPU

    monkeypatch.setattr(step_mod, "accumulate_grads", oom_above_100)
    cuda_like = Settings(FakeCuda())
    model = new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert auto_batch_size(model, 16, 1, cuda_like, 10_000) == 64
    assert probed == [1024, 512, 256, 128, 64]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    probed.clear()
    assert auto_batch_size(model, 16, 1, cuda_like, 40) == 32  # no batch above the data
    assert probed == [32]


def test_auto_batch_size_does_not_hide_errors_that_are_not_out_of_memory(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(step_mod, "accumulate_grads", broken)
    cuda_like = Settings(FakeCuda())
    with pytest.raises(RuntimeError, match="shape mismatch"):
        auto_batch_size(new_model(), 16, 1, cuda_like, 10_000)


def test_runtime_compile_trains_through_torch_compile_and_matches_eager(tmp_path, monkeypatch):
    """runtime.compile wraps the (DDP-wrapped) model in torch.compile. Inductor's code
    generation takes minutes on this CPU (benchmarks/README.md), so the round's torch.compile
    call is given backend="eager": TorchDynamo really traces the model into FX graphs and the
    round trains through them (run with the eager kernels), and the weights must be
    bit-identical to those of the uncompiled round."""
    import torch._dynamo
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    from chexops.config import RuntimeConfig

    real_compile = torch.compile
    compiled = []

    def eager_compile(model, **kwargs):
        assert kwargs.get("backend", "inductor") == "inductor", kwargs  # the project's default
        out = real_compile(model, **{**kwargs, "backend": "eager"})
        compiled.append(out)
        return out

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    counters.clear()
    try:
        train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(epochs=1),
                    tmp_path / "eager.safetensors")
        assert compiled == [] and counters["stats"]["unique_graphs"] == 0
        train_round(new_model(), tiny_data(), tiny_data(8, 1),
                    plan(epochs=1, runtime=RuntimeConfig(compile=True)),
                    tmp_path / "compiled.safetensors")
        assert len(compiled) == 1 and isinstance(compiled[0], OptimizedModule)
        assert counters["stats"]["unique_graphs"] > 0  # Dynamo traced it: the round ran compiled
    finally:
        torch._dynamo.reset()
    assert_same(weights(tmp_path / "eager.safetensors"), weights(tmp_path / "compiled.safetensors"))


def test_predict_probs_in_order_and_in_range():
    model = new_model().eval()
    data = tiny_data(6)
    probs = predict_probs(model, make_loader(data, 4, False, None), "cpu")
    assert probs.shape == (6, 1) and ((probs > 0) & (probs < 1)).all()
    one = predict_probs(model, make_loader(ArraySet(data.images[2:3], data.labels[2:3],
                                                    data.mask[2:3]), 4, False, None), "cpu")
    assert one[0, 0] == pytest.approx(probs[2, 0], rel=1e-5)


def _batch(n: int = 8):
    data = tiny_data(n)
    return (torch.from_numpy(data.images), torch.from_numpy(data.labels),
            torch.from_numpy(data.mask))


def test_oom_retry_reuses_the_steps_denominator_collective(monkeypatch):
    """The label count is all-reduced once per step, before the retry loop: a rank that retries
    after out-of-memory makes no collective its peers do not make too."""
    calls = []
    real = train_mod.distributed.mean_over_ranks
    monkeypatch.setattr(train_mod.distributed, "mean_over_ranks",
                        lambda t: calls.append(float(t)) or real(t))
    model = new_model()
    sizes = []

    def oom_above_2(module, args):
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("injected")

    model.register_forward_pre_hook(oom_above_2)
    opt, _ = train_mod.make_optimizer(model, 1e-3, 0.01, (0.95, 0.85))
    loss, micro = step_mod.train_step(model.train(), _batch(8), opt, 8, Settings(CPU))
    assert micro == 2 and sizes == [8, 4, 2, 2, 2, 2] and torch.isfinite(loss)
    assert calls == [8.0]  # one denominator for the step, not one per attempt


def test_another_ranks_oom_makes_this_rank_halve_too(monkeypatch):
    """The retry decision is collective: when any rank reports out-of-memory (the all-reduced
    flag), every rank halves and retries, even one whose own attempt succeeded."""
    flags = []

    def any_over_ranks(flag, device):  # stands in for the MAX all-reduce over 2 ranks
        flags.append(flag)
        return flag or len(flags) == 1  # the other rank failed on the first attempt

    monkeypatch.setattr(train_mod.distributed, "any_over_ranks", any_over_ranks)
    reduced = []
    monkeypatch.setattr(train_mod.distributed, "all_reduce_grads", reduced.append)
    model = new_model()
    sizes = []
    model.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    opt, _ = train_mod.make_optimizer(model, 1e-3, 0.01, (0.95, 0.85))
    _, micro = step_mod.train_step(model.train(), _batch(8), opt, 8, Settings(CPU))
    assert flags == [False, False] and micro == 4 and sizes == [8, 4, 4]
    assert reduced == [model]  # gradients averaged once, after the agreement


def test_out_of_memory_in_the_optimizer_step_is_a_clear_error(tmp_path, monkeypatch):
    def oom_step(self, closure=None):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(torch.optim.AdamW, "step", oom_step)
    with pytest.raises(ChexopsError, match=r"out of memory in the optimizer step .*smaller "
                                           r"train.batch_size"):
        train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(epochs=1),
                    tmp_path / "b.safetensors")


def test_epoch_is_reported_only_after_its_checkpoint_is_saved(tmp_path):
    """on_epoch_end (the MLflow epoch log) runs after the checkpoint of that epoch is on disk,
    so a resumed round never re-trains an epoch it has already reported."""
    ck = tmp_path / "ck" / "last.pt"
    seen = []

    def on_epoch_end(row):
        saved = torch.load(ck, weights_only=True)
        seen.append((row["epoch"], saved["epoch"], saved["history"][-1] == row))

    train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(epochs=2),
                tmp_path / "b.safetensors", checkpoint_path=ck, fingerprint="f",
                on_epoch_end=on_epoch_end)
    assert seen == [(1, 1, True), (2, 2, True)]
    assert not ck.exists()  # the finished round still removes it afterwards


def test_a_kill_between_checkpoint_and_report_re_reports_that_epoch_on_resume(tmp_path):
    """The crash comes after epoch 1's checkpoint but before its report: the resume reports
    epoch 1 (at-least-once) before training epoch 2, so no epoch goes unlogged."""
    ck = tmp_path / "ck" / "last.pt"
    reported = []

    def killed_while_reporting(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(epochs=2),
                    tmp_path / "b.safetensors", checkpoint_path=ck, fingerprint="f",
                    on_epoch_end=killed_while_reporting)
    assert torch.load(ck, weights_only=True)["epoch"] == 1
    train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(epochs=2),
                tmp_path / "b.safetensors", checkpoint_path=ck, fingerprint="f",
                on_epoch_end=lambda row: reported.append(row["epoch"]))
    assert reported == [1, 2]


def test_checkpoint_keeps_the_lr_found(tmp_path, monkeypatch):
    kill_in_epoch(monkeypatch, 2)
    ck = tmp_path / "ck" / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        train_round(new_model(), tiny_data(), tiny_data(8, 1), plan(lr=2.5e-3),
                    tmp_path / "b.safetensors", checkpoint_path=ck, fingerprint="f",
                    lr_found=np.float64(2.5e-3))
    assert torch.load(ck, weights_only=True)["lr_found"] == 2.5e-3
