"""Encoders: own layer-by-layer forward equals the backbone's; read-only tokens leave z_v / z_t unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from lightning_modules import readonly_attention
from lightning_modules.encoders import sources
from lightning_modules.encoders.image import ImageEncoder
from lightning_modules.encoders.text import TextEncoder

TOL = 1e-5


def _image_backbone():
    torch.manual_seed(0)
    return sources.create_image_backbone("test_vit", pretrained=False, img_size=32)


def _text_backbone(attn_implementation: str = "sdpa"):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        attn_implementation=attn_implementation,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _images():
    return torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def _tokens():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 300, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0  # padded rows, of different lengths
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _perturb_adapters(encoder: torch.nn.Module) -> None:
    """Give trainable parameters (LoRA B is zero at init, prompts are small) clearly non-trivial values."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if param.requires_grad and "readonly" not in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_image_forward_equals_timm_without_prompts(pooling):
    backbone = _image_backbone()
    reference = copy.deepcopy(backbone).eval()
    reference.global_pool = {"cls": "token", "mean": "avg"}[pooling]
    encoder = ImageEncoder(backbone, peft_mode="frozen", predictor_length=0, pooling=pooling).eval()
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(_images()), pre_logits=True)
        got = encoder(_images())
    assert got.readonly is None
    assert (got.embedding - expected).abs().max() <= TOL


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_text_forward_equals_bert_without_prompts(attn_implementation):
    backbone = _text_backbone(attn_implementation)
    reference = copy.deepcopy(backbone).eval()
    ids, mask = _tokens()
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        expected_cls = hidden[:, 0]
        weights = mask.unsqueeze(-1).float()
        expected_mean = (hidden * weights).sum(1) / weights.sum(1)
        got_cls = TextEncoder(
            copy.deepcopy(backbone), peft_mode="frozen", predictor_length=0, pooling="cls"
        ).eval()(ids, mask)
        got_mean = TextEncoder(backbone, peft_mode="frozen", predictor_length=0, pooling="mean").eval()(
            ids, mask
        )
    assert (got_cls.embedding - expected_cls).abs().max() <= TOL
    assert (got_mean.embedding - expected_mean).abs().max() <= TOL


def _pair(make_encoder, backbone, mode):
    """The same encoder with and without read-only tokens (identical backbone, adapters and task prompts)."""
    with_readonly = make_encoder(copy.deepcopy(backbone), mode, 4).eval()
    _perturb_adapters(with_readonly)
    without = make_encoder(copy.deepcopy(backbone), mode, 0).eval()
    result = without.load_state_dict(with_readonly.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys == ["readonly_tokens.tokens"]
    return with_readonly, without


def _make_image(backbone, mode, predictor_length):
    return ImageEncoder(
        backbone,
        peft_mode=mode,
        prompt_length=3,
        prompt_depth=2,
        predictor_length=predictor_length,
        lora_rank=4,
    )


def _make_text(backbone, mode, predictor_length):
    return TextEncoder(
        backbone,
        peft_mode=mode,
        prompt_length=3,
        prompt_depth=2,
        predictor_length=predictor_length,
        pooling="mean",
        lora_rank=4,
    )


@pytest.mark.parametrize("mode", ["prompt", "bitfit", "lora"])
def test_image_readonly_tokens_leave_embedding_unchanged(mode):
    with_readonly, without = _pair(_make_image, _image_backbone(), mode)
    with torch.no_grad():
        a, b = with_readonly(_images()), without(_images())
        baseline = _make_image(_image_backbone(), mode, 0).eval()(_images())
    assert (a.embedding - b.embedding).abs().max() <= TOL
    # The adapters really change the output (so the comparison above is not between two plain backbones).
    assert (a.embedding - baseline.embedding).abs().max() > 1e-2
    assert a.readonly.shape == a.embedding.shape


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["prompt", "bitfit", "lora"])
def test_text_readonly_tokens_leave_embedding_unchanged(mode, attn_implementation):
    with_readonly, without = _pair(_make_text, _text_backbone(attn_implementation), mode)
    ids, mask = _tokens()
    with torch.no_grad():
        a, b = with_readonly(ids, mask), without(ids, mask)
        baseline = _make_text(_text_backbone(attn_implementation), mode, 0).eval()(ids, mask)
    assert (a.embedding - b.embedding).abs().max() <= TOL
    assert (a.embedding - baseline.embedding).abs().max() > 1e-2
    assert a.readonly.shape == a.embedding.shape


def test_readonly_tokens_read_the_input_but_are_not_read():
    encoder = _make_image(_image_backbone(), "prompt", 4).eval()
    images = _images()
    with torch.no_grad():
        before = encoder(images)
        other_input = encoder(torch.randn(images.shape, generator=torch.Generator().manual_seed(9)))
        encoder.readonly_tokens.tokens.add_(torch.randn(encoder.readonly_tokens.tokens.shape))
        after = encoder(images)
    assert torch.equal(before.embedding, after.embedding)
    assert (before.readonly - after.readonly).abs().max() > 1e-3
    assert (before.readonly - other_input.readonly).abs().max() > 1e-3


def test_if_originals_read_the_readonly_tokens_the_embedding_would_change(monkeypatch):
    # Control: the equality tests above can fail. With one attention over every key the tokens are read.
    def full_attention(q, k, v, num_readonly, key_valid=None, dropout_p=0.0, detach_original=False):
        mask = None if key_valid is None else key_valid[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with_readonly, without = _pair(_make_image, _image_backbone(), "prompt")
    text_with, text_without = _pair(_make_text, _text_backbone(), "prompt")
    monkeypatch.setattr(readonly_attention, "split_attention", full_attention)
    ids, mask = _tokens()
    with torch.no_grad():
        assert (with_readonly(_images()).embedding - without(_images()).embedding).abs().max() > 1e-3
        assert (text_with(ids, mask).embedding - text_without(ids, mask).embedding).abs().max() > 1e-3


def test_text_padding_does_not_change_the_embedding():
    encoder = _make_text(_text_backbone(), "prompt", 4).eval()
    _perturb_adapters(encoder)
    ids, mask = _tokens()
    with torch.no_grad():
        padded = encoder(ids, mask)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone = encoder(ids[row : row + 1, :n], mask[row : row + 1, :n])
            assert (alone.embedding[0] - padded.embedding[row]).abs().max() <= TOL
            assert (alone.readonly[0] - padded.readonly[row]).abs().max() <= TOL


def test_deep_prompts_reach_every_prompted_layer():
    encoder = _make_image(_image_backbone(), "prompt", 4)
    out = encoder(_images())
    (out.embedding.sum() + out.readonly.sum()).backward()
    grads = encoder.task_prompts.tokens.grad
    assert grads.shape == (2, 3, encoder.embed_dim)
    assert all(grads[layer].abs().sum() > 0 for layer in range(2))
    assert encoder.readonly_tokens.tokens.grad.abs().sum() > 0
