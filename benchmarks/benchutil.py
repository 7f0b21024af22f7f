"""Helpers shared by the benchmark scripts: run header, device, autocast, timing, encoder presets.

Kept free of side effects at import (no torch threads set, nothing created) so every script and the
tests can import it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# Architectures of the text encoders as plain BertConfig keyword arguments, so they can be built
# randomly initialised without their weights, tokenizer or the package that ships them.
MINILM_L6_CONFIG = {  # sentence-transformers/all-MiniLM-L6-v2 (the built-in "minilm-l6")
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
BERT_BASE_CONFIG = {  # bert-base-uncased
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
# Keyed by the text backbone names of the encoder presets.
TEXT_CONFIGS = {"minilm-l6": MINILM_L6_CONFIG, "bert-base-uncased": BERT_BASE_CONFIG}


ENCODER_PRESET_FILES = {"demo": "offline", "paper": "paper", "tiny": "tiny"}
PRESET_KEYS = (
    "image_backbone",
    "text_backbone",
    "pretrained",
    "prompt_length",
    "prompt_depth",
    "predictor_length",
    "predictor_hidden_dim",
    "head_hidden_dim",
)


def encoder_preset(name: str) -> dict[str, Any]:
    """The encoders and sizes of preset ``name`` (ENCODER_PRESET_FILES), as ``UnipairSystem`` takes them.

    Read from ``configs/model/encoders/<file>.yaml``, the files users compose, with what a file leaves
    out taken from ``UnipairSystem``'s defaults, so a benchmark trains what the configs train. The
    image size is not part of it: every benchmark sets its own.
    """
    import inspect

    import yaml

    from lightning_modules.system import UnipairSystem

    if name not in ENCODER_PRESET_FILES:
        raise ValueError(f"unknown encoder preset {name!r}; expected one of {sorted(ENCODER_PRESET_FILES)}")
    path = ROOT / "configs" / "model" / "encoders" / f"{ENCODER_PRESET_FILES[name]}.yaml"
    init_args = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["init_args"]
    defaults = inspect.signature(UnipairSystem.__init__).parameters
    return {key: init_args.get(key, defaults[key].default) for key in PRESET_KEYS}


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; otherwise ``torch.device(name)`` (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on GPU, nothing on CPU (CPU runs the fp32 model as the demo does)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()`` (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def text_config_folder(kind: str, folder: Path) -> str:
    """Write ``config.json`` of text architecture ``kind`` (a key of TEXT_CONFIGS) to ``folder``; return it.

    ``sources.create_text_backbone(folder, pretrained=False)`` then builds the architecture randomly
    initialised, with no weights, tokenizer or network.
    """
    from transformers import BertConfig

    if kind not in TEXT_CONFIGS:
        raise ValueError(f"unknown text architecture {kind!r}; expected one of {list(TEXT_CONFIGS)}")
    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(**TEXT_CONFIGS[kind]).save_pretrained(folder)
    return str(folder)


def matmul_rate(device: torch.device, seconds: float = 1.0) -> dict[str, Any]:
    """Dense matmul FLOP/s of this machine now: square ``n x n`` products, median over repeats.

    fp32 on CPU (the dtype the CPU runs use), bf16 on GPU (the autocast dtype). ``n`` is large enough
    to be compute-bound (1024 on CPU, 8192 on GPU).
    """
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        times.append(timed(lambda: a @ b, device))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2 * n**3 / median(times)}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(ImportError):
        import timm

        info["timm"] = timm.__version__
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """This process's command as typed: ``python -m benchmarks.x ...`` for a module run."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *program, *sys.argv[1:]])


def run_header(device: torch.device) -> dict[str, Any]:
    """Machine, date and command of this run (the header of every JSON the benchmarks write)."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": machine_info(device),
    }


def write_json(path: Path, document: dict) -> None:
    """Write atomically (a half-written JSON never replaces a good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence library warnings that would bury the benchmark output (not errors)."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("lightning").level
        logging.getLogger("lightning").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("lightning").setLevel(level)
