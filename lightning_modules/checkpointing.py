"""Slim checkpoints: only what trains (plus buffers), with a digest of each frozen backbone's weights.

Frozen backbone weights are not stored: the module rebuilds them from their sources (``image_backbone``
/ ``text_backbone`` hyperparameters) when it is constructed, and :func:`restore_frozen_weights` fills
them into the loaded state dict. A changed hub tag, re-uploaded weights or an edited local folder
would then silently evaluate another model, so :func:`slim_checkpoint` also stores a SHA-256 of each
frozen part (per top-level submodule: ``image_encoder``, ``text_encoder``, ...) and loading compares
it with the rebuilt weights:

- a mismatch is a :class:`CheckpointMismatchError` naming the part, its source and both digests;
  set the environment variable ``UNIPAIR_ACCEPT_BACKBONE_CHANGE=1`` to load anyway (with a warning).
  An environment switch rather than a model hyperparameter, because ``--ckpt_path`` replaces the
  model's hyperparameters by the checkpoint's, and it works the same for the CLI, a plain ``Trainer``
  and ``load_from_checkpoint``;
- a checkpoint written before digests existed loads with a warning.

Everything stored is primitive (ints, strings, dicts), so checkpoints load with ``weights_only=True``.
These are plain functions of the module; ``UnipairSystem``'s checkpoint hooks call them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

CHECKPOINT_OMITTED_KEY = "unipair_omitted_frozen_keys"
CHECKPOINT_DIGEST_KEY = "unipair_frozen_digests"
ACCEPT_CHANGE_ENV = "UNIPAIR_ACCEPT_BACKBONE_CHANGE"
# The hyperparameter naming where each part's frozen weights come from.
SOURCE_HPARAMS: dict[str, str] = {"image_encoder": "image_backbone", "text_encoder": "text_backbone"}


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the module built for it (other configuration or other frozen weights)."""


