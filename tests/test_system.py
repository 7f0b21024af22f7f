"""UnipairSystem: missing strategies, the encode/fuse contract, training, checkpoints, metrics, optimiser."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_modules import UnipairSystem
from lightning_modules.fusion import MISSING_STRATEGIES
from lightning_modules.metrics import MultilabelSamplesF1, build_metric_collection
from tests.method_fixtures import (
    COMPLETE,
    IMAGE_MISSING,
    TEXT_MISSING,
    SyntheticDataModule,
    SyntheticPairs,
    collate,
    quiet_trainer,
    tiny_system,
)

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


def _batch(codes, seed=0, task="multiclass", num_classes=3):
    data = SyntheticPairs(
        len(codes), num_classes=num_classes, task=task, missing_codes=list(codes), seed=seed
    )
    return collate([data[i] for i in range(len(codes))])


# --------------------------------------------------------------------------- missing strategies


@pytest.mark.parametrize("strategy", MISSING_STRATEGIES)
def test_every_strategy_gives_finite_logits_with_a_missing_modality(strategy):
    model = tiny_system(missing_strategy=strategy).eval()
    batch = _batch([COMPLETE, TEXT_MISSING, IMAGE_MISSING, TEXT_MISSING])
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (4, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("strategy", ["predict", "zero", "learned"])
def test_stand_ins_ignore_the_filler_of_the_missing_modality(strategy):
    model = tiny_system(missing_strategy=strategy).eval()
    batch = _batch([TEXT_MISSING, IMAGE_MISSING])
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    changed["input_ids"][0, 1] = 2500  # row 0's text is missing: whatever it carries must not matter
    changed["image"] = batch["image"].clone()
    changed["image"][1] += 3.0  # row 1's image is missing
    with torch.no_grad():
        assert torch.equal(model(batch), model(changed))


def test_predict_logits_of_a_missing_modality_sample_depend_on_the_present_one():
    model = tiny_system(missing_strategy="predict").eval()
    batch = _batch([TEXT_MISSING, IMAGE_MISSING])
    other = _batch([TEXT_MISSING, IMAGE_MISSING], seed=5)
    with torch.no_grad():
        logits = model(batch)
        new_image = dict(batch, image=torch.cat([other["image"][:1], batch["image"][1:]]))
        assert (model(new_image)[0] - logits[0]).abs().max() > 1e-4  # text missing: the image drives it
        assert torch.equal(model(new_image)[1], logits[1])
        new_text = dict(batch, input_ids=batch["input_ids"].clone())
        new_text["input_ids"][1, 1] = 2007  # row 1 has text (image missing)
        assert (model(new_text)[1] - logits[1]).abs().max() > 1e-4
    # And the prediction is what stands in: z_t of the text-missing sample is replaced by ẑ_t.
    emb = model.encode(batch)
    e_v, e_t = model.missing_fill(
        emb["z_v"], emb["z_t"], emb["zhat_v"], emb["zhat_t"], batch["image_present"], batch["text_present"]
    )
    assert torch.equal(e_t[0], emb["zhat_t"][0]) and torch.equal(e_v[0], emb["z_v"][0])
    assert torch.equal(e_v[1], emb["zhat_v"][1]) and torch.equal(e_t[1], emb["z_t"][1])


def test_sample_without_either_modality_is_rejected_by_id():
    model = tiny_system()
    batch = _batch([COMPLETE, COMPLETE])
    batch["image_present"] = torch.tensor([True, False])
    batch["text_present"] = torch.tensor([True, False])
    with pytest.raises(ValueError, match="synthetic-1"):
        model(batch)


@pytest.mark.parametrize("strategy", MISSING_STRATEGIES)
def test_fuse_with_missing_on_complete_embeddings_equals_encoding_the_fillers(strategy):
    """The robustness evaluation's contract: encode complete inputs once, re-fuse per missing setting."""
    model = tiny_system(missing_strategy=strategy).eval()
    codes = [COMPLETE, TEXT_MISSING, IMAGE_MISSING, TEXT_MISSING, COMPLETE, IMAGE_MISSING]
    complete = _batch([COMPLETE] * len(codes), seed=3)
    with_fillers = _batch(codes, seed=3)  # same samples, fillers where missing
    with torch.no_grad():
        emb = model.encode(complete)
        from_complete = model.fuse_with_missing(
            emb, with_fillers["image_present"], with_fillers["text_present"]
        )
        direct = model(with_fillers)
    tolerance = 1e-5 if strategy == "dummy_input" else 0.0
    assert (from_complete - direct).abs().max() <= tolerance


