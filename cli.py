"""unipair command line: LightningCLI over ``UnipairSystem`` and the ``MissingModalityDataModule`` family.

Subcommands (``unipair <subcommand> ...`` or ``python cli.py <subcommand> ...``):

- ``fit``, ``validate``, ``test``: Lightning's own.
- ``predict``: Lightning's own on the DataModule's test split, or, with ``--predict_file rows.jsonl``,
  on a JSONL file of raw inputs, written to ``--output_file`` (see ``datamodules/predict_jsonl.py``).
- ``robustness``: evaluate one checkpoint over a grid of test missing settings and write
  ``robustness.{json,csv,md,png}`` (see ``lightning_modules/robustness.py``).

Wiring (so the two sides can never disagree):

- ``data.num_classes`` and ``data.task`` -> ``model.num_classes`` / ``model.task`` (when the
  DataModule is instantiated: the class count may come from the data, e.g. emoji subgroups);
- ``model.image_backbone``, ``model.text_backbone``, ``model.img_size`` -> ``data.image_encoder``,
  ``data.text_encoder``, ``data.image_size`` (at parse time): the tokenizer and the image transform
  are always those of the encoders;
- ``model.monitor`` (the task's validation metric) -> ``checkpoint.monitor``.

Run folders: TensorBoard logs under ``runs/<name>/version_<N>/`` (``trainer.logger``), with the
checkpoints (best on the monitored metric + ``last.ckpt``) in its ``checkpoints/`` and the full
``config.yaml``. The config is written with ``overwrite=True``: a requeued SLURM job that reuses its
version folder (``trainer.logger.init_args.version``) rewrites the same config instead of aborting;
a new run without a fixed version gets a new ``version_<N>`` folder, so nothing is overwritten.

User errors (:func:`user_error_message`: bad input files or rows, missing columns, bad or foreign
checkpoints, option values out of range) print one line naming the file / row / field / option and
exit with status 2; ``UNIPAIR_DEBUG=1`` shows the traceback instead. Any other exception (a bug)
keeps its traceback. ``predict --predict_file`` validates the whole input file before the model is
built.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

# Imported so that short class names (``--data EmojiDataModule``) resolve.
import datamodules.emoji  # noqa: F401
import datamodules.food101  # noqa: F401
import datamodules.hateful_memes  # noqa: F401
import datamodules.mmimdb  # noqa: F401
from datamodules.base import MissingModalityDataModule
from lightning_modules.callbacks import EvaluationCoverage, ResumeState
from lightning_modules.robustness import DEFAULT_MISSING_RATES, DEFAULT_MISSING_TYPES
from lightning_modules.system import UnipairSystem

DEBUG_ENV = "UNIPAIR_DEBUG"
SOURCE_ROOT = Path(__file__).resolve().parent
# Where unipair validates what it is given: a ValueError / FileNotFoundError raised here is a user error.
VALIDATING_CODE: tuple[Path, ...] = (
    SOURCE_ROOT / "datamodules",
    SOURCE_ROOT / "lightning_modules",
    SOURCE_ROOT / "cli.py",
)
DEFAULT_RUN_DIR = "runs"
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": DEFAULT_RUN_DIR, "name": "unipair"},
    },
}


class UserInputError(ValueError):
    """Something the user gave is unusable (a file, a row, an option, a checkpoint); the message says what."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from datamodules import BadSampleError
    from datamodules.cache import CacheError
    from datamodules.missing import MissingTableError
    from datamodules.predict_jsonl import PredictionInputError
    from lightning_modules.checkpointing import CheckpointMismatchError

    return (
        UserInputError,
        BadSampleError,
        CacheError,
        MissingTableError,
        PredictionInputError,
        CheckpointMismatchError,
        MisconfigurationException,  # Lightning's "the Trainer options cannot work"
    )


def _in_validating_code(filename: str | None) -> bool:
    if not filename:
        return False
    path = Path(filename).resolve()
    return any(path == root or root in path.parents for root in VALIDATING_CODE)


def _worker_error(message: str) -> tuple[str, str | None]:
    """(original message, file that raised it) of an exception a DataLoader worker re-raised with its
    traceback as the message."""
    files = re.findall(r'^  File "([^"]+)", line \d+', message, flags=re.MULTILINE)
    lines = message.splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith('  File "')), default=0)
    rest = [line for line in lines[last_frame + 1 :] if line and not line.startswith(" ")]
    original = "\n".join(rest).split(": ", 1)[-1] if rest else message
    return original, files[-1] if files else None


