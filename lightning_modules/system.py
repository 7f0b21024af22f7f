"""UnipairSystem: the LightningModule of the method and its baselines.

Per step: each encoder runs on the samples that have its modality (missing inputs arrive as fillers,
see the batch format; only ``dummy_input`` encodes them), each yields its modality embedding z and,
from its read-only tokens, a prediction of the other modality's embedding (ẑ). The missing strategy
picks e_m per sample, the fusion head classifies [e_v; e_t], and the loss is
``task + pred_loss_weight * (VICReg(ẑ_t, z_t) + VICReg(ẑ_v, z_v))`` with VICReg over the complete
samples only. Every part runs on every step whatever the missing pattern (selection by masks), so
DDP needs no unused-parameter search.

Separable evaluation contract (used by the robustness evaluation)::

    emb = model.encode(batch)                       # expensive, once, on complete inputs
    logits = model.fuse_with_missing(emb, image_present, text_present)   # cheap, per missing setting

``fuse_with_missing`` is exact for ``predict`` / ``zero`` / ``learned`` (the stand-ins do not
depend on the missing input). For ``dummy_input`` it substitutes :meth:`UnipairSystem.filler_embeddings`
(the encoders' outputs for the all-ones filler image and the empty text, deterministic in eval mode)
for the missing modality, which equals encoding the filler inside the batch up to float rounding.

This module is the method: encode, fuse, losses, steps. Its parts live in their own modules: the
missing strategies (``strategies.py``), metric bookkeeping (``stage_metrics.py``), the non-finite
guard (``numerics.py``), slim checkpoints with frozen-weight digests (``checkpointing.py``) and the
optimiser groups and schedule (``optim.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics import Metric

from lightning_modules import checkpointing
from lightning_modules.checkpointing import CHECKPOINT_OMITTED_KEY  # noqa: F401  (re-exported)
from lightning_modules.diagnostics import PredictionDiagnostics
from lightning_modules.encoders import sources
from lightning_modules.encoders.image import ImageEncoder
from lightning_modules.encoders.text import TextEncoder
from lightning_modules.fusion import FusionHead, MissingModalityFill
from lightning_modules.losses import (
    TASKS,
    VICREG_SPACES,
    RunningMoments,
    VicregSpace,
    all_gather_with_grad,
    masked_mean,
    per_sample_task_loss,
    vicreg_loss,
)
from lightning_modules.metrics import metric_inputs, monitor_metric
from lightning_modules.numerics import (  # noqa: F401  (re-exported)
    LOSS_COMPONENTS,
    NONFINITE_POLICIES,
    NonFiniteGuard,
    NonFiniteLossError,
    distributed,
    skipped_batch_loss,
    step_position,
)
from lightning_modules.optim import LR_SCHEDULES, configure_adamw, parameter_groups
from lightning_modules.peft_modes import check_peft_mode, count_parameters
from lightning_modules.predictor import PredictorHead
from lightning_modules.prompts import EncoderOutput
from lightning_modules.readonly_attention import ReadonlyGrad, check_readonly_grad
from lightning_modules.stage_metrics import CASE_STAGES, STAGES, StageMetrics  # noqa: F401
from lightning_modules.strategies import check_predictor, get_strategy, untrained_stand_in_warning

CHECKPOINT_SKIPPED_KEY = "unipair_nonfinite_skipped_batches"


class UnipairSystem(LightningModule):
    """Missing-modality prediction with PEFT unimodal encoders, read-only predictor tokens, VICReg, \