def test_filler_embeddings_are_constant_in_eval_mode():
    model = tiny_system(missing_strategy="dummy_input").eval()
    first, second = model.filler_embeddings(), model.filler_embeddings()
    assert first["z_v"].shape == (64,) and first["z_t"].shape == (32,)
    assert torch.equal(first["z_v"], second["z_v"]) and torch.equal(first["z_t"], second["z_t"])
    inputs = model.filler_inputs()
    assert inputs["input_ids"].tolist() == [[101, 102]]  # [CLS] [SEP]: the tokenised empty string
    assert inputs["image"].shape == (1, 3, 32, 32) and bool((inputs["image"] == 1).all())
    with torch.no_grad():
        assert torch.equal(model.image_encoder(inputs["image"]).embedding[0], first["z_v"])
        # A parameter change (as after an optimiser step or a checkpoint load) invalidates the cache.
        model.image_encoder.task_prompts.tokens.add_(0.5)
    assert not torch.equal(model.filler_embeddings()["z_v"], first["z_v"])


@pytest.mark.parametrize("strategy", MISSING_STRATEGIES)
def test_each_encoder_runs_on_the_samples_that_have_its_modality(strategy):
    """A missing modality is not encoded (its z is 0), except for dummy_input, whose stand-in is the
    filler's encoding; the present samples' embeddings are those of encoding the whole batch."""
    model = tiny_system(missing_strategy=strategy).eval()
    codes = [COMPLETE, TEXT_MISSING, IMAGE_MISSING, TEXT_MISSING, COMPLETE]
    batch = _batch(codes)
    seen = {}

    def count_rows(name):
        def hook(module, args, out):
            seen[name] = len(args[0])

        return hook

    hooks = [
        model.image_encoder.register_forward_hook(count_rows("image")),
        model.text_encoder.register_forward_hook(count_rows("text")),
    ]
    with torch.no_grad():
        emb = model.encode(batch)
        for hook in hooks:
            hook.remove()
        whole = {
            "z_v": model.image_encoder(batch["image"]).embedding,
            "z_t": model.text_encoder(batch["input_ids"], batch["attention_mask"]).embedding,
        }
    encodes_all = strategy == "dummy_input"
    assert seen == ({"image": 5, "text": 5} if encodes_all else {"image": 4, "text": 3})
    for name, present in (("z_v", batch["image_present"]), ("z_t", batch["text_present"])):
        rows = present.bool()
        torch.testing.assert_close(emb[name][rows], whole[name][rows], rtol=1e-5, atol=1e-6)
        if encodes_all:
            torch.testing.assert_close(emb[name][~rows], whole[name][~rows], rtol=1e-5, atol=1e-6)
        else:
            assert bool((emb[name][~rows] == 0).all())


@pytest.mark.parametrize("strategy", MISSING_STRATEGIES)
@pytest.mark.parametrize(
    "codes",
    [
        [TEXT_MISSING, IMAGE_MISSING, TEXT_MISSING],
        [COMPLETE, TEXT_MISSING, IMAGE_MISSING],
        [IMAGE_MISSING, IMAGE_MISSING],  # no image at all: the image encoder still takes part
    ],
)
def test_every_trainable_parameter_gets_a_gradient_whatever_the_missing_pattern(strategy, codes):
    """Mask, don't skip: with no (or one) complete sample every trainable parameter is still used
    (DDP-safe).
    """
    model = tiny_system(missing_strategy=strategy, substitution=strategy == "predict")
    losses, _ = model.compute_losses(_batch(codes))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_predictor_is_required_for_predict_and_substitution():
    with pytest.raises(ValueError, match="predictor_length=0"):
        tiny_system(predictor_length=0, missing_strategy="predict")
    model = tiny_system(predictor_length=0, missing_strategy="zero")
    losses, _ = model.compute_losses(_batch([COMPLETE, TEXT_MISSING]))
    assert "pred_loss" not in losses and model.encode(_batch([COMPLETE]))["zhat_v"] is None