def frozen_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the parameters that do not train (rebuilt from the sources on load)."""
    return {name for name, param in module.named_parameters() if not param.requires_grad}


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def tensor_digests(tensors: dict[str, torch.Tensor], dtypes: dict[str, str] | None = None) -> dict[str, dict]:
    """SHA-256 per part (first component of the key) over its tensors' names, dtypes, shapes and bytes.

    Keys are hashed in sorted order, so the digest does not depend on module construction order.
    ``dtypes`` (part -> dtype name, as stored by a checkpoint) casts a part's floating tensors to that
    dtype first: weights saved under ``*-true`` precision compare with the float32 rebuild cast alike.
    Returns ``{part: {"sha256": hex, "tensors": count, "dtype": name of the first tensor's dtype}}``.
    """
    hashers: dict[str, Any] = {}
    counts: dict[str, int] = {}
    first_dtype: dict[str, str] = {}
    for key in sorted(tensors):
        part = _part(key)
        tensor = tensors[key].detach()
        wanted = (dtypes or {}).get(part)
        if wanted and tensor.is_floating_point() and str(tensor.dtype).removeprefix("torch.") != wanted:
            tensor = tensor.to(getattr(torch, wanted))
        tensor = tensor.cpu().contiguous()
        hasher = hashers.setdefault(part, hashlib.sha256())
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Raw bytes through a uint8 view (no copy; works for dtypes numpy lacks, such as bfloat16).
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
        counts[part] = counts.get(part, 0) + 1
        first_dtype.setdefault(part, str(tensor.dtype).removeprefix("torch."))
    return {
        part: {"sha256": hasher.hexdigest(), "tensors": counts[part], "dtype": first_dtype[part]}
        for part, hasher in hashers.items()
    }


def frozen_digests(module: nn.Module, dtypes: dict[str, str] | None = None) -> dict[str, dict]:
    """:func:`tensor_digests` of ``module``'s frozen parameters, with each part's ``source``."""
    frozen = frozen_state_keys(module)
    state = {key: value for key, value in module.state_dict().items() if key in frozen}
    digests = tensor_digests(state, dtypes)
    hparams = getattr(module, "hparams", {})
    for part, record in digests.items():
        option = SOURCE_HPARAMS.get(part)
        record["source"] = f"{option}={hparams.get(option)!r}" if option else part
    return digests


def slim_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: drop the frozen weights from the state dict, store their digests."""
    frozen = frozen_state_keys(module)
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {key: value for key, value in state.items() if key not in frozen}
    checkpoint[CHECKPOINT_OMITTED_KEY] = len(state) - len(checkpoint["state_dict"])
    checkpoint[CHECKPOINT_DIGEST_KEY] = frozen_digests(module)


def _accept_changes() -> bool:
    return os.environ.get(ACCEPT_CHANGE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_frozen_digests(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Compare the checkpoint's frozen-weight digests with ``module``'s rebuilt weights.

    Raises :class:`CheckpointMismatchError` on a difference unless ``UNIPAIR_ACCEPT_BACKBONE_CHANGE=1``
    (then warns); warns for a checkpoint without digests.
    """
    saved = checkpoint.get(CHECKPOINT_DIGEST_KEY)
    if saved is None:
        if checkpoint.get(CHECKPOINT_OMITTED_KEY):
            rank_zero_warn(
                "this checkpoint predates frozen-weight digests: the frozen backbones rebuilt from "
                "image_backbone / text_backbone cannot be checked against the weights it was trained with"
            )
        return
    current = frozen_digests(module, dtypes={part: record.get("dtype") for part, record in saved.items()})
    changed = []
    for part in sorted(set(saved) | set(current)):
        old, new = saved.get(part, {}), current.get(part, {})
        if old.get("sha256") != new.get("sha256"):
            source = new.get("source") or old.get("source") or part
            changed.append(
                f"{part} ({source}): checkpoint sha256 {old.get('sha256', 'none')} "
                f"({old.get('tensors', 0)} tensors), rebuilt sha256 {new.get('sha256', 'none')} "
                f"({new.get('tensors', 0)} tensors)"
            )
    if not changed:
        return
    message = (
        "the frozen weights rebuilt from their sources differ from those the checkpoint was trained with: "
        + "; ".join(changed)
        + ". The source changed (another hub revision, re-uploaded weights, an edited local folder, "
        "another library version or init seed), so the trained parts would run on another backbone."
    )
    if _accept_changes():
        rank_zero_warn(f"{message} Loading anyway ({ACCEPT_CHANGE_ENV} is set).")
        return
    raise CheckpointMismatchError(
        f"{message} Restore the original source, or set {ACCEPT_CHANGE_ENV}=1 to load it anyway."
    )


def restore_frozen_weights(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: check the checkpoint fits ``module``, then fill in its frozen weights.

    Raises :class:`CheckpointMismatchError` for trainable keys missing or unexpected, tensors of other
    shapes (naming the hyperparameters that differ), or frozen weights whose digest differs.
    """
    state = checkpoint["state_dict"]
    own = module.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    missing_trainable = missing - frozen_state_keys(module)
    mismatched = {
        key: (tuple(state[key].shape), tuple(own[key].shape))
        for key in sorted(set(state) & set(own))
        if hasattr(state[key], "shape") and tuple(state[key].shape) != tuple(own[key].shape)
    }
    if unexpected or missing_trainable or mismatched:
        saved = checkpoint.get("hyper_parameters", {})
        hparams = getattr(module, "hparams", {})
        differences = {
            key: (saved.get(key), value) for key, value in hparams.items() if saved.get(key) != value
        }
        raise CheckpointMismatchError(
            f"checkpoint does not match this {type(module).__name__} configuration: "
            f"{len(missing_trainable)} trainable/buffer keys missing (e.g. {sorted(missing_trainable)[:5]}), "
            f"{len(unexpected)} unexpected keys (e.g. {sorted(unexpected)[:5]}), "
            f"{len(mismatched)} with other shapes (checkpoint, current; "
            f"e.g. {dict(list(mismatched.items())[:3])}). "
            f"Hyperparameters that differ (checkpoint, current): {differences}"
        )
    check_frozen_digests(module, checkpoint)
    # Frozen weights are not stored: take them from the freshly built backbones.
    for key in missing:
        state[key] = own[key]
