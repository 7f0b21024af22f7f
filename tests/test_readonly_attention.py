"""Read-only attention by two fused-attention calls: equal to the masked reference, exact z, detached
gradients.
"""

from __future__ import annotations

import pytest
import timm.layers
import torch
import transformers

from lightning_modules.encoders import image as image_module
from lightning_modules.encoders import sources
from lightning_modules.encoders import text as text_module
from lightning_modules.encoders.image import ImageEncoder
from lightning_modules.encoders.text import TextEncoder
from lightning_modules.readonly_attention import split_attention

TOL = 1e-5
MODES = ["prompt", "bitfit", "lora", "full", "frozen"]


def _masked_layer(adapter, x, num_readonly, key_valid=None, readonly_grad="through"):
    """The reference: the library's own layer with one boolean mask (originals may not read read-only
    keys).
    """
    total = x.shape[1]
    readonly = torch.zeros(total, dtype=torch.bool)
    readonly[total - num_readonly :] = True
    allowed = ~(~readonly[:, None] & readonly[None, :])[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if isinstance(adapter.layer, timm.models.vision_transformer.Block):
        return adapter.layer(x, attn_mask=allowed)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(x.dtype).min)
    out = adapter.layer(x, attention_mask=additive)
    return out[0] if isinstance(out, tuple) else out


def _image_backbone():
    torch.manual_seed(0)
    return sources.create_image_backbone("test_vit", pretrained=False, img_size=32)


def _text_backbone():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _tokens(padded: bool):
    ids = torch.randint(5, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.long)
    if padded:
        mask[0, 5:] = 0
        mask[2, 3:] = 0
        ids[mask == 0] = 0
    return ids, mask


def _perturbed(encoder):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in encoder.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return encoder


def _image_encoder(mode, predictor_length=4, readonly_grad="through"):
    return _perturbed(
        ImageEncoder(
            _image_backbone(),
            peft_mode=mode,
            prompt_length=3,
            prompt_depth=2,
            predictor_length=predictor_length,
            lora_rank=4,
            readonly_grad=readonly_grad,
        )
    )


def _text_encoder(mode, predictor_length=4, readonly_grad="through"):
    return _perturbed(
        TextEncoder(
            _text_backbone(),
            peft_mode=mode,
            prompt_length=3,
            prompt_depth=2,
            predictor_length=predictor_length,
            pooling="mean",
            lora_rank=4,
            readonly_grad=readonly_grad,
        )
    )


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_image_split_attention_equals_the_masked_reference(mode, train, monkeypatch):
    encoder = _image_encoder(mode).train(train)
    got = encoder(_images())
    monkeypatch.setattr(image_module, "run_layer", _masked_layer)
    expected = encoder(_images())
    assert (got.embedding - expected.embedding).abs().max() <= TOL
    assert (got.readonly - expected.readonly).abs().max() <= TOL
    # Gradients too: the same function, so the same parameter gradients.
    got_grads = torch.autograd.grad(
        (got.embedding.sum() + got.readonly.pow(2).sum()),
        [p for p in encoder.parameters() if p.requires_grad],
    )
    ref_grads = torch.autograd.grad(
        (expected.embedding.sum() + expected.readonly.pow(2).sum()),
        [p for p in encoder.parameters() if p.requires_grad],
    )
    assert all(
        (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()) for a, b in zip(got_grads, ref_grads, strict=True)
    )


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_text_split_attention_equals_the_masked_reference(mode, train, padded, monkeypatch):
    encoder = _text_encoder(mode).train(train)
    ids, mask = _tokens(padded)
    got = encoder(ids, mask)

    def reference(adapter, x, num_readonly, key_valid=None, readonly_grad="through"):
        if key_valid is None:
            key_valid = torch.ones(x.shape[:2], dtype=torch.bool)
        return _masked_layer(adapter, x, num_readonly, key_valid)

    monkeypatch.setattr(text_module, "run_layer", reference)
    expected = encoder(ids, mask)
    assert (got.embedding - expected.embedding).abs().max() <= TOL
    assert (got.readonly - expected.readonly).abs().max() <= TOL


def test_split_attention_rows_match_a_masked_softmax():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=generator) for _ in range(3))
    key_valid = torch.ones(2, 7, dtype=torch.bool)
    key_valid[1, 3:5] = False
    out = split_attention(q, k, v, num_readonly=2, key_valid=key_valid)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    blocked = ~key_valid[:, None, None, :].expand(2, 2, 7, 7).clone()
    blocked[:, :, :5, 5:] = True  # original queries never see the read-only keys
    expected = scores.masked_fill(blocked, float("-inf")).softmax(-1) @ v
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_embedding_is_unchanged_by_the_readonly_tokens_with_timm_fused_attention_off(mode):
    timm.layers.set_fused_attn(False)
    try:
        with_readonly = _image_encoder(mode).eval()
        without = _image_encoder(mode, predictor_length=0).eval()
        assert not with_readonly.backbone.blocks[0].attn.fused_attn
    finally:
        timm.layers.set_fused_attn(True)
    without.load_state_dict(with_readonly.state_dict(), strict=False)
    with torch.no_grad():
        diff = (with_readonly(_images()).embedding - without(_images()).embedding).abs().max()
    assert diff <= TOL


def _encoder_own_parameters(encoder):
    return {name: p for name, p in encoder.named_parameters() if p.requires_grad and "readonly" not in name}


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("mode", ["prompt", "bitfit", "lora", "full"])
def test_detach_gives_the_readonly_loss_no_gradient_into_the_encoder(modality, mode):
    def run(readonly_grad):
        if modality == "image":
            encoder = _image_encoder(mode, readonly_grad=readonly_grad).train()
            out = encoder(_images())
        else:
            encoder = _text_encoder(mode, readonly_grad=readonly_grad).train()
            out = encoder(*_tokens(padded=True))
        own = _encoder_own_parameters(encoder)
        grads = torch.autograd.grad(
            out.readonly.pow(2).sum(), [*own.values(), encoder.readonly_tokens.tokens], allow_unused=True
        )
        return dict(zip([*own, "readonly"], grads, strict=True)), out

    detached, out_detached = run("detach")
    through, out_through = run("through")
    # The same forward values: detach changes gradients only.
    assert (out_detached.embedding - out_through.embedding).abs().max() <= TOL
    assert (out_detached.readonly - out_through.readonly).abs().max() <= TOL
    own = [name for name in detached if name != "readonly"]
    assert own, "the mode trains some encoder parameters"
    assert all(detached[name] is None or torch.count_nonzero(detached[name]) == 0 for name in own)
    assert any(through[name] is not None and through[name].abs().sum() > 0 for name in own)
    assert detached["readonly"].abs().sum() > 0  # the read-only tokens themselves still learn


def test_unknown_readonly_grad_is_a_clear_error():
    with pytest.raises(ValueError, match="readonly_grad"):
        ImageEncoder(_image_backbone(), predictor_length=2, readonly_grad="sometimes")