def test_invalid_options_are_clear_errors():
    with pytest.raises(ValueError, match="missing_strategy: unknown strategy 'drop'"):
        tiny_system(missing_strategy="drop")
    with pytest.raises(ValueError, match="num_classes must be 2"):
        tiny_system(task="binary", num_classes=3)
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_system(lr_schedule="step")


def test_loss_terms_and_substitution():
    seed_everything(0)
    model = tiny_system(substitution=True, pred_loss_weight=0.5)
    losses, _ = model.compute_losses(_batch([COMPLETE, COMPLETE, TEXT_MISSING, COMPLETE]))
    assert set(losses) == {
        "loss",
        "task_loss",
        "substitution_loss",
        "pred_loss",
        "vicreg_invariance",
        "vicreg_variance",
        "vicreg_covariance",
    }
    assert losses["substitution_loss"] > 0
    assert torch.allclose(losses["loss"], losses["task_loss"] + 0.5 * losses["pred_loss"])


# ------------------------------------------------------------------------- training, checkpoints


def _mean_task_loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model.compute_losses(batch)[0]["task_loss"].item() for batch in data.val_dataloader()]
    return sum(losses) / len(losses)


def test_fit_lowers_the_loss_and_checkpoint_reloads_exactly(tmp_path):
    seed_everything(0)
    data = SyntheticDataModule(
        num_train=32,
        num_eval=16,
        batch_size=8,
        train_missing=[COMPLETE, COMPLETE, TEXT_MISSING, IMAGE_MISSING],
    )
    model = tiny_system()
    before = _mean_task_loss(model, data)
    model.train()
    trainer = quiet_trainer(tmp_path, max_epochs=4, log_every_n_steps=1, check_val_every_n_epoch=4)
    trainer.fit(model, datamodule=data)
    after = _mean_task_loss(model, data)
    assert after < 0.7 * before, (before, after)
    assert trainer.callback_metrics["val/accuracy"] > 0.5  # chance is 1/3
    assert "val/image_missing/accuracy" in trainer.callback_metrics

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["state_dict"]
    frozen = model.frozen_state_keys()
    assert frozen and not (frozen & set(state))
    assert "image_encoder.backbone.blocks.0.attn.qkv.weight" not in state
    assert "text_encoder.backbone.embeddings.word_embeddings.weight" not in state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers() if n in model.state_dict()}
    assert set(state) == trainable | buffers
    assert checkpoint["unipair_omitted_frozen_keys"] == len(frozen)

    reloaded = UnipairSystem.load_from_checkpoint(path, weights_only=True).eval()
    model.eval()
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        assert torch.equal(model(batch), reloaded(batch))

    # A checkpoint from another configuration fails clearly.
    with pytest.raises(RuntimeError, match="does not match this UnipairSystem configuration.*task_prompts"):
        UnipairSystem.load_from_checkpoint(path, weights_only=True, image_peft="bitfit")

    # test --ckpt_path on a freshly built model reproduces the validation numbers.
    validated = quiet_trainer(tmp_path).validate(model, datamodule=data, verbose=False)[0]
    tested = quiet_trainer(tmp_path).validate(tiny_system(), datamodule=data, ckpt_path=path, verbose=False)[
        0
    ]
    assert validated == pytest.approx(tested)


