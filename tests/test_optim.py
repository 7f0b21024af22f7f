"""Optimiser groups and schedules (lightning_modules/optim.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.optim import configure_adamw, lr_scheduler, no_weight_decay_names, parameter_groups
from tests.method_fixtures import tiny_system


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): group for group in groups for p in group["params"]}


def test_full_mode_exempts_position_embeddings_and_tokens_from_weight_decay():
    model = tiny_system(image_peft="full", text_peft="full")
    groups = parameter_groups(model, lr=1e-4, head_lr=1e-3, weight_decay=0.05)
    by_param = _group_of(groups)
    params = dict(model.named_parameters())
    trainable = [name for name, p in params.items() if p.requires_grad]
    assert sorted(by_param) == sorted(id(params[n]) for n in trainable)  # each exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)

    vit = "image_encoder.backbone."
    bert = "text_encoder.backbone.embeddings."
    for name in (
        vit + "pos_embed",
        vit + "cls_token",
        bert + "position_embeddings.weight",
        bert + "token_type_embeddings.weight",
        vit + "blocks.0.norm1.weight",
        vit + "blocks.0.attn.qkv.bias",
    ):
        group = by_param[id(params[name])]
        assert (group["name"], group["weight_decay"], group["lr"]) == ("encoder_no_decay", 0.0, 1e-4), name
    for name in (vit + "blocks.0.attn.qkv.weight", bert + "word_embeddings.weight"):
        assert (
            by_param[id(params[name])]["name"] == "encoder"
            and by_param[id(params[name])]["weight_decay"] == 0.05
        )
    head_weight = next(n for n in trainable if n.startswith("head.") and params[n].ndim == 2)
    assert (by_param[id(params[head_weight])]["name"], by_param[id(params[head_weight])]["lr"]) == (
        "head",
        1e-3,
    )


def test_no_weight_decay_names_follow_timm():
    model = tiny_system()
    vit = model.image_encoder.backbone
    names = no_weight_decay_names(model)
    assert {f"image_encoder.backbone.{n}" for n in vit.no_weight_decay()} <= names
    assert "text_encoder.backbone.embeddings.word_embeddings.weight" not in names


def test_prompt_mode_groups_are_the_one_dimensional_rule():
    model = tiny_system()
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.02)
    by_param = _group_of(groups)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert (by_param[id(param)]["weight_decay"] == 0.0) == (param.ndim < 2), name
    assert {g["lr"] for g in groups} == {1e-3}  # head_lr None = lr


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_schedules_warm_up_then_decay(schedule, expected):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, schedule, warmup_steps=2, total_steps=6)
    factors = []
    for _ in range(7):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert factors == pytest.approx(expected, abs=1e-3)


def test_configure_adamw_and_unknown_schedule():
    model = tiny_system()
    config = configure_adamw(model, 1e-3, 1e-2, 0.02, warmup_fraction=0.5, schedule="linear", total_steps=10)
    assert isinstance(config["optimizer"], torch.optim.AdamW) and config["lr_scheduler"]["interval"] == "step"
    assert config["optimizer"].param_groups[0]["lr"] == 0.0  # first of 5 warm-up steps
    with pytest.raises(ValueError, match="lr_schedule: unknown schedule 'step'"):
        lr_scheduler(config["optimizer"], "step", 0, 10)