def user_error_message(error: BaseException) -> str | None:
    """The message to print for a user error, or None for anything else (a bug: keep its traceback).

    User errors are unipair's input and checkpoint error types (``BadSampleError``,
    ``PredictionInputError``, ``MissingTableError``, ``CacheError``, ``CheckpointMismatchError``,
    :class:`UserInputError`), Lightning's ``MisconfigurationException`` (Trainer options that cannot
    work here) and the ``ValueError`` / ``FileNotFoundError`` that unipair's own
    validation raises (in ``datamodules/``, ``lightning_modules/`` or this file: option checks of the
    constructors, reader checks of files and rows). The same error raised inside a library (torch, timm,
    ...) is treated as a bug. Errors re-raised from DataLoader workers are unwrapped first, and a
    library's error wrapping ours (jsonargparse reports a constructor's ValueError inside its own) is
    looked through to its cause.
    """
    while error is not None:
        message = str(error)
        if message.startswith("Caught ") and "DataLoader worker" in message.split("\n", 1)[0]:
            message, origin = _worker_error(message)
        else:
            traceback = error.__traceback__
            while traceback is not None and traceback.tb_next is not None:
                traceback = traceback.tb_next
            origin = traceback.tb_frame.f_code.co_filename if traceback is not None else None
        ours = _in_validating_code(origin)
        validation = isinstance(error, (ValueError, FileNotFoundError)) and ours
        if validation or isinstance(error, _user_error_types()):
            return message.strip() or type(error).__name__
        if ours:
            return None
        error = error.__cause__
    return None


def prediction_output_path(predict_file: str | os.PathLike, output_file: str | os.PathLike | None) -> Path:
    """``output_file``, or ``<predict_file without .jsonl>.predictions.jsonl`` next to the input."""
    predict_path = Path(predict_file)
    output = (
        Path(output_file)
        if output_file
        else predict_path.with_name(predict_path.name.removesuffix(".jsonl") + ".predictions.jsonl")
    )
    if output.resolve() == predict_path.resolve():
        raise UserInputError(f"--output_file {output} would overwrite the input --predict_file")
    return output


def default_robustness_dir(ckpt_path: str | os.PathLike) -> Path:
    """``<run folder>/robustness`` for ``<run folder>/checkpoints/<file>.ckpt``, else next to the file."""
    ckpt_path = Path(ckpt_path)
    folder = ckpt_path.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / "robustness"


