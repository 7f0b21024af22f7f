"""Encoder sources: timm names, local folders, tiny-bert, minilm-l6 (offline), data configs, pooling."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from lightning_modules.encoders import sources


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to reach the Hugging Face Hub fails (the built-ins must not need it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------- image


def test_timm_name_builds_headless_vit_at_requested_size():
    model = sources.create_image_backbone("test_vit", pretrained=False, img_size=64)
    assert isinstance(model, VisionTransformer)
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
    assert model.patch_embed.img_size == (64, 64)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.num_features)


def test_non_vit_is_refused_with_advice():
    with pytest.raises(ValueError, match="needs a timm VisionTransformer.*'test_vit'"):
        sources.create_image_backbone("resnet10t", pretrained=False)


def test_local_timm_folder_loads_its_weights(tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    original = sources.create_image_backbone("test_vit", pretrained=False)
    save_for_hf(original, tmp_path / "my_vit", safe_serialization=True)
    loaded = sources.create_image_backbone(str(tmp_path / "my_vit"), pretrained=True)
    assert isinstance(loaded, VisionTransformer)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_image_data_config_for_timm_names_and_builtin():
    timm_config = sources.image_data_config("test_vit")
    assert timm_config["input_size"] == (3, 160, 160) and timm_config["mean"] == (0.5, 0.5, 0.5)
    assert sources.image_data_config("test_vit", img_size=72)["input_size"] == (3, 72, 72)
    dino = sources.image_data_config("dinov2-s14", img_size=112)
    assert dino == {
        "input_size": (3, 112, 112),
        "mean": sources.IMAGENET_MEAN,
        "std": sources.IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }
    assert sources.image_data_config("dinov2-s14")["input_size"] == (3, 518, 518)


def test_dinov2_builtin_random_init_needs_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPAIR_CACHE", str(tmp_path / "empty"))
    model = sources.create_image_backbone("dinov2-s14", pretrained=False, img_size=56)
    assert isinstance(model, VisionTransformer) and model.patch_embed.grid_size == (4, 4)
    assert model.embed_dim == 384 and len(model.blocks) == 12


def test_dinov2_builtin_loads_prepared_weights(prepared_dinov2_cache):
    from lightning_modules.encoders.dinov2_onnx import load_converted_state_dict

    model = sources.create_image_backbone("dinov2-s14", img_size=70).eval()
    cached = load_converted_state_dict(prepared_dinov2_cache)
    assert torch.equal(model.cls_token, cached["cls_token"])
    assert torch.equal(model.blocks[11].mlp.fc2.weight, cached["blocks.11.mlp.fc2.weight"])
    with torch.no_grad():
        features = model(torch.randn(2, 3, 70, 70))
    assert features.shape == (2, 384) and torch.isfinite(features).all()


# -------------------------------------------------------------------------------------------- text


def test_tiny_bert_is_small_random_and_uses_minilm_vocabulary():
    model = sources.create_text_backbone("tiny-bert")
    tokenizer = sources.create_tokenizer("tiny-bert")
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert config.intermediate_size == 64 and config.vocab_size == len(tokenizer) == 30522
    assert model.pooler is None  # pooling is the caller's job; no unused parameters under DDP
    assert type(tokenizer).__name__.startswith("BertTokenizer")
    batch = tokenizer(["a grinning face", "flag"], padding=True, return_tensors="pt")
    assert model(**batch).last_hidden_state.shape == (2, batch["input_ids"].shape[1], 32)


def _mean_pool(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_loads_offline_and_gives_384d_sentence_embeddings():
    model = sources.create_text_backbone("minilm-l6").eval()
    tokenizer = sources.create_tokenizer("minilm-l6")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6 and model.pooler is None
    cat, kitten, market = _mean_pool(model, tokenizer, ["a cat", "a kitten", "the stock market fell"])
    assert cat.shape == (384,)
    # Pretrained semantics (a random model has no reason to rank these): near-synonyms are closer.
    assert float(cat @ kitten) > float(cat @ market) + 0.2


def test_minilm_without_pretrained_is_random_same_architecture():
    pretrained = sources.create_text_backbone("minilm-l6")
    random_model = sources.create_text_backbone("minilm-l6", pretrained=False)
    assert random_model.config.hidden_size == 384
    weight = "embeddings.word_embeddings.weight"
    assert not torch.equal(pretrained.state_dict()[weight], random_model.state_dict()[weight])


def test_local_text_folder_and_its_pooling(tmp_path):
    folder = tmp_path / "my_bert"
    original = sources.create_text_backbone("tiny-bert")
    original.save_pretrained(folder)
    sources.create_tokenizer("tiny-bert").save_pretrained(folder)
    loaded = sources.create_text_backbone(str(folder))
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert len(sources.create_tokenizer(str(folder))) == 30522
    assert sources.default_text_pooling(str(folder)) == "cls"
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert sources.default_text_pooling(str(folder)) == "mean"


def test_default_text_pooling_of_builtins():
    assert sources.default_text_pooling("minilm-l6") == "mean"
    assert sources.default_text_pooling("tiny-bert") == "cls"
    assert sources.default_text_pooling("bert-base-uncased") == "cls"
