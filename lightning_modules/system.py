"""UnipairSystem: the LightningModule of the method (DESIGN.md section 2) and its baselines.

Per step: both encoders run on the whole batch (missing inputs arrive as fillers, see the batch
format), each yields its modality embedding z and, from its read-only tokens, a prediction of the
other modality's embedding (ẑ). The missing strategy picks e_m per sample, the fusion head classifies
[e_v; e_t], and the loss is ``task + pred_loss_weight * (VICReg(ẑ_t, z_t) + VICReg(ẑ_v, z_v))`` with
VICReg over the complete samples only. Everything runs on every step whatever the missing pattern
(selection by masks), so DDP needs no unused-parameter search.

Separable evaluation contract (used by the robustness evaluation)::

    emb = model.encode(batch)                       # expensive, once, on complete inputs
    logits = model.fuse_with_missing(emb, image_present, text_present)   # cheap, per missing setting

``fuse_with_missing`` is exact for ``predict`` / ``zero`` / ``learned`` (the stand-ins do not
depend on the missing input). For ``dummy_input`` it substitutes :meth:`UnipairSystem.filler_embeddings`
(the encoders' outputs for the all-ones filler image and the empty text, deterministic in eval mode)
for the missing modality, which equals encoding the filler inside the batch up to float rounding.

Checkpoints hold only what trains (plus buffers) and the primitive hyperparameters; frozen backbone
weights are rebuilt from their sources (``lightning_modules.encoders.sources``) when the module is
constructed, and ``on_load_checkpoint`` fills them in (with a check that nothing else is missing).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics import Metric, SumMetric

from lightning_modules.diagnostics import PredictionDiagnostics
from lightning_modules.encoders import sources
from lightning_modules.encoders.image import ImageEncoder
from lightning_modules.encoders.text import TextEncoder
from lightning_modules.fusion import MISSING_STRATEGIES, FusionHead, MissingModalityFill
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
from lightning_modules.metrics import (
    IGNORE_INDEX,
    MISSING_CASES,
    build_metric_collection,
    ignore_outside,
    metric_inputs,
    missing_case_masks,
    monitor_metric,
)
from lightning_modules.peft_modes import check_peft_mode, count_parameters
from lightning_modules.predictor import PredictorHead
from lightning_modules.readonly_attention import ReadonlyGrad, check_readonly_grad

LR_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")
STAGES: tuple[str, ...] = ("train", "val", "test")
CASE_STAGES: tuple[str, ...] = ("val", "test")  # stages with the per-missing-case breakdown
EVAL_SAMPLE_COUNT = "num_samples"  # key of the evaluated-sample counter next to the loss sums
CHECKPOINT_OMITTED_KEY = "unipair_omitted_frozen_keys"
CHECKPOINT_SKIPPED_KEY = "unipair_nonfinite_skipped_batches"
NONFINITE_POLICIES: tuple[str, ...] = ("error", "skip")
# Loss terms a non-finite value is reported by, components before the sums they make up.
LOSS_COMPONENTS: tuple[str, ...] = (
    "task_loss", "substitution_loss", "vicreg_invariance", "vicreg_variance", "vicreg_covariance",
)


class NonFiniteLossError(FloatingPointError):
    """A training loss term or gradient (or an evaluation logit) is NaN or infinite."""


class UnipairSystem(LightningModule):
    """Missing-modality prediction with PEFT unimodal encoders, read-only predictor tokens, VICReg, late fusion.

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
            detached layer parameters), so the prediction loss trains the predictor only.
        vicreg_space: ``raw``: the reference VICReg terms; ``target_matched``: both sides standardised
            with the target's running statistics, variance hinge at the target's own spread,
            covariance matched to the target's (``losses.vicreg_loss``).
        substitution: on complete samples also train the head on [z_v; ẑ_t] and [ẑ_v; z_t] (adds the
            mean of those two losses to the task loss).
        lr: AdamW learning rate of the encoder parameters that train (task prompts, biases, LoRA, ...).
        head_lr: learning rate of the fusion head, predictor MLPs, read-only tokens and learned missing
            embeddings (None = ``lr``).
        weight_decay: AdamW weight decay (not applied to biases and norm weights, i.e. 1-D parameters).
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
        readonly_grad: ReadonlyGrad = "through",
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
        if missing_strategy not in MISSING_STRATEGIES:
            raise ValueError(
                f"missing_strategy: unknown strategy {missing_strategy!r}; expected one of {list(MISSING_STRATEGIES)}"
            )
        if predictor_length == 0 and (missing_strategy == "predict" or substitution):
            raise ValueError(
                "predictor_length=0 leaves no predictor, but missing_strategy='predict' or substitution=True needs one"
            )
        check_readonly_grad(readonly_grad)
        if vicreg_space not in VICREG_SPACES:
            raise ValueError(f"vicreg_space: unknown value {vicreg_space!r}; expected one of {list(VICREG_SPACES)}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: unknown schedule {lr_schedule!r}; expected one of {list(LR_SCHEDULES)}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_policy: unknown policy {nonfinite_policy!r}; expected one of {list(NONFINITE_POLICIES)}"
            )

        # Build the backbones under a fixed seed: a randomly initialised frozen backbone is then
        # identical every time the module is constructed (checkpoints do not store it).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(backbone_init_seed)
            image_model = sources.create_image_backbone(image_backbone, pretrained=pretrained, img_size=img_size)
            text_model = sources.create_text_backbone(text_backbone, pretrained=pretrained)
        text_pooling = text_pooling or sources.default_text_pooling(text_backbone)
        image_layers, text_layers = len(image_model.blocks), len(text_model.encoder.layer)
        self.image_encoder = ImageEncoder(
            image_model, peft_mode=image_peft, prompt_length=prompt_length,
            prompt_depth=min(prompt_depth, image_layers), predictor_length=predictor_length,
            pooling=image_pooling, readonly_grad=readonly_grad,
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        )
        self.text_encoder = TextEncoder(
            text_model, peft_mode=text_peft, prompt_length=prompt_length,
            prompt_depth=min(prompt_depth, text_layers), predictor_length=predictor_length,
            pooling=text_pooling, readonly_grad=readonly_grad,
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
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

        base_metrics = build_metric_collection(task, num_classes, multilabel_threshold)
        case_base_metrics = build_metric_collection(task, num_classes, multilabel_threshold, ignore_index=IGNORE_INDEX)
        # Keys are "<stage>_metrics" because ModuleDict keys may not shadow nn.Module.train.
        self.stage_metrics = nn.ModuleDict(
            {f"{stage}_metrics": base_metrics.clone(prefix=f"{stage}/") for stage in STAGES}
        )
        self.case_metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": nn.ModuleDict(
                    {case: case_base_metrics.clone(prefix=f"{stage}/{case}/") for case in MISSING_CASES}
                )
                for stage in CASE_STAGES
            }
        )
        self.case_counts = nn.ModuleDict(
            {f"{stage}_metrics": nn.ModuleDict({case: SumMetric() for case in MISSING_CASES}) for stage in CASE_STAGES}
        )
        # Validation/test loss means over the whole split, as sample-weighted sums and a sample count
        # synced by torchmetrics. (Lightning's epoch mean under DDP syncs the counts as an integer
        # *mean*, truncated on gloo: wrong when processes hold different numbers of samples, as with
        # the unpadded evaluation shards. torchmetrics 1.9's MeanMetric ignores weights when told to
        # keep NaN.) NaN stays NaN: nothing is dropped silently.
        self.eval_loss_sums = nn.ModuleDict(
            {
                f"{stage}_metrics": nn.ModuleDict(
                    {name: SumMetric(nan_strategy="disable") for name in [*self.loss_names(), EVAL_SAMPLE_COUNT]}
                )
                for stage in CASE_STAGES
            }
        )
        if self.has_predictor:
            self.prediction_diagnostics = nn.ModuleDict(
                {f"{stage}_metrics": PredictionDiagnostics(image_dim, text_dim, task, multilabel_threshold)
                 for stage in CASE_STAGES}
            )
        self._tokenizer: Any = None
        self._filler_cache: tuple[tuple, dict[str, torch.Tensor]] | None = None
        # Numerical safety: batches whose update was skipped (kept in checkpoints), and the batches
        # / skips since the last optimizer step (gradient accumulation windows).
        self.nonfinite_skipped_batches = 0
        self._window_batches = 0
        self._window_skipped = 0

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
        """The validation metric to maximise for this task (``val/f1_macro``, ``val/accuracy``, ``val/auroc``)."""
        return monitor_metric(self.hparams.task)

    def trainable_fraction(self) -> float:
        """Trainable parameters / all parameters of the module."""
        return count_parameters(self, trainable_only=True) / count_parameters(self)

    # ------------------------------------------------------------------------------- forward pieces

    @staticmethod
    def _check_presence(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        image_present, text_present = batch["image_present"].bool(), batch["text_present"].bool()
        neither = ~(image_present | text_present)
        if neither.any():
            ids = batch.get("id")
            bad = [ids[i] for i in neither.nonzero().flatten().tolist()] if ids is not None else neither.nonzero().flatten().tolist()
            raise ValueError(f"samples with neither image nor text are invalid input (image_present and text_present both False): {bad}")
        return image_present, text_present

    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Run both encoders on the batch (the expensive part).

        Returns ``{"z_v": [B, Dv], "z_t": [B, Dt], "zhat_v": [B, Dv] | None, "zhat_t": [B, Dt] | None}``:
        the modality embeddings and the predictions of each from the *other* modality (ẑ_v from the
        text encoder's read-only tokens, ẑ_t from the image encoder's). None without a predictor.
        """
        image_out = self.image_encoder(batch["image"])
        text_out = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        zhat_t = self.image_to_text(image_out.readonly) if self.has_predictor else None
        zhat_v = self.text_to_image(text_out.readonly) if self.has_predictor else None
        return {"z_v": image_out.embedding, "z_t": text_out.embedding, "zhat_v": zhat_v, "zhat_t": zhat_t}

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
        if self.hparams.missing_strategy == "dummy_input":
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
            if self._distributed():
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
            gather = all_gather_with_grad if self._distributed() else None
            options = {"inv_coeff": hp.vicreg_inv_coeff, "var_coeff": hp.vicreg_var_coeff,
                       "cov_coeff": hp.vicreg_cov_coeff, "mask": complete, "gather": gather,
                       "stop_grad_target": hp.stop_grad_target, "space": hp.vicreg_space}
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

    def _distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    # --------------------------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str) -> None:
        # Under ddp_spawn on CPU the module reaches each worker through shared memory. Lightning
        # un-shares parameters and buffers, not torchmetrics states, so ranks would add into one
        # another's counts; reset() gives every metric fresh, private state tensors.
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        image_present, text_present = self._check_presence(batch)
        emb = self.encode(batch)
        logits = self.fuse(emb, image_present, text_present)
        losses = self.loss_terms(batch, emb, logits)
        if stage in CASE_STAGES and self.has_predictor:
            substitution_logits = {"image": self.head(emb["zhat_v"], emb["z_t"]),
                                   "text": self.head(emb["z_v"], emb["zhat_t"])}
            self.prediction_diagnostics[f"{stage}_metrics"].update(
                emb, substitution_logits, batch["label"], image_present & text_present
            )
        if stage == "train":
            self._window_batches += 1
            if self._nonfinite_losses(losses, batch):
                self._window_skipped += 1
                return self._skipped_batch_loss()
        else:
            self._check_finite_logits(logits, batch, stage)
        batch_size = logits.shape[0]
        if stage == "train":
            for name, value in losses.items():
                self.log(
                    f"{stage}/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size,
                    prog_bar=name == "loss", sync_dist=True,
                )
        else:
            sums = self.eval_loss_sums[f"{stage}_metrics"]
            for name, value in losses.items():
                sums[name].update(value.detach().float() * batch_size)
            sums[EVAL_SAMPLE_COUNT].update(float(batch_size))
        preds, target = metric_inputs(logits, batch["label"], self.hparams.task)
        self.stage_metrics[f"{stage}_metrics"].update(preds, target)
        if stage in CASE_STAGES:
            for case, mask in missing_case_masks(batch["image_present"], batch["text_present"]).items():
                self.case_counts[f"{stage}_metrics"][case].update(mask.sum().float())
                # Whole batch, other cases ignored: no empty updates, well-typed states on every rank.
                self.case_metrics[f"{stage}_metrics"][case].update(preds, ignore_outside(target, mask))
        return losses["loss"]

    # ---------------------------------------------------------------------------- numerical safety

    def _any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of a float flag vector over DDP ranks (identity on one process).

        Every rank then takes the same decision, so no rank skips a backward pass or raises alone
        (which would leave the others waiting in a collective).
        """
        if self._distributed():
            flags = flags.clone()
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags

    def _where(self, batch: dict[str, Any]) -> str:
        trainer = self._trainer
        if trainer is None:
            return "outside a Trainer"
        return (
            f"global step {self.global_step} (optimizer steps done), epoch {self.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx + 1} of the epoch"
        )

    def _nonfinite_losses(self, losses: dict[str, torch.Tensor], batch: dict[str, Any]) -> bool:
        """Check every loss term; True when the batch must be skipped (policy ``skip``), raise (``error``).

        A [ranks x terms] flag matrix (each rank fills its row) is max-reduced over the ranks: a single
        device sync, the same decision on every rank, and a message saying which term went
        non-finite on which rank (the VICReg terms use the global batch, so a NaN row of one rank
        makes them NaN on every rank; the task loss is per rank).
        """
        names = list(losses)
        values = torch.stack([losses[name].detach().float() for name in names])
        world = torch.distributed.get_world_size() if self._distributed() else 1
        rank = torch.distributed.get_rank() if self._distributed() else 0
        flags = torch.zeros(world, len(names), device=values.device)
        flags[rank] = (~torch.isfinite(values)).float()
        flags = self._any_rank(flags).tolist()
        if not any(any(row) for row in flags):
            return False
        ranks_of = {name: [r for r in range(world) if flags[r][i]] for i, name in enumerate(names)}
        bad_terms = [name for name in names if ranks_of[name]]
        components = [name for name in bad_terms if name in LOSS_COMPONENTS]
        where = (lambda name: f" (rank(s) {ranks_of[name]})") if world > 1 else (lambda name: "")
        if components:
            what = "non-finite loss term(s): " + ", ".join(name + where(name) for name in components)
        else:
            what = f"non-finite weighted sum ({', '.join(bad_terms)}) while every component is finite (overflow)"
        local = dict(zip(names, values.tolist(), strict=True))
        ids = list(batch.get("id", []))[:8]
        details = (
            f"{what} at {self._where(batch)}"
            + f". Values on rank {rank}: " + ", ".join(f"{k}={v:.6g}" for k, v in local.items())
            + f". Batch ids (first 8, rank {rank}): {ids}."
        )
        if self.hparams.nonfinite_policy == "error":
            raise NonFiniteLossError(
                f"Training stopped: {details} Lower the learning rate, check the inputs, or set "
                "model.nonfinite_policy: skip to skip such batches (counted and logged)."
            )
        self.nonfinite_skipped_batches += 1
        rank_zero_warn(
            f"Skipping the update of this batch (nonfinite_policy=skip, {self.nonfinite_skipped_batches} "
            f"skipped so far): {details}"
        )
        return True

    def _skipped_batch_loss(self) -> torch.Tensor:
        """A zero loss reaching every trainable parameter: backward (and DDP's gradient all-reduce) runs
        as usual with zero gradients; ``on_before_optimizer_step`` then drops them so the optimizer
        leaves the parameters and its moments untouched."""
        return sum((param.sum() * 0.0 for param in self.parameters() if param.requires_grad), torch.zeros((), device=self.device))

    def _check_finite_logits(self, logits: torch.Tensor, batch: dict[str, Any], stage: str) -> None:
        bad_rows = ~torch.isfinite(logits.detach()).all(dim=-1)
        if not self._any_rank(bad_rows.any().float().view(1)).item():
            return
        ids = batch.get("id")
        rows = bad_rows.nonzero().flatten().tolist()
        named = [ids[i] for i in rows] if ids is not None else rows
        raise NonFiniteLossError(
            f"{stage}: non-finite logits for sample(s) {named[:10]}"
            + (f" (and {len(named) - 10} more)" if len(named) > 10 else "")
            + ("" if named else " on another rank")
            + "; the metrics would be meaningless. The weights or these inputs hold NaN/inf values."
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        window_batches, window_skipped = self._window_batches, self._window_skipped
        self._window_batches = self._window_skipped = 0
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if window_batches and window_skipped == window_batches:
            # Every batch of this update was skipped: no update at all (AdamW leaves parameters
            # without a gradient untouched, moments and step counts included).
            for param in params:
                param.grad = None
            return
        if not params or str(self.trainer.precision).startswith("16"):
            return  # fp16 mixed precision: the gradient scaler already skips steps with inf gradients
        norms = torch._foreach_norm([p.grad for p in params])
        finite = torch.isfinite(torch.stack(norms))
        if bool(finite.all()):  # gradients are already all-reduced under DDP: the same answer on every rank
            return
        names = {id(p): n for n, p in self.named_parameters()}
        bad = [names.get(id(p), "?") for p, ok in zip(params, finite.tolist(), strict=True) if not ok]
        details = f"non-finite gradient(s) at global step {self.global_step} in {len(bad)} parameter(s), e.g. {bad[:5]}"
        if self.hparams.nonfinite_policy == "error":
            raise NonFiniteLossError(
                f"Training stopped: {details} (the loss terms were finite). Lower the learning rate, or set "
                "model.nonfinite_policy: skip to skip such updates (counted and logged)."
            )
        self.nonfinite_skipped_batches += 1
        rank_zero_warn(f"Skipping this update (nonfinite_policy=skip, {self.nonfinite_skipped_batches} skipped so far): {details}")
        for param in params:
            param.grad = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self(batch)
        preds, _ = metric_inputs(logits, batch["label"], self.hparams.task) if "label" in batch else (None, None)
        return {
            "id": batch.get("id"),
            "logits": logits,
            "probs": preds,
            "image_present": batch["image_present"],
            "text_present": batch["text_present"],
        }

    def _log_epoch_metrics(self, stage: str) -> None:
        collection = self.stage_metrics[f"{stage}_metrics"]
        with warnings.catch_warnings():
            # A rank may see no batch of a stage (tiny sets under DDP); the synced value is still right.
            warnings.filterwarnings("ignore", message=".*compute.*before the.*update.*")
            if any(m._update_count for m in collection.values()) or self._distributed():
                # torchmetrics already synced these; sync_dist averages identical values (and keeps
                # Lightning from warning about unsynced epoch-level logs).
                self.log_dict(collection.compute(), sync_dist=True)
            collection.reset()
            if stage not in CASE_STAGES:
                return
            sums = self.eval_loss_sums[f"{stage}_metrics"]
            if sums[EVAL_SAMPLE_COUNT]._update_count or self._distributed():
                count = sums[EVAL_SAMPLE_COUNT].compute()
                for name, total in sums.items():
                    if name != EVAL_SAMPLE_COUNT:
                        self.log(f"{stage}/{name}", total.compute() / count, prog_bar=name == "loss", sync_dist=True)
            for total in sums.values():
                total.reset()
            if self.has_predictor:
                diagnostics = self.prediction_diagnostics[f"{stage}_metrics"]
                values = diagnostics.compute()  # synced over ranks: the same decision on every rank
                if values.pop("num_samples") >= 2:
                    self.log_dict({f"{stage}/prediction/{k}": v for k, v in values.items()}, sync_dist=True)
                diagnostics.reset()
            for case in MISSING_CASES:
                counter = self.case_counts[f"{stage}_metrics"][case]
                metrics = self.case_metrics[f"{stage}_metrics"][case]
                count = counter.compute()  # synced over ranks: the same decision on every rank

                counter.reset()
                if count > 0:
                    values = metrics.compute()
                    values[f"{stage}/{case}/num_samples"] = count.float()
                    self.log_dict(values, sync_dist=True)
                metrics.reset()

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
        head_lr = hp.head_lr if hp.head_lr is not None else hp.lr
        head_prefixes = ("head.", "missing_fill.", "image_to_text.", "text_to_image.",
                         "image_encoder.readonly_tokens.", "text_encoder.readonly_tokens.")
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "head" if name.startswith(head_prefixes) else "encoder"
            decay = param.ndim >= 2  # no weight decay on biases and norm weights
            groups.setdefault((part, decay), []).append(param)
        return [
            {"params": params, "lr": head_lr if part == "head" else hp.lr,
             "weight_decay": hp.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '_no_decay'}"}
            for (part, decay), params in sorted(groups.items())
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        hp = self.hparams
        optimizer = torch.optim.AdamW(self._parameter_groups(), lr=hp.lr, weight_decay=hp.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup_steps = int(hp.warmup_fraction * total_steps)
        if hp.lr_schedule == "linear":
            scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        elif hp.lr_schedule == "cosine":
            scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------- checkpoints

    def frozen_state_keys(self) -> set[str]:
        """State-dict keys of the parameters that do not train (rebuilt from the sources on load)."""
        return {name for name, param in self.named_parameters() if not param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_state_keys()
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {key: value for key, value in state.items() if key not in frozen}
        checkpoint[CHECKPOINT_OMITTED_KEY] = len(state) - len(checkpoint["state_dict"])
        checkpoint[CHECKPOINT_SKIPPED_KEY] = self.nonfinite_skipped_batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        own = self.state_dict()
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        missing_trainable = missing - self.frozen_state_keys()
        mismatched = {
            key: (tuple(state[key].shape), tuple(own[key].shape))
            for key in sorted(set(state) & set(own))
            if hasattr(state[key], "shape") and tuple(state[key].shape) != tuple(own[key].shape)
        }
        if unexpected or missing_trainable or mismatched:
            saved = checkpoint.get("hyper_parameters", {})
            differences = {
                key: (saved.get(key), value) for key, value in self.hparams.items() if saved.get(key) != value
            }
            raise RuntimeError(
                "checkpoint does not match this UnipairSystem configuration: "
                f"{len(missing_trainable)} trainable/buffer keys missing (e.g. {sorted(missing_trainable)[:5]}), "
                f"{len(unexpected)} unexpected keys (e.g. {sorted(unexpected)[:5]}), "
                f"{len(mismatched)} with other shapes (checkpoint, current; e.g. {dict(list(mismatched.items())[:3])}). "
                f"Hyperparameters that differ (checkpoint, current): {differences}"
            )
        # Frozen weights are not stored: take them from the freshly built backbones.
        for key in missing:
            state[key] = own[key]
        self.nonfinite_skipped_batches = int(checkpoint.get(CHECKPOINT_SKIPPED_KEY, 0))