def load_weights(model: UnipairSystem, ckpt_path: str | os.PathLike, weights_only: bool = True) -> dict:
    """Load a checkpoint's weights into ``model`` as ``Trainer`` does (``on_load_checkpoint``, then the
    state dict).
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=weights_only)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)
    return checkpoint


def check_checkpoint_classes(ckpt_path: str | os.PathLike | None, datamodule: Any) -> None:
    """Fail when the checkpoint was trained with other classes than ``datamodule`` gives.

    The predictions are written with the DataModule's class names; with ``--predict_file`` Lightning
    never sees the DataModule, so its ``load_state_dict`` check of the checkpoint is made here.
    """
    if not ckpt_path or not Path(ckpt_path).is_file():
        return
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get(type(datamodule).__qualname__)
    if state is not None:
        datamodule.load_state_dict(state)


class UnipairTrainer(Trainer):
    """Lightning's ``Trainer`` plus JSONL prediction and the robustness evaluation (CLI subcommands)."""

    def predict(
        self,
        model=None,
        dataloaders=None,
        datamodule=None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        predict_file: str | None = None,
        output_file: str | None = None,
    ):
        """Predict with a checkpoint: on the DataModule's test split, or on a JSONL file of raw inputs.

        With ``predict_file`` or ``output_file``, the predictions are written as JSONL (id, label
        names, scores; see ``datamodules/predict_jsonl.py``); prediction runs on one device then.

        Args:
            model: The model.
            dataloaders: Dataloaders (Lightning's predict; not with ``predict_file``).
            datamodule: The training DataModule; with ``predict_file`` it supplies the preprocessing
                (tokenizer, image transform, max_text_len) and the label names.
            return_predictions: Whether to return the predictions (Lightning's predict).
            ckpt_path: Checkpoint to load (``best``, ``last`` or a path).
            weights_only: ``torch.load``'s ``weights_only`` for the checkpoint (Lightning's default when
                null).
            predict_file: A JSONL file of rows with optional ``image`` (path, relative to the file's
                folder or absolute), optional ``text`` and optional ``id``; each row needs an image or a text.
            output_file: Where to write the predictions (JSONL). Default with ``predict_file``:
                ``<predict_file without .jsonl>.predictions.jsonl`` next to the input. Without
                ``predict_file``, the predictions on the DataModule's test split go there.
        """
        if predict_file is None and output_file is None:
            return super().predict(
                model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only
            )
        from datamodules.predict_jsonl import JsonlPredictionWriter, prediction_dataloader

        if dataloaders is not None:
            raise UserInputError(
                "--predict_file / --output_file write predictions of the DataModule or of a JSONL file, "
                "not of dataloaders"
            )
        if datamodule is None:
            raise UserInputError(
                "--predict_file / --output_file need the run's DataModule (--config of the run, or --data)"
            )
        if predict_file is not None:
            output = prediction_output_path(predict_file, output_file)
            check_checkpoint_classes(ckpt_path, datamodule)
            loader = prediction_dataloader(Path(predict_file), datamodule)
            line_of = loader.dataset.line_of
        else:  # the DataModule's predict split (its test split, with its test missing setting)
            output, loader, line_of = Path(output_file), None, None
        writer = JsonlPredictionWriter(
            output,
            datamodule.label_names,
            datamodule.task,
            line_of=line_of,
            threshold=getattr(model.hparams, "multilabel_threshold", 0.5) if model is not None else 0.5,
        )
        self.callbacks.append(writer)
        try:
            super().predict(
                model,
                dataloaders=loader,
                datamodule=datamodule if loader is None else None,
                return_predictions=False,
                ckpt_path=ckpt_path,
                weights_only=weights_only,
            )
        finally:
            self.callbacks.remove(writer)
        print(f"wrote {writer.written} predictions to {output}")
        return None

    def robustness(
        self,
        model: UnipairSystem,
        datamodule: MissingModalityDataModule,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        out_dir: str | None = None,
        missing_rates: tuple[float, ...] = DEFAULT_MISSING_RATES,
        missing_types: tuple[str, ...] = DEFAULT_MISSING_TYPES,
        both_ratio: float | None = None,
        progress: bool = True,
    ) -> list[dict]:
        """Evaluate a checkpoint over a grid of test missing settings; write robustness.{json,csv,md,png}.

        The encoders run once over the test split with complete inputs; the fusion is re-run per
        setting with the presence masks of that setting's missing table (the one ``test`` uses).

        Args:
            model: The model (its hyperparameters come from the checkpoint).
            datamodule: The run's DataModule (dataset, preprocessing, table folder and seed).
            ckpt_path: The checkpoint to evaluate (required).
            weights_only: ``torch.load``'s ``weights_only`` (null: True; unipair checkpoints hold only
                tensors and primitive hyperparameters).
            out_dir: Output folder. Default: ``<run folder>/robustness`` for a checkpoint in
                ``<run folder>/checkpoints/``.
            missing_rates: Test missing rates (each in [0, 1]).
            missing_types: Test missing types (``text``, ``image``, ``both``).
            both_ratio: Share of image-missing among the missing for ``both``; null = the
                DataModule's ``test_missing.both_ratio``.
            progress: Show progress bars.
        """
        from lightning_modules.robustness import (
            evaluate_robustness,
            markdown_table,
            parse_grid,
            write_robustness_files,
        )

        if not ckpt_path:
            raise UserInputError("robustness needs --ckpt_path (the checkpoint to evaluate)")
        if not Path(ckpt_path).is_file():
            raise UserInputError(f"--ckpt_path {ckpt_path} does not exist")
        parse_grid(missing_rates, missing_types)  # fail on a bad grid before any work
        out = Path(out_dir) if out_dir else default_robustness_dir(ckpt_path)
        load_weights(model, ckpt_path, weights_only=weights_only is not False)
        rows, metric = evaluate_robustness(
            model,
            datamodule,
            missing_rates=missing_rates,
            missing_types=missing_types,
            both_ratio=both_ratio,
            device=self.strategy.root_device,
            autocast=self.precision_plugin.forward_context,
            progress=progress,
        )
        meta = {
            "checkpoint": str(ckpt_path),
            "missing_rates": list(missing_rates),
            "missing_types": list(missing_types),
        }
        paths = write_robustness_files(rows, out, metric, meta=meta)
        print(markdown_table(rows, metric, title=f"{rows[0]['dataset']} — {rows[0]['strategy']} — {metric}"))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return rows


