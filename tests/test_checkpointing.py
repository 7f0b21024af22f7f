"""Slim checkpoints: frozen weights left out, their digests stored and verified on load."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_modules.checkpointing import (
    ACCEPT_CHANGE_ENV,
    CHECKPOINT_DIGEST_KEY,
    CHECKPOINT_OMITTED_KEY,
    CheckpointMismatchError,
    frozen_digests,
    frozen_state_keys,
    restore_frozen_weights,
    slim_checkpoint,
    tensor_digests,
)
from tests.method_fixtures import tiny_system


def _saved(model) -> dict:
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    slim_checkpoint(model, checkpoint)
    return checkpoint


def test_tensor_digests_see_every_byte_name_and_dtype_but_not_the_order():
    a = {"enc.w": torch.arange(6.0).view(2, 3), "enc.b": torch.ones(3), "other.w": torch.zeros(2)}
    digests = tensor_digests(a)
    assert set(digests) == {"enc", "other"} and digests["enc"]["tensors"] == 2
    assert tensor_digests(dict(reversed(list(a.items())))) == digests
    changed = dict(a, **{"enc.w": a["enc.w"].clone()})
    changed["enc.w"][1, 2] += 1e-6
    assert tensor_digests(changed)["enc"]["sha256"] != digests["enc"]["sha256"]
    assert tensor_digests(changed)["other"] == digests["other"]
    renamed = {"enc.w2": a["enc.w"], "enc.b": a["enc.b"]}
    assert tensor_digests(renamed)["enc"]["sha256"] != digests["enc"]["sha256"]
    reshaped = dict(a, **{"enc.w": a["enc.w"].reshape(3, 2)})
    assert tensor_digests(reshaped)["enc"]["sha256"] != digests["enc"]["sha256"]
    as_double = dict(a, **{"enc.w": a["enc.w"].double()})
    assert tensor_digests(as_double)["enc"]["sha256"] != digests["enc"]["sha256"]


def test_bfloat16_weights_compare_with_the_float32_rebuild_cast_alike():
    weights = {"enc.w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}
    saved = tensor_digests({"enc.w": weights["enc.w"].bfloat16()})
    assert saved["enc"]["dtype"] == "bfloat16"
    assert tensor_digests(weights)["enc"]["sha256"] != saved["enc"]["sha256"]
    assert tensor_digests(weights, dtypes={"enc": "bfloat16"}) == saved


def test_slim_checkpoint_omits_frozen_weights_and_stores_their_digests():
    model = tiny_system()
    checkpoint = _saved(model)
    frozen = frozen_state_keys(model)
    assert frozen and not frozen & set(checkpoint["state_dict"])
    assert checkpoint[CHECKPOINT_OMITTED_KEY] == len(frozen)
    digests = checkpoint[CHECKPOINT_DIGEST_KEY]
    assert set(digests) == {"image_encoder", "text_encoder"}
    assert digests["image_encoder"]["source"] == "image_backbone='test_vit'"
    assert digests["text_encoder"]["source"] == "text_backbone='tiny-bert'"
    assert sum(d["tensors"] for d in digests.values()) == len(frozen)
    # Primitive values only: the checkpoint loads with weights_only=True.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)[CHECKPOINT_DIGEST_KEY] == digests


def test_reload_into_an_identically_built_module_restores_every_weight():
    model = tiny_system()
    checkpoint = _saved(model)
    fresh = tiny_system()
    restore_frozen_weights(fresh, checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_changed_frozen_backbone_is_an_error_naming_it_its_source_and_both_digests(monkeypatch):
    monkeypatch.delenv(ACCEPT_CHANGE_ENV, raising=False)
    checkpoint = _saved(tiny_system())
    rebuilt = tiny_system()
    with torch.no_grad():  # as if the hub weights had been re-uploaded
        rebuilt.text_encoder.backbone.embeddings.word_embeddings.weight[5, 0] += 0.01
    saved = checkpoint[CHECKPOINT_DIGEST_KEY]["text_encoder"]["sha256"]
    now = frozen_digests(rebuilt)["text_encoder"]["sha256"]
    with pytest.raises(CheckpointMismatchError) as error:
        restore_frozen_weights(rebuilt, checkpoint)
    message = str(error.value)
    assert f"text_encoder (text_backbone='tiny-bert'): checkpoint sha256 {saved}" in message
    assert f"rebuilt sha256 {now}" in message and "image_encoder" not in message
    assert f"{ACCEPT_CHANGE_ENV}=1" in message


def test_accept_switch_loads_a_changed_backbone_with_a_warning(monkeypatch):
    checkpoint = _saved(tiny_system())
    other = tiny_system(backbone_init_seed=1)  # both random frozen backbones differ
    monkeypatch.setenv(ACCEPT_CHANGE_ENV, "1")
    with pytest.warns(UserWarning, match=r"image_encoder .*text_encoder .*Loading anyway"):
        restore_frozen_weights(other, checkpoint)
    other.load_state_dict(checkpoint["state_dict"])


def test_old_checkpoint_without_digests_loads_with_a_warning():
    checkpoint = _saved(tiny_system())
    del checkpoint[CHECKPOINT_DIGEST_KEY]
    with pytest.warns(UserWarning, match="predates frozen-weight digests"):
        restore_frozen_weights(tiny_system(), checkpoint)


def test_configuration_mismatch_names_the_differing_hyperparameters():
    checkpoint = _saved(tiny_system(head_hidden_dim=16))
    with pytest.raises(CheckpointMismatchError, match=r"other shapes.*'head_hidden_dim': \(16, 24\)"):
        restore_frozen_weights(tiny_system(head_hidden_dim=24), checkpoint)


def test_system_hooks_store_and_verify_the_digests(monkeypatch):
    monkeypatch.delenv(ACCEPT_CHANGE_ENV, raising=False)
    model = tiny_system()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert set(checkpoint[CHECKPOINT_DIGEST_KEY]) == {"image_encoder", "text_encoder"}
    tiny_system().on_load_checkpoint(dict(checkpoint, state_dict=dict(checkpoint["state_dict"])))
    with pytest.raises(CheckpointMismatchError, match=r"image_encoder \(image_backbone='test_vit'\)"):
        tiny_system(backbone_init_seed=3).on_load_checkpoint(checkpoint)
