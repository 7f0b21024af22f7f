"""The shipped configs: each group's files set only that group's options, no file restates a code
default, the groups compose in any order, and every documented command parses.

"Parses" means ``cli.make_cli(..., run=False)`` with ``--print_config`` (the whole parse and
validation, nothing built: the paper's encoders would be downloaded, the GPU trainers need GPUs);
the strategy and PEFT files are also built into a model with the tiny encoders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import math
import re
import shlex
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml

import cli
from datamodules.missing import MissingSetting
from lightning_modules.system import UnipairSystem
from tests.fixtures_data import make_hateful_memes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The groups in the documented composition order (configs/README.md): a file may reset a value that
# a file of an earlier group sets only in the last two groups.
ORDER = [
    "data",
    "model/encoders",
    "model/strategy",
    "model/peft",
    "missing",
    "trainer",
    "experiment",
    "debug",
]
FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))

# The concern of each UnipairSystem option, i.e. which group may set it. A new option has to be
# placed here (test_every_model_option_has_one_concern).
MODEL_OPTIONS = {
    "model/encoders": {
        "image_backbone",
        "text_backbone",
        "pretrained",
        "backbone_init_seed",
        "img_size",
        "image_pooling",
        "text_pooling",
        "prompt_length",
        "prompt_depth",
        "predictor_hidden_dim",
        "head_hidden_dim",
    },
    "model/strategy": {
        "missing_strategy",
        "predictor_length",
        "pred_loss_weight",
        "vicreg_inv_coeff",
        "vicreg_var_coeff",
        "vicreg_cov_coeff",
        "stop_grad_target",
        "substitution",
        "readonly_grad",
        "vicreg_space",
    },
    "model/peft": {"image_peft", "text_peft", "lora_rank", "lora_alpha", "lora_dropout", "lr", "head_lr"},
    # linked from the data (task, num_classes) or set by experiment files and the command line
    "training": {
        "task",
        "num_classes",
        "weight_decay",
        "warmup_fraction",
        "lr_schedule",
        "head_dropout",
        "multilabel_threshold",
        "nonfinite_policy",
    },
}
# Options that name a file's choice: kept where they equal the default, so that the file says what it
# selects and a later file of its group replaces the choice.
CHOICE_OPTIONS = {"image_backbone", "text_backbone", "missing_strategy", "image_peft", "text_peft"}
# What makes the method the method or a baseline: never changed by an experiment file.
EXPERIMENT_FORBIDDEN = CHOICE_OPTIONS | {"pretrained", "predictor_length"}
TRAINER_HARDWARE = {
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "plugins",
    "sync_batchnorm",
    "use_distributed_sampler",
    "log_every_n_steps",
}
MISSING_OPTIONS = {"train_missing", "val_missing", "test_missing"}


def group_of(name: str) -> str:
    return name.rsplit("/", 1)[0]


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys -> values; a missing setting (``train_missing: {...}``) is one value."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in MISSING_OPTIONS:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load(name: str) -> dict[str, object]:
    return flatten(yaml.safe_load((CONFIGS / name).read_text()) or {})


def may_set(group: str, key: str) -> bool:
    parts = key.split(".")
    option = parts[-1]
    if key == "config":  # a nested config file (debug/tiny.yaml includes the tiny encoders)
        return group == "debug"
    if group in MODEL_OPTIONS:
        return key == "model.class_path" or (
            key.startswith("model.init_args.") and option in MODEL_OPTIONS[group]
        )
    if group == "missing":
        return parts[:2] == ["data", "init_args"] and option in MISSING_OPTIONS
    if group == "trainer":
        return parts[0] == "trainer" and parts[1] in TRAINER_HARDWARE
    if group == "data":
        return parts[0] == "data" and option not in MISSING_OPTIONS
    model_option = key.startswith("model.init_args.")
    if group == "experiment":
        return (
            not (model_option and option in EXPERIMENT_FORBIDDEN)
            and not (parts[0] == "data" and option in MISSING_OPTIONS)
            and not (parts[0] == "trainer" and parts[1] in TRAINER_HARDWARE)
        )
    if group == "debug":  # composes with any strategy, PEFT or missing file, in any order
        other_groups = MODEL_OPTIONS["model/strategy"] | MODEL_OPTIONS["model/peft"]
        return not (model_option and option in other_groups) and option not in MISSING_OPTIONS
    return False


def test_every_config_file_is_in_a_group():
    outside = [name for name in FILES if group_of(name) not in ORDER]
    assert not outside, f"config files outside the groups {ORDER}: {outside}"
    for group in ORDER:
        assert any(group_of(name) == group for name in FILES), f"no config file in {group}/"


def test_every_model_option_has_one_concern():
    options = set(inspect.signature(UnipairSystem.__init__).parameters) - {"self"}
    placed = [option for concern in MODEL_OPTIONS.values() for option in concern]
    assert len(placed) == len(set(placed)), "an option is placed in two concerns"
    assert set(placed) == options, (
        f"UnipairSystem options without a concern: {sorted(options - set(placed))}; "
        f"placed but not options: {sorted(set(placed) - options)}"
    )


@pytest.mark.parametrize("name", FILES)
def test_each_file_sets_only_its_groups_options(name):
    group = group_of(name)
    foreign = [key for key in load(name) if not may_set(group, key)]
    assert not foreign, f"configs/{name} ({group} group) sets options of another concern: {foreign}"


# ------------------------------------------------------------------------------------ code defaults


def _signature_defaults(cls) -> dict[str, object]:
    """Defaults of ``cls.__init__``, with those its bases take through ``**kwargs``."""
    defaults: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            defaults.update(
                (name, p.default)
                for name, p in inspect.signature(klass.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty
            )
    return defaults


def _same(value, default) -> bool:
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def cli_defaults() -> dict[str, object]:
    """The parser's own defaults of the trainer and the seed (with the CLI's trainer defaults)."""
    printed = _print_config(
        [
            "--config",
            str(CONFIGS / "data" / "hateful_memes.yaml"),
            "--config",
            str(CONFIGS / "model" / "encoders" / "tiny.yaml"),
        ]
    )
    return {
        key: value
        for key, value in flatten(printed).items()
        if key.split(".")[0] in ("trainer", "seed_everything")
    }


def restated_defaults(name: str, cli_defaults: dict[str, object]) -> list[str]:
    """Options of ``name`` set to their code default (see test_no_file_restates_a_code_default)."""
    group, values = group_of(name), load(name)
    data_class = values.get("data.class_path")
    data_defaults = _signature_defaults(_import(data_class) if data_class else cli.MissingModalityDataModule)
    model_defaults = _signature_defaults(UnipairSystem)
    missing_defaults = {f.name: f.default for f in dataclasses.fields(MissingSetting)}
    earlier = [other for other in FILES if ORDER.index(group_of(other)) < ORDER.index(group)]
    restated = []
    for key, value in values.items():
        option = key.rsplit(".", 1)[-1]
        if key == "config" or option == "class_path":
            continue
        if option in MISSING_OPTIONS:  # the rate is what a setting is; its other keys only when not default
            restated += [
                f"{key}.{k}"
                for k, v in value.items()
                if k != "missing_rate" and _same(v, missing_defaults[k])
            ]
            continue
        if key.startswith("model.init_args."):
            default = model_defaults.get(option, inspect.Parameter.empty)
        elif key.startswith("data.init_args."):
            default = data_defaults.get(option, inspect.Parameter.empty)
        else:
            default = cli_defaults.get(key, inspect.Parameter.empty)
        if not _same(value, default) or option in CHOICE_OPTIONS:
            continue
        resets = group in ("experiment", "debug") and any(
            key in load(other) and not _same(load(other)[key], value) for other in earlier
        )
        if not resets:
            restated.append(f"{key}: {value!r}")
    return restated


# The data files belong to the DataModules' owners and still spell out some defaults (seeds, batch size).
@pytest.mark.parametrize("name", [name for name in FILES if group_of(name) != "data"])
def test_no_file_restates_a_code_default(name, cli_defaults):
    restated = restated_defaults(name, cli_defaults)
    assert not restated, (
        f"configs/{name} restates code defaults (they would not follow a change of the default): {restated}"
    )


def test_the_default_check_can_fail(cli_defaults, tmp_path, monkeypatch):
    """Control: an encoders file spelling out the default prompt length is caught."""
    (tmp_path / "model" / "encoders").mkdir(parents=True)
    (tmp_path / "model" / "encoders" / "x.yaml").write_text("model:\n  init_args:\n    prompt_length: 16\n")
    monkeypatch.setattr(sys.modules[__name__], "CONFIGS", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "FILES", ["model/encoders/x.yaml"])
    assert restated_defaults("model/encoders/x.yaml", cli_defaults) == ["model.init_args.prompt_length: 16"]


# ------------------------------------------------------------------------------------------ parsing


def _print_config(args: list[str]) -> dict:
    """``make_cli(args + --print_config, run=False)``: the resolved config, nothing built."""
    out = io.StringIO()
    with patch.object(sys, "argv", ["unipair", *args]), contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit) as exit_info:
            cli.make_cli([*args, "--print_config"], run=False)
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


def _config_args(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(CONFIGS / name))]


def test_groups_compose_in_any_order():
    """zero after offline and offline after zero: the same model (no predictor) -- the old
    model/offline.yaml set predictor_length 8 and so trained `zero` with a predictor when it came last."""
    names = ["model/encoders/offline.yaml", "model/strategy/zero.yaml", "model/peft/full.yaml"]
    forward = _print_config(_config_args("data/emoji.yaml", *names))["model"]["init_args"]
    backward = _print_config(_config_args("data/emoji.yaml", *reversed(names)))["model"]["init_args"]
    assert forward == backward
    assert (forward["missing_strategy"], forward["predictor_length"], forward["image_peft"]) == (
        "zero",
        0,
        "full",
    )
    assert (forward["image_backbone"], forward["img_size"], forward["lr"]) == ("dinov2-s14", 112, 2e-5)


def documented_commands() -> list[tuple[str, list[str]]]:
    """``unipair <subcommand> --config configs/...`` commands of the READMEs and the config comments."""
    sources = [REPO / "README.md", CONFIGS / "README.md", *sorted(CONFIGS.rglob("*.yaml"))]
    commands = []
    for source in sources:
        text = source.read_text()
        if source.suffix == ".yaml":
            text = "\n".join(re.sub(r"^#\s?", "", line) for line in text.splitlines() if line.startswith("#"))
        for match in re.finditer(r"unipair (?:fit|validate|test) (.*)", text.replace("\\\n", " ")):
            command = match.group(1)
            if "--config configs/" in command and not any(mark in command for mark in ("...", "$", "<")):
                commands.append((source.relative_to(REPO).as_posix(), shlex.split(command, comments=True)))
    return commands


COMMANDS = documented_commands()


def test_the_documented_commands_are_found():
    assert len(COMMANDS) >= 9  # README: 2, configs/README.md: 3, experiment/: 4


@pytest.mark.parametrize(
    "source, args", COMMANDS, ids=[f"{source}:{i}" for i, (source, _) in enumerate(COMMANDS)]
)
def test_documented_command_parses(source, args):
    paths = [args[i + 1] for i, arg in enumerate(args) if arg == "--config"]
    missing = [path for path in paths if not (REPO / path).is_file()]
    assert not missing, f"{source} documents a command with config files that do not exist: {missing}"
    printed = flatten(_print_config([str(REPO / arg) if arg in paths else arg for arg in args]))
    on_command_line = {arg[2:].replace(".init_args.", ".") for arg in args if arg.startswith("--")}
    for position, path in enumerate(paths):  # each file's values reach the resolved config, unless overridden
        later = {
            key for p in paths[position + 1 :] for key in load(Path(p).relative_to("configs").as_posix())
        }
        for key, value in load(Path(path).relative_to("configs").as_posix()).items():
            if key in later or key.replace(".init_args.", ".") in on_command_line or key == "config":
                continue
            resolved = printed.get(key)
            if key.rsplit(".", 1)[-1] in MISSING_OPTIONS:
                value, resolved = (
                    MissingSetting.from_config(value, key),
                    MissingSetting.from_config(resolved, key),
                )
            assert resolved == value, f"{source}: {path} sets {key}: {value!r}, resolved {resolved!r}"


# Every strategy and PEFT file, each with one of the missing files, built with the tiny encoders.
_MISSING_FILES = [n for n in FILES if group_of(n) == "missing"]
BUILDS = [
    (name, _MISSING_FILES[i % len(_MISSING_FILES)])
    for i, name in enumerate(n for n in FILES if group_of(n) in ("model/strategy", "model/peft"))
]


@pytest.mark.parametrize("name, missing", BUILDS)
def test_strategy_and_peft_files_build_the_model(name, missing, tmp_path):
    root = make_hateful_memes(tmp_path)
    args = [
        *_config_args("data/hateful_memes.yaml", "debug/tiny.yaml", name, missing),
        "--data.root",
        str(root),
        "--data.missing_table_dir",
        str(tmp_path / "tables"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    with patch.object(sys, "argv", ["unipair", *args]):
        built = cli.make_cli(args, run=False)
    for key, value in load(name).items():
        if key.startswith("model.init_args."):
            assert built.model.hparams[key.rsplit(".", 1)[-1]] == value, key
    for key, value in load(missing).items():
        setting = built.datamodule.missing[key.rsplit(".", 1)[-1].removesuffix("_missing")]
        assert setting == MissingSetting.from_config(value, key)
    assert built.datamodule.missing["val"] == built.datamodule.missing["test"]
    assert (built.model.hparams.image_backbone, built.trainer.max_epochs) == ("test_vit", 1)
    has_predictor = built.model.hparams.predictor_length > 0
    assert has_predictor == (built.model.hparams.missing_strategy == "predict")


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_down(tmp_path):
    root = make_hateful_memes(tmp_path)
    args = [
        "fit",
        *_config_args(
            "data/hateful_memes.yaml", "debug/tiny.yaml", "model/strategy/zero.yaml", "debug/overfit.yaml"
        ),
        "--data.root",
        str(root),
        "--data.missing_table_dir",
        str(tmp_path / "tables"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    with patch.object(sys, "argv", ["unipair", *args]):
        fitted = cli.make_cli(args)
    metrics = fitted.trainer.callback_metrics
    assert fitted.trainer.current_epoch == 40 and float(metrics["train/accuracy"]) == 1.0
    assert float(metrics["train/task_loss"]) < 0.5 * math.log(2)  # chance level of the binary task: log 2