class UnipairCLI(LightningCLI):
    """LightningCLI with the unipair links, checkpointing, run folders and extra subcommands."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands["robustness"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Exact resume (random states, last.ckpt on SIGTERM and every epoch) and exact evaluation
        # coverage under DDP: see lightning_modules/callbacks.py.
        parser.add_lightning_class_args(ResumeState, "resume")
        parser.add_lightning_class_args(EvaluationCoverage, "evaluation_coverage")
        parser.set_defaults(
            {
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("model.monitor", "checkpoint.monitor", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.task", "model.init_args.task", apply_on="instantiate")
        parser.link_arguments("model.init_args.image_backbone", "data.init_args.image_encoder")
        parser.link_arguments("model.init_args.text_backbone", "data.init_args.text_encoder")
        parser.link_arguments("model.init_args.img_size", "data.init_args.image_size")

    def _parse_ckpt_path(self) -> None:
        """Lightning's step that takes the model's hyperparameters from ``--ckpt_path``, plus: a file that
        is not a readable Lightning checkpoint is a clear error naming it, and every model setting the
        checkpoint replaces is reported (Lightning replaces them silently)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if (
            not ckpt_path or not Path(ckpt_path).is_file()
        ):  # "last", "best", a missing file: Lightning's handling
            return super()._parse_ckpt_path()
        check_checkpoint_file(ckpt_path)
        before = _init_args(self.config[subcommand].get("model"))
        super()._parse_ckpt_path()
        after = _init_args(self.config[subcommand].get("model"))
        linked_from_data = ("task", "num_classes")  # set from the DataModule when the classes are built
        replaced = {
            key: (before[key], after[key])
            for key in after
            if key in before and key not in linked_from_data and before[key] != after[key]
        }
        if replaced:
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(
                f"--ckpt_path {ckpt_path}: the model is built with the checkpoint's hyperparameters; these "
                f"settings of the config/command line were replaced (given -> checkpoint): {replaced}"
            )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        check_ckpt_path(config)
        check_encoder_names(config)
        check_data_root(config)
        check_missing_settings(config)
        if self.subcommand == "predict" and config.get("predict_file"):
            # Every row (JSON, fields, image files decodable) before the model is built (minutes for
            # large encoders), so a bad row costs seconds.
            from datamodules.predict_jsonl import validate_prediction_file

            prediction_output_path(config.predict_file, config.get("output_file"))
            validate_prediction_file(config.predict_file)

    def after_robustness(self) -> None:
        """Save the robustness run's config next to its outputs."""
        config = self.config["robustness"]
        out = Path(config.out_dir) if config.out_dir else default_robustness_dir(config.ckpt_path)
        self._parser("robustness").save(
            config, out / "config.yaml", skip_unset=False, overwrite=True, multifile=False
        )


def _init_args(model_config: Any) -> dict:
    if model_config is None:
        return {}
    init_args = model_config.get("init_args") if hasattr(model_config, "get") else None
    return dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args or {})