@pytest.mark.parametrize(
    "task, num_classes, names",
    [
        ("multilabel", 4, ["f1_macro", "f1_micro", "f1_weighted", "f1_samples"]),
        ("multiclass", 3, ["accuracy", "f1_macro", "ece"]),
        ("binary", 2, ["auroc", "accuracy", "ece"]),
    ],
)
def test_validation_logs_task_metrics_overall_and_per_missing_case(tmp_path, task, num_classes, names):
    data = SyntheticDataModule(num_train=8, num_eval=12, batch_size=4, task=task, num_classes=num_classes)
    model = tiny_system(task=task, num_classes=num_classes)
    results = quiet_trainer(tmp_path).validate(model, datamodule=data, verbose=False)[0]
    for name in names:
        assert f"val/{name}" in results
        for case in ("complete", "text_missing", "image_missing"):
            assert f"val/{case}/{name}" in results
    # Mixed val set: codes cycle complete, text missing, complete, image missing over 12 samples.
    assert results["val/complete/num_samples"] == 6
    assert results["val/text_missing/num_samples"] == 3
    assert model.monitor in results
    # The predicted embeddings' diagnostics, on the complete samples.
    for name in (
        "cos_image",
        "cos_text",
        "std_ratio_image",
        "std_ratio_text",
        "substitution_accuracy_image",
        "substitution_accuracy_text",
    ):
        assert f"val/prediction/{name}" in results
    assert -1.0 <= results["val/prediction/cos_text"] <= 1.0
    assert results["val/prediction/std_ratio_image"] > 0


def test_substitution_accuracy_is_the_heads_accuracy_on_one_predicted_embedding():
    model = tiny_system().eval()
    batch = _batch([COMPLETE, COMPLETE, COMPLETE, TEXT_MISSING])
    with torch.no_grad():
        emb = model.encode(batch)
        logits = {
            "image": model.head(emb["zhat_v"], emb["z_t"]),
            "text": model.head(emb["z_v"], emb["zhat_t"]),
        }
        metric = model.prediction_diagnostics["val_metrics"]
        metric.update(emb, logits, batch["label"], torch.tensor([True, True, True, False]))
        values = metric.compute()
    expected = (logits["text"][:3].argmax(1) == batch["label"][:3]).float().mean()
    assert values["substitution_accuracy_text"] == pytest.approx(float(expected))
    assert values["num_samples"] == 3
    cos = torch.nn.functional.cosine_similarity(emb["zhat_t"][:3], emb["z_t"][:3]).mean()
    assert values["cos_text"] == pytest.approx(float(cos), abs=1e-5)


def test_target_matched_vicreg_learns_the_targets_statistics_in_training_only():
    model = tiny_system(vicreg_space="target_matched")
    batch = _batch([COMPLETE, COMPLETE, COMPLETE, TEXT_MISSING])
    torch.manual_seed(0)  # the same dropout masks in both passes
    model.compute_losses(batch)
    assert int(model.text_moments.num_batches) == 1
    torch.manual_seed(0)
    emb = model.encode(batch)
    expected = emb["z_t"][:3].detach().mean(0)  # the complete rows only
    assert torch.allclose(model.text_moments.mean, expected, atol=1e-5)
    model.eval()
    model.compute_losses(batch)
    assert int(model.text_moments.num_batches) == 1
    assert "text_moments.mean" in model.state_dict()