late fusion.

    Args:
        task: ``multiclass``, ``multilabel`` or ``binary`` (binary: two logits, cross-entropy). Linked
            from the DataModule's ``task``.
        num_classes: number of logits (2 for binary). Linked from the DataModule's ``num_classes``.
        image_backbone: image encoder name for ``sources.create_image_backbone`` (``dinov2-s14``, a timm
            ViT name such as ``test_vit``, a Hub id, or a local folder).
        text_backbone: text encoder name for ``sources.create_text_backbone`` (``minilm-l6``, ``tiny-bert``,
            a Hub id, or a local folder).
        pretrained: load the backbones' pretrained weights (False: random init, for tests).
        backbone_init_seed: seed under which the backbones are built, so randomly initialised (frozen)
            backbones are rebuilt identically when a checkpoint is reloaded.
        img_size: input resolution the image backbone is built for (None = its native size). Also the
            size of the filler image in :meth:`filler_embeddings`.
        image_peft: PEFT mode of the image encoder: ``prompt``, ``bitfit``, ``lora``, ``full``, ``frozen``.
        text_peft: PEFT mode of the text encoder (same choices).
        prompt_length: task prompt tokens per layer (``prompt`` mode).
        prompt_depth: number of first layers receiving fresh task prompts (``prompt`` mode; clipped to
            each encoder's number of layers).
        predictor_length: read-only predictor tokens per encoder (0 = no predictor: only for the
            ``zero``/``learned``/``dummy_input`` strategies without substitution).
        image_pooling: ``cls`` or ``mean`` (None = the backbone's convention: CLS after the final norm
            for DINOv2 and standard ViTs).
        text_pooling: ``cls`` or ``mean`` over real tokens (None = ``sources.default_text_pooling``:
            mean for MiniLM, CLS otherwise).
        lora_rank: LoRA rank (``lora`` mode).
        lora_alpha: LoRA scaling alpha (``lora`` mode).
        lora_dropout: dropout on the LoRA branch (``lora`` mode).
        predictor_hidden_dim: hidden width of the predictor MLPs g (0 = the target embedding width).
        head_hidden_dim: hidden width of the fusion head h.
        head_dropout: dropout before the fusion head's last Linear.
        missing_strategy: stand-in for a missing modality's embedding: ``predict`` (the method),
            ``zero``, ``learned`` or ``dummy_input``.
        pred_loss_weight: λ in ``task + λ · L_pred``.
        vicreg_inv_coeff: VICReg invariance coefficient.
        vicreg_var_coeff: VICReg variance coefficient.
        vicreg_cov_coeff: VICReg covariance coefficient.
        stop_grad_target: detach the target embedding z in VICReg (only the prediction learns from it).
        readonly_grad: ``through``: the read-only tokens read the original tokens' keys / values as
            they are, so the prediction loss also trains what computes the *source* encoder's own
            embedding (task prompts, biases, LoRA); ``detach``: they read detached keys / values (and
            detached layer parameters), so the prediction loss trains the predictor only (the
            default: ahead of ``through`` on validation in the ablation with prompts and BitFit).
        vicreg_space: ``raw``: the reference VICReg terms; ``target_matched``: both sides standardised
            with the target's running statistics, variance hinge at the target's own spread,
            covariance matched to the target's (``losses.vicreg_loss``).
        substitution: on complete samples also train the head on [z_v; ẑ_t] and [ẑ_v; z_t] (adds the
            mean of those two losses to the task loss).
        lr: AdamW learning rate of the encoder parameters that train (task prompts, biases, LoRA, ...).
        head_lr: learning rate of the fusion head, predictor MLPs, read-only tokens and learned missing
            embeddings (None = ``lr``).
        weight_decay: AdamW weight decay (not on 1-D parameters, i.e. biases and norm weights, nor on
            position embeddings and class/register tokens: ``lightning_modules/optim.py``).
        warmup_fraction: fraction of the total optimiser steps with linear warm-up from 0.
        lr_schedule: decay after warm-up: ``linear`` (to 0), ``cosine`` (to 0) or ``constant``.
        multilabel_threshold: probability threshold of the multilabel metrics.
        nonfinite_policy: what a NaN/inf training loss term or gradient does: ``error`` stops training
            with a message naming the global step and the term(s) (task, substitution, VICReg
            invariance / variance / covariance) or parameters; ``skip`` skips that batch's optimizer
            update instead (counted in ``train/nonfinite_skipped_batches``, warned with the same
            details). Under DDP the decision is agreed across ranks, so all ranks skip together.
            Non-finite logits in validation/test are always an error naming the sample ids.
    """

    def __init__(
        self,
        task: str = "multiclass",
        num_classes: int = 9,
        image_backbone: str = "dinov2-s14",
        text_backbone: str = "minilm-l6",
        pretrained: bool = True,
        backbone_init_seed: int = 0,
        img_size: int | None = None,
        image_peft: str = "prompt",
        text_peft: str = "prompt",
        prompt_length: int = 16,
        prompt_depth: int = 6,
        predictor_length: int = 8,
        image_pooling: str | None = None,
        text_pooling: str | None = None,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        predictor_hidden_dim: int = 256,
        head_hidden_dim: int = 256,
        head_dropout: float = 0.0,
        missing_strategy: str = "predict",
        pred_loss_weight: float = 1.0,
        vicreg_inv_coeff: float = 25.0,
        vicreg_var_coeff: float = 25.0,
        vicreg_cov_coeff: float = 1.0,
        stop_grad_target: bool = True,
        readonly_grad: ReadonlyGrad = "detach",
        vicreg_space: VicregSpace = "raw",
        substitution: bool = False,
        lr: float = 1e-3,
        head_lr: float | None = None,
        weight_decay: float = 0.02,
        warmup_fraction: float = 0.1,
        lr_schedule: str = "linear",
        multilabel_threshold: float = 0.5,
        nonfinite_policy: str = "error",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if task not in TASKS:
            raise ValueError(f"task: unknown task {task!r}; expected one of {list(TASKS)}")
        if task == "binary" and num_classes != 2:
            raise ValueError(f"task 'binary' uses two logits: num_classes must be 2, got {num_classes}")
        if num_classes < 2 and task != "multilabel":
            raise ValueError(f"num_classes must be >= 2 for task {task!r}, got {num_classes}")
        check_peft_mode(image_peft, "image_peft")
        check_peft_mode(text_peft, "text_peft")
        check_predictor(get_strategy(missing_strategy), predictor_length, substitution)
        check_readonly_grad(readonly_grad)
        if vicreg_space not in VICREG_SPACES:
            raise ValueError(
                f"vicreg_space: unknown value {vicreg_space!r}; expected one of {list(VICREG_SPACES)}"
            )
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule: unknown schedule {lr_schedule!r}; expected one of {list(LR_SCHEDULES)}"
            )
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_policy: unknown policy {nonfinite_policy!r}; expected one of "
                f"{list(NONFINITE_POLICIES)}"
            )

        # Build the backbones under a fixed seed: a randomly initialised frozen backbone is then
        # identical every time the module is constructed (checkpoints do not store it).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(backbone_init_seed)
            image_model = sources.create_image_backbone(
                image_backbone, pretrained=pretrained, img_size=img_size
            )
            text_model = sources.create_text_backbone(text_backbone, pretrained=pretrained)
        text_pooling = text_pooling or sources.default_text_pooling(text_backbone)
        image_layers, text_layers = len(image_model.blocks), len(text_model.encoder.layer)
        shared = dict(
            prompt_length=prompt_length,
            predictor_length=predictor_length,
            readonly_grad=readonly_grad,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
        )
        self.image_encoder = ImageEncoder(
            image_model,
            peft_mode=image_peft,
            prompt_depth=min(prompt_depth, image_layers),
            pooling=image_pooling,
            **shared,
        )
        self.text_encoder = TextEncoder(
            text_model,
            peft_mode=text_peft,
            prompt_depth=min(prompt_depth, text_layers),
            pooling=text_pooling,
            **shared,
        )
        image_dim, text_dim = self.image_encoder.embed_dim, self.text_encoder.embed_dim
        self.has_predictor = predictor_length > 0
        if self.has_predictor:
            # g_v->t reads the image encoder's read-only tokens and predicts z_t, and vice versa.
            self.image_to_text = PredictorHead(image_dim, text_dim, predictor_hidden_dim)
            self.text_to_image = PredictorHead(text_dim, image_dim, predictor_hidden_dim)
            if vicreg_space == "target_matched":
                # The targets' statistics, learnt from the complete training rows (buffers: checkpointed).
                self.image_moments = RunningMoments(image_dim)
                self.text_moments = RunningMoments(text_dim)
        self.missing_fill = MissingModalityFill(missing_strategy, image_dim, text_dim)
        self.head = FusionHead(image_dim, text_dim, head_hidden_dim, num_classes, head_dropout)

        self.epoch_metrics = StageMetrics(task, num_classes, multilabel_threshold, self.loss_names())
        if self.has_predictor:
            self.prediction_diagnostics = nn.ModuleDict(
                {
                    f"{stage}_metrics": PredictionDiagnostics(image_dim, text_dim, task, multilabel_threshold)
                    for stage in CASE_STAGES
                }
            )
        self._tokenizer: Any = None
        self._filler_cache: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self.nonfinite_guard = NonFiniteGuard()

    # ------------------------------------------------------------------------------------ properties

    def loss_names(self) -> list[str]:
        """Names of the loss terms :meth:`compute_losses` returns for this configuration."""
        names = ["substitution_loss"] if self.hparams.substitution else []
        names.append("task_loss")
        if self.has_predictor:
            names += ["pred_loss", "vicreg_invariance", "vicreg_variance", "vicreg_covariance"]
        return [*names, "loss"]

    @property
    def monitor(self) -> str:
        """The validation metric to maximise for this task (``val/f1_macro``, ``val/accuracy``,
        ``val/auroc``).
        """
        return monitor_metric(self.hparams.task)

    def trainable_fraction(self) -> float:
        """Trainable parameters / all parameters of the module."""
        return count_parameters(self, trainable_only=True) / count_parameters(self)

    @property
    def nonfinite_skipped_batches(self) -> int:
        """Batches (or updates) skipped for non-finite values under ``nonfinite_policy: skip``."""
        return self.nonfinite_guard.skipped_batches

    @nonfinite_skipped_batches.setter
    def nonfinite_skipped_batches(self, value: int) -> None:
        self.nonfinite_guard.skipped_batches = int(value)

    # ------------------------------------------------------------------------------- forward pieces

    @staticmethod
    def _check_presence(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        image_present, text_present = batch["image_present"].bool(), batch["text_present"].bool()
        neither = ~(image_present | text_present)
        if neither.any():
            ids = batch.get("id")
            bad = (
                [ids[i] for i in neither.nonzero().flatten().tolist()]
                if ids is not None
                else neither.nonzero().flatten().tolist()
            )
            raise ValueError(
                "samples with neither image nor text are invalid input (image_present and text_present both "
                f"False): {bad}"
            )
        return image_present, text_present

    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Run each encoder on the samples that have its modality (the expensive part).

        Returns ``{"z_v": [B, Dv], "z_t": [B, Dt], "zhat_v": [B, Dv] | None, "zhat_t": [B, Dt] | None}``:
        the modality embeddings and the predictions of each from the *other* modality (ẑ_v from the
        text encoder's read-only tokens, ẑ_t from the image encoder's). None without a predictor.
        Where a sample lacks a modality its z is 0 (the filler's encoding for ``dummy_input``) and the
        ẑ predicted from it is meaningless; nothing reads either.
        """
        image_out = self._encode_present(self.image_encoder, batch["image_present"], batch["image"])
        text_out = self._encode_present(
            self.text_encoder, batch["text_present"], batch["input_ids"], batch["attention_mask"]
        )
        zhat_t = self.image_to_text(image_out.readonly) if self.has_predictor else None
        zhat_v = self.text_to_image(text_out.readonly) if self.has_predictor else None
        return {"z_v": image_out.embedding, "z_t": text_out.embedding, "zhat_v": zhat_v, "zhat_t": zhat_t}

    def _encode_present(
        self, encoder: nn.Module, present: torch.Tensor, *inputs: torch.Tensor
    ) -> EncoderOutput:
        """``encoder(*inputs)`` on the rows where its modality is present; the other rows get zeros.

        Nothing reads a missing modality's z or the ẑ its encoder would have predicted (the stand-in
        replaces the one, the other modality is real), so those rows are not encoded, except for
        ``dummy_input``, whose stand-in is the encoding of the filler. With no row present the encoder
        runs on the first row and its output is multiplied by 0, so every parameter stays in the graph
        (DDP-safe).
        """
        present = present.bool()
        if self.missing_fill.spec.encodes_filler or bool(present.all()):
            return encoder(*inputs)
        rows = present.nonzero().flatten()
        none_present = rows.numel() == 0
        if none_present:
            rows = rows.new_zeros(1)
        out = encoder(*(x.index_select(0, rows) for x in inputs))

        def scatter(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            if none_present:
                values = values * 0.0
            return values.new_zeros(present.shape[0], *values.shape[1:]).index_copy(0, rows, values)

        return EncoderOutput(scatter(out.embedding), scatter(out.readonly))

    def fuse(
        self, emb: dict[str, torch.Tensor | None], image_present: torch.Tensor, text_present: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from :meth:`encode`'s output and the presence masks.

        Applies the missing strategy (e_m = z_m where present, the stand-in where missing) and the
        fusion head. For ``dummy_input`` z_m is used as is: it must be the encoding of what the batch
        carried (the filler for a missing input); see :meth:`fuse_with_missing` for complete-input
        embeddings.
        """
        e_v, e_t = self.missing_fill(
            emb["z_v"], emb["z_t"], emb["zhat_v"], emb["zhat_t"], image_present.bool(), text_present.bool()
        )
        return self.head(e_v, e_t)

    def fuse_with_missing(
        self, emb: dict[str, torch.Tensor | None], image_present: torch.Tensor, text_present: torch.Tensor
    ) -> torch.Tensor:
        """Logits as if the modalities marked absent were missing, from embeddings of *complete* inputs.

        The robustness evaluation encodes the test set once with complete inputs and calls this per
        missing setting. For ``dummy_input`` the missing modality's z is replaced by
        :meth:`filler_embeddings`; the other strategies do not look at a missing z at all.
        """
        if self.missing_fill.spec.encodes_filler:
            filler = self.filler_embeddings()
            image_present, text_present = image_present.bool(), text_present.bool()
            emb = dict(emb)
            emb["z_v"] = torch.where(image_present[:, None], emb["z_v"], filler["z_v"].to(emb["z_v"]))
            emb["z_t"] = torch.where(text_present[:, None], emb["z_t"], filler["z_t"].to(emb["z_t"]))
        return self.fuse(emb, image_present, text_present)

    def filler_inputs(self, image_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """The filler inputs of the batch format: an all-ones image ``[1, 3, H, W]`` (already normalised)
        and the tokenised empty string ``[1, L]`` of the text backbone's tokenizer."""
        if image_size is None:
            size = sources.image_data_config(self.hparams.image_backbone, self.hparams.img_size)["input_size"]
            image_size = (int(size[1]), int(size[2]))
        if self._tokenizer is None:
            self._tokenizer = sources.create_tokenizer(self.hparams.text_backbone)
        tokens = self._tokenizer("", return_tensors="pt")
        return {
            "image": torch.ones(1, 3, *image_size, device=self.device),
            "input_ids": tokens["input_ids"].to(self.device),
            "attention_mask": tokens["attention_mask"].to(self.device),
        }

    @torch.no_grad()
    def filler_embeddings(self, image_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """``{"z_v": [Dv], "z_t": [Dt]}``: the encoders' outputs for the filler image and the empty text.

        Deterministic in eval mode (call ``model.eval()`` first). Cached in eval mode until a parameter
        changes (an optimiser step or a state-dict load bumps the tensors' version counters).
        ``image_size`` defaults to the image backbone's input size (``img_size``).
        """
        fingerprint = (image_size, str(self.device), sum(p._version for p in self.parameters()))
        if not self.training and self._filler_cache is not None and self._filler_cache[0] == fingerprint:
            return dict(self._filler_cache[1])
        inputs = self.filler_inputs(image_size)
        image_out = self.image_encoder(inputs["image"])
        text_out = self.text_encoder(inputs["input_ids"], inputs["attention_mask"])
        fillers = {"z_v": image_out.embedding[0], "z_t": text_out.embedding[0]}
        self._filler_cache = None if self.training else (fingerprint, fillers)
        return dict(fillers)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for a batch in the project's batch format."""
        image_present, text_present = self._check_presence(batch)
        return self.fuse(self.encode(batch), image_present, text_present)

    # ------------------------------------------------------------------------------------- the loss

    def compute_losses(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """All loss terms of one batch (``loss`` is what is optimised) and the logits."""
        image_present, text_present = self._check_presence(batch)
        emb = self.encode(batch)
        logits = self.fuse(emb, image_present, text_present)
        return self.loss_terms(batch, emb, logits), logits

    def _target_statistics(
        self, name: str, target: torch.Tensor, complete: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Running (mean, std) of a VICReg target (``target_matched``), updated with this batch's complete
        rows in training (all ranks' rows under DDP, so every rank keeps the same statistics)."""
        if self.hparams.vicreg_space != "target_matched":
            return None, None
        moments: RunningMoments = getattr(self, name)
        if self.training:
            rows, keep = target.detach(), complete
            if distributed():
                rows, keep = all_gather_with_grad(rows), all_gather_with_grad(keep)
            moments.update(rows[keep])
        if int(moments.num_batches) == 0:
            return None, None  # nothing seen yet: the batch's own statistics
        return moments.mean.to(target.dtype), moments.std.to(target.dtype)

    def loss_terms(
        self, batch: dict[str, Any], emb: dict[str, torch.Tensor | None], logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The loss terms of a batch from its :meth:`encode` output and logits."""
        hp = self.hparams
        image_present, text_present = batch["image_present"].bool(), batch["text_present"].bool()
        labels = batch["label"]
        task_loss = per_sample_task_loss(logits, labels, hp.task).mean()
        complete = image_present & text_present
        losses: dict[str, torch.Tensor] = {}
        if hp.substitution:
            # The head also learns to classify from one real and one predicted embedding.
            sub_image = per_sample_task_loss(self.head(emb["zhat_v"], emb["z_t"]), labels, hp.task)
            sub_text = per_sample_task_loss(self.head(emb["z_v"], emb["zhat_t"]), labels, hp.task)
            substitution_loss = 0.5 * (masked_mean(sub_image, complete) + masked_mean(sub_text, complete))
            losses["substitution_loss"] = substitution_loss
            task_loss = task_loss + substitution_loss
        losses["task_loss"] = task_loss
        loss = task_loss
        if self.has_predictor:
            gather = all_gather_with_grad if distributed() else None
            options = {
                "inv_coeff": hp.vicreg_inv_coeff,
                "var_coeff": hp.vicreg_var_coeff,
                "cov_coeff": hp.vicreg_cov_coeff,
                "mask": complete,
                "gather": gather,
                "stop_grad_target": hp.stop_grad_target,
                "space": hp.vicreg_space,
            }
            mean_v, std_v = self._target_statistics("image_moments", emb["z_v"], complete)
            mean_t, std_t = self._target_statistics("text_moments", emb["z_t"], complete)
            to_image = vicreg_loss(emb["zhat_v"], emb["z_v"], target_mean=mean_v, target_std=std_v, **options)
            to_text = vicreg_loss(emb["zhat_t"], emb["z_t"], target_mean=mean_t, target_std=std_t, **options)
            pred_loss = to_image.total + to_text.total
            losses.update(
                pred_loss=pred_loss,
                vicreg_invariance=to_image.invariance + to_text.invariance,
                vicreg_variance=to_image.variance + to_text.variance,
                vicreg_covariance=to_image.covariance + to_text.covariance,
            )
            # Added even when the weight is 0, so the predictor always takes part in the graph.
            loss = loss + hp.pred_loss_weight * pred_loss
        losses["loss"] = loss
        return losses

    # --------------------------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str) -> None:
        # Under ddp_spawn on CPU the module reaches each worker through shared memory. Lightning
        # un-shares parameters and buffers, not torchmetrics states, so ranks would add into one
        # another's counts; reset() gives every metric fresh, private state tensors.
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        train_setting = getattr(datamodule, "missing", {}).get("train") if datamodule is not None else None
        train_rate = getattr(train_setting, "missing_rate", None)
        message = untrained_stand_in_warning(self.missing_fill.spec, train_rate)
        if message:
            rank_zero_warn(message)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        image_present, text_present = self._check_presence(batch)
        emb = self.encode(batch)
        logits = self.fuse(emb, image_present, text_present)
        losses = self.loss_terms(batch, emb, logits)
        if stage in CASE_STAGES and self.has_predictor:
            substitution_logits = {
                "image": self.head(emb["zhat_v"], emb["z_t"]),
                "text": self.head(emb["z_v"], emb["zhat_t"]),
            }
            self.prediction_diagnostics[f"{stage}_metrics"].update(
                emb, substitution_logits, batch["label"], image_present & text_present
            )
        if stage == "train":
            policy = self.hparams.nonfinite_policy
            if self.nonfinite_guard.check_losses(losses, batch.get("id", []), step_position(self), policy):
                return skipped_batch_loss(self, self.device)
            for name, value in losses.items():
                self.log(
                    f"{stage}/{name}",
                    value,
                    on_step=True,
                    on_epoch=True,
                    batch_size=logits.shape[0],
                    prog_bar=name == "loss",
                    sync_dist=True,
                )
        else:
            self.nonfinite_guard.check_logits(logits, batch.get("id"), stage)
        self.epoch_metrics.update(stage, logits, batch, None if stage == "train" else losses)
        return losses["loss"]

    # ---------------------------------------------------------------------------- numerical safety

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite_guard.before_optimizer_step(
            optimizer,
            self.named_parameters,
            self.global_step,
            str(self.trainer.precision),
            self.hparams.nonfinite_policy,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self(batch)
        preds, _ = (
            metric_inputs(logits, batch["label"], self.hparams.task) if "label" in batch else (None, None)
        )
        return {
            "id": batch.get("id"),
            "logits": logits,
            "probs": preds,
            "image_present": batch["image_present"],
            "text_present": batch["text_present"],
        }

    def _log_epoch_metrics(self, stage: str) -> None:
        self.epoch_metrics.log_epoch(stage, self.log, self.log_dict)
        if stage not in CASE_STAGES or not self.has_predictor:
            return
        diagnostics = self.prediction_diagnostics[f"{stage}_metrics"]
        with warnings.catch_warnings():
            # A rank may see no batch of a stage (tiny sets under DDP); the synced value is still right.
            warnings.filterwarnings("ignore", message=".*compute.*before the.*update.*")
            values = diagnostics.compute()  # synced over ranks: the same decision on every rank
        if values.pop("num_samples") >= 2:
            self.log_dict({f"{stage}/prediction/{k}": v for k, v in values.items()}, sync_dist=True)
        diagnostics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")
        # The same count on every rank (skips are agreed), so the synced mean is the count.
        self.log("train/nonfinite_skipped_batches", float(self.nonfinite_skipped_batches), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # ------------------------------------------------------------------------------------ optimiser

    def _parameter_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        return parameter_groups(self, hp.lr, hp.head_lr, hp.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return configure_adamw(
            self,
            hp.lr,
            hp.head_lr,
            hp.weight_decay,
            hp.warmup_fraction,
            hp.lr_schedule,
            total_steps=self.trainer.estimated_stepping_batches,
        )

    # ---------------------------------------------------------------------------------- checkpoints

    def frozen_state_keys(self) -> set[str]:
        """State-dict keys of the parameters that do not train (rebuilt from the sources on load)."""
        return checkpointing.frozen_state_keys(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.slim_checkpoint(self, checkpoint)
        checkpoint[CHECKPOINT_SKIPPED_KEY] = self.nonfinite_skipped_batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.restore_frozen_weights(self, checkpoint)
        self.nonfinite_skipped_batches = int(checkpoint.get(CHECKPOINT_SKIPPED_KEY, 0))