def check_checkpoint_file(ckpt_path: str | os.PathLike) -> None:
    """Fail with a clear message when ``ckpt_path`` is not a readable Lightning checkpoint (a truncated
    copy, another kind of file, a plain ``torch.save`` of weights)."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle errors of many types: all mean "not a readable checkpoint"
        # First sentence only: torch's longer advice (e.g. "re-run with weights_only=False") does not apply.
        first = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else ""
        raise UserInputError(
            f"--ckpt_path {ckpt_path}: cannot be read as a checkpoint ({type(error).__name__}: "
            f"{first[:200]}). Is it a complete .ckpt file written by `unipair fit` (not truncated by a copy "
            "or a full disk)?"
        ) from error
    required = ("state_dict", "pytorch-lightning_version")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserInputError(
            f"--ckpt_path {ckpt_path}: not a Lightning checkpoint (expected the keys {list(required)}, found "
            f"{keys}); pass a .ckpt file written by `unipair fit`"
        )


# --ckpt_path values Lightning resolves itself (a run's own checkpoints, remote URLs).
LIGHTNING_CKPT_NAMES: tuple[str, ...] = ("last", "best", "hpc", "registry")


def check_ckpt_path(config: Any) -> None:
    """Fail early when ``--ckpt_path`` names a local file that does not exist."""
    ckpt_path = config.get("ckpt_path") if hasattr(config, "get") else None
    if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES or str(ckpt_path).startswith("registry:"):
        return
    if "://" not in str(ckpt_path) and not Path(ckpt_path).is_file():
        raise UserInputError(f"--ckpt_path {ckpt_path}: file does not exist")


def check_encoder_names(config: Any) -> None:
    """Fail before anything is built when an encoder name cannot be resolved (message names the option)."""
    from lightning_modules.encoders import sources

    model_args = config.model.init_args
    image_name, text_name = model_args.image_backbone, model_args.text_backbone
    if not (
        image_name in sources.BUILTIN_IMAGE_BACKBONES
        or Path(image_name).expanduser().is_dir()
        or image_name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
        or "/" in image_name
        or _is_timm_model(image_name)
    ):
        raise ValueError(
            f"model.image_backbone: unknown image encoder {image_name!r}; expected a built-in "
            f"({', '.join(sources.BUILTIN_IMAGE_BACKBONES)}), a timm model name (e.g. vit_base_patch16_224, "
            "test_vit), a Hugging Face Hub id holding a timm model, or a local folder"
        )
    if text_name in sources.BUILTIN_TEXT_BACKBONES or Path(text_name).expanduser().is_dir():
        return
    if text_name.startswith(("/", "./", "../", "~")):
        raise ValueError(f"model.text_backbone: local folder {text_name} does not exist")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(text_name)
    except Exception as error:  # offline, unknown id, bad folder: all mean "cannot be resolved"
        raise ValueError(
            f"model.text_backbone: cannot resolve text encoder {text_name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); expected a built-in "
            f"({', '.join(sources.BUILTIN_TEXT_BACKBONES)}), a Hugging Face model id (needs network or the "
            "HF cache), or a local folder"
        ) from error


def _is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def check_data_root(config: Any) -> None:
    """Fail early when ``data.root`` is given but does not exist."""
    root = config.data.init_args.get("root") if config.data and config.data.get("init_args") else None
    if root is not None and not Path(root).expanduser().exists():
        raise FileNotFoundError(
            f"data.root: folder {root} does not exist ({config.data.class_path}); download and unpack the "
            "dataset there (see the README) or pass --data.root <folder>"
        )


def make_cli(args: ArgsType = None, run: bool = True) -> UnipairCLI:
    """Parse ``args`` (default: ``sys.argv``), build model/data/trainer and, with ``run``, run the
    subcommand.
    """
    return UnipairCLI(
        UnipairSystem,
        MissingModalityDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=UnipairTrainer,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def check_missing_settings(config: Any) -> None:
    """Validate ``data.{train,val,test}_missing`` (eta in [0, 1], a known type) before anything is built."""
    from datamodules.missing import MissingSetting

    init_args = config.data.get("init_args") if config.data else None
    if init_args is None:
        return
    for split in ("train", "val", "test"):
        key = f"{split}_missing"
        if key in init_args and init_args[key] is not None:
            value = init_args[key]
            MissingSetting.from_config(value.as_dict() if hasattr(value, "as_dict") else value, f"data.{key}")


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def cli_main(args: ArgsType = None) -> None:
    """Entry point of the ``unipair`` console script and of ``python cli.py`` (returns None: exit status 0).

    A run stopped by SIGTERM (after saving ``last.ckpt``) exits with status 143 (128 + SIGTERM);
    Lightning itself would exit with 0, which a scheduler or shell script reads as "finished".
    A user error (:func:`user_error_message`) prints one message and exits with status 2, as a
    command-line typo does; ``UNIPAIR_DEBUG=1`` re-raises it with its traceback.
    """
    try:
        make_cli(args)
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)
    except Exception as error:
        message = user_error_message(error)
        if message is None or _debug():
            raise
        argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        command = "unipair" + (f" {argv[0]}" if argv and not str(argv[0]).startswith("-") else "")
        print(f"{command}: error: {message} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli_main()