def test_readonly_grad_detach_keeps_the_prediction_loss_out_of_the_encoders():
    model = tiny_system(readonly_grad="detach", stop_grad_target=True)
    losses, _ = model.compute_losses(_batch([COMPLETE, COMPLETE, COMPLETE, COMPLETE]))
    own = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith(("image_encoder.", "text_encoder.")) and "readonly" not in n
    ]
    grads = torch.autograd.grad(losses["pred_loss"], own, allow_unused=True)
    assert own and all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    through = tiny_system(readonly_grad="through", stop_grad_target=True)
    losses, _ = through.compute_losses(_batch([COMPLETE, COMPLETE, COMPLETE, COMPLETE]))
    own = [
        p
        for n, p in through.named_parameters()
        if p.requires_grad and n.startswith(("image_encoder.", "text_encoder.")) and "readonly" not in n
    ]
    grads = torch.autograd.grad(losses["pred_loss"], own, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_case_without_samples_is_not_logged(tmp_path):
    data = SyntheticDataModule(num_train=8, num_eval=8, batch_size=4)
    data.val_set = SyntheticPairs(8, missing_codes=[COMPLETE, TEXT_MISSING], seed=1)
    results = quiet_trainer(tmp_path).validate(tiny_system(), datamodule=data, verbose=False)[0]
    assert "val/text_missing/accuracy" in results
    assert not any(key.startswith("val/image_missing/") for key in results)


def test_samples_f1_matches_per_sample_definition():
    preds = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.2, 0.3], [0.6, 0.6, 0.6], [0.1, 0.9, 0.1]])
    target = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 1]])
    metric = MultilabelSamplesF1(num_labels=3)
    metric.update(preds[:2], target[:2])
    metric.update(preds[2:], target[2:])
    # Per sample: tp=1 fp=1 fn=0 -> 2/3; nothing predicted or true -> 0 (zero_division); 2*2/(4+1+0) = 0.8; 0.
    assert metric.compute().item() == pytest.approx((2 / 3 + 0 + 0.8 + 0) / 4)


def test_metric_collections_by_task():
    assert set(build_metric_collection("multilabel", 5).keys()) == {
        "f1_macro",
        "f1_micro",
        "f1_weighted",
        "f1_samples",
    }
    assert set(build_metric_collection("multiclass", 5).keys()) == {"accuracy", "f1_macro", "ece"}
    assert set(build_metric_collection("binary", 2).keys()) == {"auroc", "accuracy", "ece"}
    assert tiny_system(task="multilabel", num_classes=4).monitor == "val/f1_macro"
    assert tiny_system(task="binary", num_classes=2).monitor == "val/auroc"


# ------------------------------------------------------------------------------------- optimiser


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_optimizer_groups_and_schedule(schedule):
    model = tiny_system(lr=1e-2, head_lr=1e-3, weight_decay=0.05, warmup_fraction=0.1, lr_schedule=schedule)
    model._trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"encoder", "head", "head_no_decay"}
    assert groups["encoder"]["weight_decay"] == 0.05 and groups["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["head_no_decay"]["params"])
    encoder_ids = {id(p) for p in groups["encoder"]["params"]}
    assert encoder_ids == {
        id(model.image_encoder.task_prompts.tokens),
        id(model.text_encoder.task_prompts.tokens),
    }
    covered = sum(len(g["params"]) for g in optimizer.param_groups)
    assert covered == sum(1 for p in model.parameters() if p.requires_grad)

    def lrs():
        return {g["name"]: g["lr"] for g in optimizer.param_groups}

    assert lrs()["encoder"] == 0.0  # warm-up starts at 0
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert lrs()["encoder"] == pytest.approx(1e-2) and lrs()["head"] == pytest.approx(1e-3)
    for _ in range(85):
        optimizer.step()
        scheduler.step()
    if schedule == "constant":
        assert lrs()["encoder"] == pytest.approx(1e-2)
    else:
        assert lrs()["encoder"] < 1e-3  # decayed towards 0 near the end


def test_std_ratio_is_the_median_over_dimensions_where_the_target_varies():
    from lightning_modules.diagnostics import PredictionDiagnostics

    generator = torch.Generator().manual_seed(7)
    z = torch.randn(50, 4, generator=generator)
    z[:, 3] = 5.0  # a constant dimension (a pretrained embedding can have some): left out
    zhat = z.clone()
    zhat[:, :3] *= torch.tensor([0.5, 0.5, 2.0])
    zhat[:, 3] += 0.1 * torch.randn(50, generator=generator)
    metric = PredictionDiagnostics(4, 4)
    logits = {"image": torch.zeros(50, 3), "text": torch.zeros(50, 3)}
    metric.update(
        {"z_v": z, "zhat_v": zhat, "z_t": z, "zhat_t": zhat},
        logits,
        torch.zeros(50),
        torch.ones(50, dtype=torch.bool),
    )
    assert metric.compute()["std_ratio_text"] == pytest.approx(0.5, rel=1e-4)
