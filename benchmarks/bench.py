"""Efficiency per PEFT mode: parameters, training-step and inference throughput, memory, FLOPs \
(``make bench``).

For each PEFT mode (prompt, bitfit, lora, full, frozen; the same mode on both encoders) with the
read-only predictor and the ``predict`` strategy, on synthetic batches of the demo's shape:

- trainable / total parameters of the whole system;
- times are measured with every configuration built in one process, interleaved round-robin (one
  step of each per round), so all see the same machine load (this CPU is shared); process CPU time
  per step is recorded next to wall time;
- training step = forward of both encoders + predictor + fusion + task loss + VICReg, backward,
  AdamW step (``UnipairSystem.compute_losses``, no Lightning logging): median seconds over
  ``--steps`` steps after ``--warmup`` steps, and samples/s;
- inference (``system(batch)`` in eval/inference mode): median seconds and samples/s;
- peak memory: CPU = peak RSS of a fresh process per mode (so peaks do not mix; it includes the
  Python/torch baseline, ``rss_after_build_mb`` is also kept), GPU = ``torch.cuda.max_memory_allocated``
  during training steps;
- FLOPs per sample counted with ``torch.utils.flop_counter.FlopCounterMode`` (one training step,
  forward + backward; one inference forward), the achieved FLOP/s and its fraction of the dense
  matmul rate measured between the timing rounds (median);
- the read-only predictor's overhead: ``prompt`` with ``predictor_length=0`` (``zero`` strategy, no
  VICReg) against the default, for both ``readonly_grad`` values (``through``, ``detach``);
- the prompt / full training-step time ratio, against the target of 0.67;
- a profile split of one training step per configuration by operator category (``torch.profiler``):
  attention, matmul, elementwise / normalisation, optimizer, other; on CPU the operators' self CPU
  time plus the host time outside any operator, on CUDA the kernel time per category plus idle /
  launch time (step wall time minus the kernels' time);
- AdamW implementations (for-loop, foreach, fused) timed side by side on each mode's parameters;
- with ``--compile-check``: ``torch.compile`` of both encoders against eager (graph breaks from
  ``torch._dynamo.explain``, compile time, step time, the cost over an epoch of ``--epoch-steps``).

On a GPU everything runs under bf16 autocast. Writes ``<out>/bench.json`` (``bench_paper.json``
with ``--paper``) with a header (date, machine, command) and prints a Markdown table (also written
next to the JSON as ``.md``).

Encoders: the demo's (``dinov2-s14`` + ``minilm-l6``, pretrained from the offline cache;
``--random-init`` builds the same architectures without weights, e.g. on a machine without the
cache), or with ``--paper`` timm ``vit_base_patch16_224`` + BERT-base built from a ``BertConfig``,
both random-initialised (speed does not depend on the weights).

Usage::

    python -m benchmarks.bench                      # demo encoders, CPU: batch 8, 112 px, 16 tokens
    python -m benchmarks.bench --paper
    python -m benchmarks.bench --random-init --device cuda --batch-size 64 --text-len 32
    TORCHINDUCTOR_COMPILE_THREADS=1 python -m benchmarks.bench --threads 1 --compile-check
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import benchutil as common
from lightning_modules.readonly_attention import READONLY_GRADS

PEFT_MODES = ("prompt", "bitfit", "lora", "full", "frozen")
DEFAULT_PREDICTOR_LENGTH = 8
PROMPT_FULL_TARGET = 0.67  # issue 12: prompt / full training-step time on CPU and GPU
# AdamW implementations; "default" is torch's own choice (foreach on CUDA, the for-loop on CPU).
ADAMW_IMPLEMENTATIONS: dict[str, dict[str, bool]] = {
    "default": {},
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
STEP_SCOPE = "bench: train step"  # torch.profiler scopes of the profile split
OPTIMIZER_SCOPE = "bench: optimizer step"
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0  # BERT-family special ids (MiniLM's and BERT-base's tokenizers)
WORD_IDS = (1996, 29000)  # range of ordinary word-piece ids in the BERT uncased vocabulary

# Encoder presets (``common.encoder_preset``): demo = offline.yaml, paper = paper.yaml, tiny = tiny.yaml.
ENCODER_PRESETS = ("demo", "paper", "tiny")


# ------------------------------------------------------------------------------ one configuration


def synthetic_batch(
    batch_size: int, image_size: int, text_len: int, device: torch.device, seed: int = 0
) -> dict:
    """A batch in the project's format with the demo's missing pattern (eta = 70 %, type both).

    About 30 % complete, 35 % text missing (empty text: [CLS][SEP] + padding), 35 % image missing
    (the all-ones filler); at least two complete samples so VICReg has statistics.
    """
    generator = torch.Generator().manual_seed(seed)
    n_complete = max(2, round(0.3 * batch_size))
    n_text_missing = (batch_size - n_complete) // 2
    codes = [0] * n_complete + [1] * n_text_missing + [2] * (batch_size - n_complete - n_text_missing)
    image = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    input_ids = torch.randint(*WORD_IDS, (batch_size, text_len), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = CLS_ID, SEP_ID
    attention_mask = torch.ones(batch_size, text_len, dtype=torch.long)
    for row, code in enumerate(codes):
        if code == 1:  # text missing: the tokenised empty string, padded
            input_ids[row] = PAD_ID
            input_ids[row, :2] = torch.tensor([CLS_ID, SEP_ID])
            attention_mask[row, 2:] = 0
        elif code == 2:
            image[row] = 1.0
    batch = {
        "image": image,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_present": torch.tensor([c != 2 for c in codes]),
        "text_present": torch.tensor([c != 1 for c in codes]),
        "label": torch.randint(0, 9, (batch_size,), generator=generator),
        "id": [f"synthetic-{i}" for i in range(batch_size)],
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_system(cfg: dict, workdir: Path):
    """The UnipairSystem of one configuration (random-initialised where ``cfg['pretrained']`` is False)."""
    from lightning_modules.encoders.sources import default_text_pooling
    from lightning_modules.system import UnipairSystem

    encoders = common.encoder_preset(cfg["encoders"])
    text_backbone = encoders["text_backbone"]
    text_pooling = default_text_pooling(text_backbone)
    if not cfg["pretrained"] and text_backbone in common.TEXT_CONFIGS:
        # The architecture without weights, tokenizer or hub access: a config folder.
        text_backbone = common.text_config_folder(text_backbone, workdir / text_backbone)
    return UnipairSystem(
        task="multiclass",
        num_classes=9,
        image_backbone=encoders["image_backbone"],
        text_backbone=text_backbone,
        pretrained=cfg["pretrained"],
        img_size=cfg["image_size"],
        image_peft=cfg["mode"],
        text_peft=cfg["mode"],
        predictor_length=cfg["predictor_length"],
        readonly_grad=cfg["readonly_grad"],
        missing_strategy=cfg["strategy"],
        text_pooling=text_pooling,
        prompt_length=encoders["prompt_length"],
        prompt_depth=encoders["prompt_depth"],
        predictor_hidden_dim=encoders["predictor_hidden_dim"],
        head_hidden_dim=encoders["head_hidden_dim"],
        lr=1e-3,
    )


def default_readonly_grad() -> str:
    """``UnipairSystem``'s default ``readonly_grad`` (the main rows measure what training uses)."""
    from lightning_modules.system import UnipairSystem

    return inspect.signature(UnipairSystem.__init__).parameters["readonly_grad"].default


def build_adamw(system, implementation: str = "default") -> torch.optim.AdamW:
    """AdamW over the system's parameter groups (``lightning_modules.optim``) with one implementation."""
    from lightning_modules.optim import parameter_groups

    groups = parameter_groups(system, lr=1e-3)
    return torch.optim.AdamW(groups, lr=1e-3, **ADAMW_IMPLEMENTATIONS[implementation])


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Workload:
    """One configuration built and ready: the system, its optimiser, a batch, and step functions."""

    def __init__(self, cfg: dict, workdir: Path) -> None:
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        self.cfg = cfg
        self.device = common.resolve_device(cfg["device"])
        self.autocast = common.autocast_for(self.device)
        torch.manual_seed(cfg.get("seed", 0))
        with common.quiet_warnings():
            self.system = build_system(cfg, workdir).to(self.device)
        self.batch = synthetic_batch(cfg["batch_size"], cfg["image_size"], cfg["text_len"], self.device)
        # The optimiser the system configures (AdamW over its parameter groups); the LR schedule is
        # irrelevant to speed and needs a Trainer, so it is left out.
        self.optimizer = build_adamw(self.system, cfg.get("adamw", "default"))

    def train_step(self, batch: dict | None = None) -> None:
        self.system.train()
        with self.autocast():
            losses, _ = self.system.compute_losses(self.batch if batch is None else batch)
        losses["loss"].backward()
        # Named so that the profile split can attribute the optimiser's operators (and its Python).
        with torch.profiler.record_function(OPTIMIZER_SCOPE):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def infer_step(self) -> None:
        self.system.eval()
        with torch.inference_mode(), self.autocast():
            self.system(self.batch)


def measure_static(cfg: dict) -> dict:
    """Parameters, FLOPs and peak memory of one configuration (run in a fresh process on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_modules.peft_modes import count_parameters

    device = common.resolve_device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="unipair-bench-") as workdir:
        work = Workload(cfg, Path(workdir))
    rss_after_build = _rss_mb() if device.type == "cpu" else None
    with FlopCounterMode(display=False) as counter:
        work.train_step()
    train_flops = counter.get_total_flops()
    work.train_step()  # the optimiser state exists from the first step: the second shows the steady peak
    train_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    with FlopCounterMode(display=False) as counter:
        work.infer_step()
    infer_flops = counter.get_total_flops()
    b = cfg["batch_size"]
    trainable, total = count_parameters(work.system, trainable_only=True), count_parameters(work.system)
    row = {
        "mode": cfg["mode"],
        "predictor_length": cfg["predictor_length"],
        "readonly_grad": cfg["readonly_grad"],
        "strategy": cfg["strategy"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "image_tokens": _image_tokens(work.system, cfg["image_size"]),
        "text_tokens": cfg["text_len"]
        + work.system.text_encoder.num_prompt_tokens
        + work.system.text_encoder.num_readonly_tokens,
        "train_flops_per_sample": train_flops / b,
        "infer_flops_per_sample": infer_flops / b,
    }
    if device.type == "cuda":
        row.update(memory_kind="cuda_max_allocated", peak_memory_mb=train_peak)
        del work
        torch.cuda.empty_cache()
    else:
        row.update(
            memory_kind="process_peak_rss", rss_after_build_mb=rss_after_build, peak_memory_mb=_peak_rss_mb()
        )
    return row


# --------------------------------------------------------------------------------- profile split


PROFILE_CATEGORIES = ("attention", "matmul", "elementwise_norm", "optimizer", "other")
# Operator names after _op_key (aten::native_layer_norm -> layernorm, AddmmBackward0 -> addmm, ...).
MATMUL_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "linear",
        "matmul",
        "addmv",
        "mv",
        "dot",
        "convolution",
        "conv2d",
        "mkldnnconvolution",
        "cudnnconvolution",
        "mkldnnlinear",
        "scaledmm",
    }
)
ELEMENTWISE_OPS = frozenset(
    {
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "lerp",
        "addcmul",
        "addcdiv",
        "sqrt",
        "rsqrt",
        "pow",
        "exp",
        "log",
        "log1p",
        "neg",
        "abs",
        "reciprocal",
        "sign",
        "square",
        "gelu",
        "relu",
        "silu",
        "tanh",
        "sigmoid",
        "threshold",
        "erf",
        "hardtanh",
        "layernorm",
        "groupnorm",
        "batchnorm",
        "softmax",
        "logsoftmax",
        "dropout",
        "bernoulli",
        "where",
        "clamp",
        "clampmin",
        "clampmax",
        "maximum",
        "minimum",
        "max",
        "min",
        "sum",
        "mean",
        "var",
        "std",
        "varmean",
        "norm",
        "linalgvectornorm",
        "mseloss",
        "nllloss",
        "crossentropyloss",
        "binarycrossentropywithlogits",
        "fill",
        "zero",
        "maskedfill",
        "lt",
        "gt",
        "le",
        "ge",
        "eq",
        "ne",
        "logicaland",
        "logicalor",
        "logicalnot",
        "cumsum",
    }
)


def _op_key(name: str) -> str:
    """The base operator of a profiler event's name, for the category tables.

    ``aten::native_layer_norm_backward`` -> ``layernorm``,
    ``autograd::engine::evaluate_function: AddmmBackward0`` -> ``addmm``.
    """
    name = name.rsplit(": ", 1)[-1].rsplit("::", 1)[-1]
    name = re.sub(r"Backward\d*$", "", name).lower().replace("_", "")
    name = re.sub(r"backward(data)?$", "", name)
    for prefix in ("foreach", "native", "fused"):
        name = name.removeprefix(prefix)
    return name


def op_category(event: Any) -> str:
    """The category of a profiler event, from its own name and its enclosing events' names.

    The optimizer and attention scopes take everything inside them (the math fallback of attention
    is matmuls and a softmax, still attention); otherwise the innermost matmul or elementwise name
    decides, so ``aten::empty`` inside a layer norm is normalisation and ``aten::t`` inside
    ``aten::linear`` is matmul.
    """
    chain = []
    while event is not None:
        chain.append(event.name)
        event = event.cpu_parent
    if any(n == OPTIMIZER_SCOPE or n.startswith(("Optimizer.step#", "Optimizer.zero_grad#")) for n in chain):
        return "optimizer"
    if any("attention" in n.lower() for n in chain):
        return "attention"
    for name in chain:
        key = _op_key(name)
        if key in MATMUL_OPS:
            return "matmul"
        if key in ELEMENTWISE_OPS:
            return "elementwise_norm"
    return "other"


def split_events(events: list, step_wall_s: float, device_time: bool) -> dict:
    """Seconds of one profiled training step per category (see :func:`op_category`).

    CPU (``device_time`` False): each operator's self CPU time; the self time of the step's own scope
    (Python between operators) is ``outside_operators``, so the parts add up to the step. CUDA: each
    operator's self device time (the kernels it launched), and ``idle_launch`` = wall time minus all
    kernel time (the device waiting for the host).
    """
    from torch.autograd import DeviceType

    seconds = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    outside = 0.0
    for event in events:
        if event.device_type != DeviceType.CPU:
            continue  # device-side records of kernels: counted through the operator that launched them
        if device_time:
            seconds[op_category(event)] += event.self_device_time_total / 1e6
        elif event.name == STEP_SCOPE and event.cpu_parent is None:
            outside += event.self_cpu_time_total / 1e6
        else:
            seconds[op_category(event)] += event.self_cpu_time_total / 1e6
    if device_time:
        seconds["idle_launch"] = step_wall_s - sum(seconds.values())
    else:
        seconds["outside_operators"] = outside
    split = {
        "clock": "cuda_kernel_time" if device_time else "cpu_self_time",
        "step_wall_s": step_wall_s,
        "seconds": seconds,
    }
    split["total_s"] = sum(seconds.values())
    split["fractions"] = {k: v / split["total_s"] for k, v in seconds.items()} if split["total_s"] > 0 else {}
    return split


def profile_split(work: Workload) -> dict:
    """Profile one training step of ``work`` and split it by operator category."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = work.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def step() -> None:
        with record_function(STEP_SCOPE):
            work.train_step()

    with profile(activities=activities) as prof:
        wall = common.timed(step, device)
    return split_events(list(prof.events()), wall, device_time=device.type == "cuda")


def measure_times(
    works: list[Workload], warmup: int, steps: int, infer_steps: int, with_profile: bool = True
) -> list[dict]:
    """Training-step and inference times of all configurations, interleaved in one process.

    Round-robin (one step of each configuration per round) so that every configuration sees the
    same machine load, which matters on a shared CPU. Wall time and process CPU time are recorded;
    the dense matmul rate is measured between rounds and its median reported. With ``with_profile``,
    one more training step of each is profiled and split by operator category.
    """
    device = works[0].device
    rates = [common.matmul_rate(device, seconds=0.5)["flops_per_s"]]
    for _ in range(warmup):
        for work in works:
            work.train_step()
            work.infer_step()
    train = [[] for _ in works]
    train_cpu = [[] for _ in works]
    infer = [[] for _ in works]
    for round_index in range(max(steps, infer_steps)):
        for i, work in enumerate(works):
            if round_index < steps:
                cpu = time.process_time()
                train[i].append(common.timed(work.train_step, device))
                train_cpu[i].append(time.process_time() - cpu)
            if round_index < infer_steps:
                infer[i].append(common.timed(work.infer_step, device))
        rates.append(common.matmul_rate(device, seconds=0.3)["flops_per_s"])
    out = []
    for i, work in enumerate(works):
        b = work.cfg["batch_size"]
        step_s, infer_s = common.median(train[i]), common.median(infer[i])
        out.append(
            {
                "train_step_s": step_s,
                "train_step_s_min": min(train[i]),
                "train_step_s_all": train[i],
                "train_step_cpu_s": common.median(train_cpu[i]),
                "train_samples_per_s": b / step_s,
                "infer_batch_s": infer_s,
                "infer_batch_s_all": infer[i],
                "infer_samples_per_s": b / infer_s,
            }
        )
        if with_profile:
            out[-1]["profile"] = profile_split(work)
    rate = common.median(rates)
    for row in out:
        row["matmul_flops_per_s"] = rate
    return out


def compare_adamw(
    work: Workload, rounds: int, implementations: tuple[str, ...] = ("forloop", "foreach", "fused")
) -> dict:
    """``optimizer.step()`` seconds of each AdamW implementation over ``work``'s parameters, interleaved.

    Fixed random gradients; every implementation steps the same parameters in turn (their values
    do not matter for speed). An implementation the device does not support is reported as such.
    """
    params = [p for p in work.system.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = (1e-3 * torch.randn(p.shape, generator=generator)).to(p.device, p.dtype)
    optimizers, unsupported = {}, {}
    for name in implementations:
        try:
            optimizers[name] = build_adamw(work.system, name)
            optimizers[name].step()  # creates the state; also where an unsupported device fails
        except (RuntimeError, ValueError) as error:
            unsupported[name] = str(error).splitlines()[0][:200]
            optimizers.pop(name, None)
    wall = {name: [] for name in optimizers}
    cpu = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            start = time.process_time()
            wall[name].append(common.timed(optimizer.step, work.device))
            cpu[name].append(time.process_time() - start)
    for p in params:
        p.grad = None
    result = {
        "mode": work.cfg["mode"],
        "trainable_params": sum(p.numel() for p in params),
        "step_s": {name: common.median(v) for name, v in wall.items()},
        "step_cpu_s": {name: common.median(v) for name, v in cpu.items()},
        "step_s_all": wall,
        "unsupported": unsupported,
    }
    if result["step_s"]:
        result["fastest"] = min(result["step_cpu_s"], key=result["step_cpu_s"].get)
    return result


def _explain(module, *inputs) -> dict:
    explanation = torch._dynamo.explain(module)(*inputs)
    return {
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "break_reasons": [str(r.reason).splitlines()[0][:200] for r in explanation.break_reasons],
    }


def measure_compile(
    cfg: dict, workdir: Path, steps: int, epoch_steps: int, backend: str = "inductor"
) -> dict:
    """``torch.compile`` of both encoders' forward against eager, same configuration, interleaved.

    Graph breaks come from ``torch._dynamo.explain`` on each encoder (training mode). The compile
    time is the first compiled training step minus the compiled steps' median; a batch with a new
    text length then shows the recompilation the varying padded lengths of real batches cause.
    Inference is not compiled here (eval and inference mode would compile their own graphs).
    ``backend`` is torch.compile's (``eager`` traces without generating code: for tests).
    """
    eager, compiled = Workload(cfg, workdir), Workload(cfg, workdir)
    system, batch = compiled.system.train(), compiled.batch
    explain = {
        "image_encoder": _explain(system.image_encoder, batch["image"]),
        "text_encoder": _explain(system.text_encoder, batch["input_ids"], batch["attention_mask"]),
    }
    torch._dynamo.reset()  # explain's traces must not stand in for the compiled ones
    system.image_encoder.compile(backend=backend)
    system.text_encoder.compile(backend=backend)
    device = compiled.device
    eager.train_step()
    first = common.timed(compiled.train_step, device)
    eager_s, compiled_s = [], []
    for _ in range(steps):
        eager_s.append(common.timed(eager.train_step, device))
        compiled_s.append(common.timed(compiled.train_step, device))
    other_length = synthetic_batch(cfg["batch_size"], cfg["image_size"], cfg["text_len"] + 3, device, seed=1)
    new_length = common.timed(lambda: compiled.train_step(other_length), device)
    eager_median, compiled_median = common.median(eager_s), common.median(compiled_s)
    compile_s = first - compiled_median
    result = {
        "mode": cfg["mode"],
        "backend": backend,
        "explain": explain,
        "first_compiled_step_s": first,
        "compile_s": compile_s,
        "eager_step_s": eager_median,
        "compiled_step_s": compiled_median,
        "eager_step_s_all": eager_s,
        "compiled_step_s_all": compiled_s,
        "compiled_vs_eager_step_ratio": compiled_median / eager_median,
        "new_text_length_step_s": new_length,
        "recompile_s": new_length - compiled_median,
        "epoch_steps": epoch_steps,
        "epoch_ratio_with_compile": (compile_s + epoch_steps * compiled_median)
        / (epoch_steps * eager_median),
    }
    saved = eager_median - compiled_median
    result["break_even_steps"] = compile_s / saved if saved > 0 else None
    return result


def finish_row(static: dict, times: dict) -> dict:
    row = {**static, **times}
    row["train_achieved_flops_per_s"] = row["train_flops_per_sample"] * row["train_samples_per_s"]
    row["infer_achieved_flops_per_s"] = row["infer_flops_per_sample"] * row["infer_samples_per_s"]
    row["train_fraction_of_matmul_rate"] = row["train_achieved_flops_per_s"] / row["matmul_flops_per_s"]
    row["infer_fraction_of_matmul_rate"] = row["infer_achieved_flops_per_s"] / row["matmul_flops_per_s"]
    return row


def _image_tokens(system, image_size: int) -> int:
    backbone = system.image_encoder.backbone
    patch = backbone.patch_embed.patch_size
    patches = (image_size // patch[0]) * (image_size // patch[1])
    return (
        patches
        + backbone.num_prefix_tokens
        + system.image_encoder.num_prompt_tokens
        + system.image_encoder.num_readonly_tokens
    )


# --------------------------------------------------------------------------------------- driver


def configurations(args: argparse.Namespace) -> list[dict]:
    common_cfg = {
        "encoders": args.encoders,
        "pretrained": args.encoders == "demo" and not args.random_init,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "infer_steps": args.infer_steps,
        "device": args.device,
        "threads": args.threads,
        "adamw": args.adamw,
    }
    grad = default_readonly_grad()
    configs = [
        {
            **common_cfg,
            "mode": mode,
            "predictor_length": DEFAULT_PREDICTOR_LENGTH,
            "strategy": "predict",
            "readonly_grad": grad,
        }
        for mode in args.modes
    ]
    if not args.no_predictor_overhead and "prompt" in args.modes:
        prompt = {**common_cfg, "mode": "prompt", "strategy": "predict"}
        configs += [
            {**prompt, "predictor_length": DEFAULT_PREDICTOR_LENGTH, "readonly_grad": other}
            for other in READONLY_GRADS
            if other != grad
        ]
        # Without read-only tokens readonly_grad changes nothing.
        configs.append({**prompt, "predictor_length": 0, "strategy": "zero", "readonly_grad": grad})
    return configs


def row_label(row: dict) -> str:
    if row["predictor_length"] == 0:
        return f"{row['mode']}, no predictor"
    return f"{row['mode']}, {row['readonly_grad']}"


def run_isolated(cfg: dict) -> dict:
    """Measure ``cfg`` in a fresh Python process (its peak RSS is then its own)."""
    command = [sys.executable, "-m", "benchmarks.bench", "--worker", json.dumps(cfg)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=common.ROOT)
    if result.returncode != 0:
        raise RuntimeError(
            f"bench worker for mode {cfg['mode']!r} (predictor_length={cfg['predictor_length']}) failed with "
            f"exit code {result.returncode}:\n{result.stderr[-3000:]}"
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"bench worker for mode {cfg['mode']!r} printed no result:\n{result.stdout[-2000:]}"
        )
    return json.loads(lines[-1])


def summarise(rows: list[dict], readonly_grad: str) -> dict:
    """Ratios between rows: prompt / full (and its target), the predictor's overhead per readonly_grad."""
    by_key = {(r["mode"], r["predictor_length"], r["readonly_grad"]): r for r in rows}
    summary: dict[str, Any] = {}
    prompt = by_key.get(("prompt", DEFAULT_PREDICTOR_LENGTH, readonly_grad))
    full = by_key.get(("full", DEFAULT_PREDICTOR_LENGTH, readonly_grad))
    if prompt:
        summary["prompt_trainable_fraction"] = prompt["trainable_fraction"]
    if prompt and full:
        ratio = prompt["train_step_s"] / full["train_step_s"]
        summary["prompt_vs_full_train_step_time_ratio"] = ratio
        summary["prompt_vs_full_train_step_cpu_time_ratio"] = (
            prompt["train_step_cpu_s"] / full["train_step_cpu_s"]
        )
        # The fastest of the repeated steps is the least disturbed by other load on a shared machine.
        summary["prompt_vs_full_train_step_min_time_ratio"] = (
            prompt["train_step_s_min"] / full["train_step_s_min"]
        )
        summary["prompt_vs_full_train_flops_ratio"] = (
            prompt["train_flops_per_sample"] / full["train_flops_per_sample"]
        )
        summary["prompt_vs_full_target"] = PROMPT_FULL_TARGET
        summary["prompt_vs_full_meets_target"] = ratio <= PROMPT_FULL_TARGET
    without = next((r for r in rows if r["mode"] == "prompt" and r["predictor_length"] == 0), None)
    overhead = {}
    for grad in READONLY_GRADS:
        with_predictor = by_key.get(("prompt", DEFAULT_PREDICTOR_LENGTH, grad))
        if not (with_predictor and without):
            continue
        overhead[grad] = {
            "train_step_time_ratio": with_predictor["train_step_s"] / without["train_step_s"],
            "train_step_min_time_ratio": with_predictor["train_step_s_min"] / without["train_step_s_min"],
            "train_step_cpu_time_ratio": with_predictor["train_step_cpu_s"] / without["train_step_cpu_s"],
            "infer_time_ratio": with_predictor["infer_batch_s"] / without["infer_batch_s"],
            "train_flops_ratio": with_predictor["train_flops_per_sample"] / without["train_flops_per_sample"],
            "extra_image_tokens": with_predictor["image_tokens"] - without["image_tokens"],
            "extra_text_tokens": with_predictor["text_tokens"] - without["text_tokens"],
            "extra_trainable_params": with_predictor["trainable_params"] - without["trainable_params"],
        }
    if overhead:
        summary["predictor_overhead"] = overhead
    return summary


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


PROFILE_CLOCKS = {
    "cpu_self_time": "CPU self time of the operators (main thread); outside operators = Python and "
    "framework time between them",
    "cuda_kernel_time": "CUDA kernel time of the operators that launched them; idle / launch = step wall "
    "time minus all kernel time",
}


def markdown_profile(rows: list[dict]) -> list[str]:
    profiled = [r for r in rows if "profile" in r]
    if not profiled:
        return []
    clock = profiled[0]["profile"]["clock"]
    last = "idle_launch" if clock == "cuda_kernel_time" else "outside_operators"
    columns = [*PROFILE_CATEGORIES, last]
    lines = [
        "",
        f"Profile split of one training step (torch.profiler; {PROFILE_CLOCKS[clock]}), % of the step:",
        "",
        "| configuration | profiled step (s) | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for r in profiled:
        split = r["profile"]
        lines.append(
            f"| {row_label(r)} | {split['step_wall_s']:.3f} | "
            + " | ".join(f"{100 * split['fractions'].get(c, 0.0):.1f}" for c in columns)
            + " |"
        )
    return lines


def markdown_adamw(comparisons: list[dict]) -> list[str]:
    if not comparisons:
        return []
    lines = [
        "",
        "AdamW `optimizer.step()` by implementation, interleaved (median wall s / process CPU s):",
        "",
        "| mode | trainable params | for-loop | foreach | fused | fastest (CPU time) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in comparisons:
        cells = [
            f"{c['step_s'][name]:.4f} / {c['step_cpu_s'][name]:.4f}"
            if name in c["step_s"]
            else f"unsupported: {c['unsupported'].get(name, 'not run')[:60]}"
            for name in ("forloop", "foreach", "fused")
        ]
        fastest = c.get("fastest", "-")
        lines.append(f"| {c['mode']} | {_si(c['trainable_params'])} | {' | '.join(cells)} | {fastest} |")
    return lines


def markdown_compile(result: dict | None) -> list[str]:
    if not result:
        return []
    if "error" in result:
        return ["", f"torch.compile check failed: {result['error'][:300]}"]
    breaks = "; ".join(
        f"{name}: {e['graphs']} graph(s), {e['graph_breaks']} break(s)"
        + (f" ({' / '.join(e['break_reasons'])})" if e["break_reasons"] else "")
        for name, e in result["explain"].items()
    )
    even = result["break_even_steps"]
    return [
        "",
        f"torch.compile of both encoders ({result['mode']} mode, training step, interleaved with eager): "
        f"eager {result['eager_step_s']:.3f} s, compiled {result['compiled_step_s']:.3f} s per step "
        f"(x{result['compiled_vs_eager_step_ratio']:.2f}); compile time {result['compile_s']:.0f} s, a new "
        f"text length recompiles in {result['recompile_s']:.0f} s; over an epoch of {result['epoch_steps']} "
        f"steps with one compile: x{result['epoch_ratio_with_compile']:.2f} the eager time"
        + (f", break-even after {even:.0f} steps." if even is not None else " (never breaks even).")
        + f" Graphs: {breaks}.",
    ]


def markdown(document: dict) -> str:
    s = document["settings"]
    header = document["header"]
    machine = header["machine"]
    where = machine.get("gpu") or (
        f"{machine['cpu']} ({machine['cpu_count']} cores, {s.get('threads', machine['torch_threads'])} "
        "torch threads)"
    )
    memory_column = "train peak alloc (MiB)" if s["device_type"] == "cuda" else "peak RSS (MiB)"
    load = machine.get("load_average")
    lines = [
        f"Bench: {s['image_backbone']} + {s['text_arch']} "
        f"({'pretrained' if s['pretrained'] else 'random init'}), batch {s['batch_size']}, {s['image_size']} "
        f"px, {s['text_len']} text tokens, {'bf16 autocast' if s['device_type'] == 'cuda' else 'fp32'}, "
        f"AdamW {s.get('adamw', 'default')}; {where}; {header['date']}; median of {s['steps']} steps after "
        f"{s['warmup']} warm-up, configurations interleaved. "
        f"Matmul rate measured in the run: {_si(document['matmul_flops_per_s'])}FLOP/s"
        + (f"; load average at the start {load[0]:.1f}." if load else "."),
        "",
        f"Command: `{header['command']}`",
        "",
        "| configuration | pred. tokens | trainable / total params | trainable % | train step (s) | "
        "train step CPU (s) | "
        f"train samples/s | infer samples/s | {memory_column} | train GFLOP/sample | achieved FLOP/s | % of "
        "matmul rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in document["rows"]:
        if "error" in r:
            lines.append(f"| {row_label(r)} | {r['predictor_length']} | failed: {r['error'][:80]} |")
            continue
        memory = r["peak_memory_mb"]
        lines.append(
            f"| {row_label(r)} | {r['predictor_length']} | "
            f"{_si(r['trainable_params'])} / {_si(r['total_params'])} | "
            f"{100 * r['trainable_fraction']:.2f} | {r['train_step_s']:.3f} | {r['train_step_cpu_s']:.3f} | "
            f"{r['train_samples_per_s']:.1f} | "
            f"{r['infer_samples_per_s']:.1f} | {memory:.0f} | {r['train_flops_per_sample'] / 1e9:.2f} | "
            f"{_si(r['train_achieved_flops_per_s'])} | {100 * r['train_fraction_of_matmul_rate']:.1f} |"
        )
    summary = document["summary"]
    lines.append("")
    if "prompt_vs_full_train_step_time_ratio" in summary:
        met = "met" if summary["prompt_vs_full_meets_target"] else "not met"
        lines.append(
            "**prompt / full training-step time: "
            f"{summary['prompt_vs_full_train_step_time_ratio']:.2f}** (medians; "
            f"target <= {summary['prompt_vs_full_target']:.2f}: {met}), "
            f"{summary['prompt_vs_full_train_step_min_time_ratio']:.2f} (fastest steps), "
            f"{summary['prompt_vs_full_train_step_cpu_time_ratio']:.2f} (process CPU time) "
            f"(FLOPs ratio {summary['prompt_vs_full_train_flops_ratio']:.2f}); prompt trains "
            f"{100 * summary['prompt_trainable_fraction']:.2f} % of the parameters."
        )
    for grad, p in summary.get("predictor_overhead", {}).items():
        lines.append("")
        lines.append(
            f"Read-only predictor, readonly_grad={grad} (+{p['extra_image_tokens']} image / "
            f"+{p['extra_text_tokens']} text tokens, +{p['extra_trainable_params']:,} trainable params) "
            "costs "
            f"x{p['train_step_time_ratio']:.2f} training-step time (x{p['train_step_min_time_ratio']:.2f} "
            f"fastest steps, x{p['train_step_cpu_time_ratio']:.2f} process CPU time), "
            f"x{p['infer_time_ratio']:.2f} inference time, x{p['train_flops_ratio']:.2f} training FLOPs "
            "(prompt mode, predict vs zero strategy without predictor)."
        )
    lines += markdown_profile(document["rows"])
    lines += markdown_adamw(document.get("adamw", []))
    lines += markdown_compile(document.get("compile"))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paper", action="store_true", help="ViT-B/16 + BERT-base (random init): same as --encoders paper"
    )
    parser.add_argument(
        "--encoders",
        choices=ENCODER_PRESETS,
        default="demo",
        help="demo: dinov2-s14 + minilm-l6; paper: ViT-B/16 + BERT-base; tiny: test_vit + tiny-bert (tests)",
    )
    parser.add_argument(
        "--random-init", action="store_true", help="demo encoder architectures without their weights"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--modes", nargs="+", default=list(PEFT_MODES), choices=PEFT_MODES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--image-size", type=int, default=112, help="image side in pixels (emoji PNGs are 64 px)"
    )
    parser.add_argument(
        "--text-len", type=int, default=16, help="text tokens per sample, [CLS] and [SEP] included"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (the median is reported)")
    parser.add_argument("--infer-steps", type=int, default=5, help="timed inference batches")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default); on a busy shared CPU one thread avoids waiting for a "
        "descheduled second one at every operator",
    )
    parser.add_argument(
        "--no-predictor-overhead",
        action="store_true",
        help="skip the overhead runs (prompt with the other readonly_grad, prompt with predictor_length=0)",
    )
    parser.add_argument(
        "--adamw",
        choices=sorted(ADAMW_IMPLEMENTATIONS),
        default="default",
        help="AdamW implementation of the timed steps (default: torch's choice)",
    )
    parser.add_argument(
        "--adamw-compare",
        nargs="*",
        default=["prompt", "full"],
        choices=PEFT_MODES,
        help="modes whose optimizer step is timed with each AdamW implementation (none: skip)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profile split of one step per configuration"
    )
    parser.add_argument(
        "--compile-check",
        action="store_true",
        help="also time torch.compile of both encoders against eager (first mode; minutes on a CPU)",
    )
    parser.add_argument(
        "--epoch-steps",
        type=int,
        default=42,
        help="steps per epoch over which --compile-check amortises the compile time (emoji demo: 42)",
    )
    parser.add_argument(
        "--isolation",
        choices=("auto", "subprocess", "inprocess"),
        default="auto",
        help="one fresh process per mode (auto: on CPU, where peak RSS needs it) or all in this one",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output JSON (default runs/bench/bench.json, bench_paper.json with --paper)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paper:
        args.encoders = "paper"
    for name in ("batch_size", "image_size", "text_len", "steps", "infer_steps", "epoch_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.text_len < 2:
        parser.error("--text-len must be >= 2 ([CLS] and [SEP])")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure_static(json.loads(args.worker))))
        return {}
    device = common.resolve_device(args.device)
    args.device = str(device)
    isolation = (
        args.isolation
        if args.isolation != "auto"
        else ("subprocess" if device.type == "cpu" else "inprocess")
    )
    header = common.run_header(device)
    started = time.perf_counter()
    cfgs = configurations(args)
    statics = []
    failed = False
    for cfg in cfgs:
        label = f"{cfg['mode']} (predictor_length={cfg['predictor_length']})"
        print(f"bench: {label}: parameters, FLOPs, peak memory ...", file=sys.stderr, flush=True)
        try:
            statics.append(run_isolated(cfg) if isolation == "subprocess" else measure_static(cfg))
        except Exception as error:  # report every mode; a failed one is named in the table and the exit code
            failed = True
            print(f"bench: {label} failed: {error}", file=sys.stderr)
            statics.append(
                {
                    "mode": cfg["mode"],
                    "predictor_length": cfg["predictor_length"],
                    "readonly_grad": cfg["readonly_grad"],
                    "error": str(error),
                }
            )
    timed_cfgs = [cfg for cfg, st in zip(cfgs, statics, strict=True) if "error" not in st]
    print(
        f"bench: timing {len(timed_cfgs)} configurations interleaved ({args.warmup} warm-up + {args.steps} "
        "rounds) ...",
        file=sys.stderr,
        flush=True,
    )
    grad = default_readonly_grad()
    with tempfile.TemporaryDirectory(prefix="unipair-bench-") as workdir:
        works = [Workload(cfg, Path(workdir)) for cfg in timed_cfgs]
        with_profile = not args.no_profile
        timed = measure_times(works, args.warmup, args.steps, args.infer_steps, with_profile) if works else []
        times = iter(timed)
        rows = [st if "error" in st else finish_row(st, next(times)) for st in statics]
        main_rows = {
            w.cfg["mode"]: w
            for w in works
            if w.cfg["readonly_grad"] == grad and w.cfg["predictor_length"] == DEFAULT_PREDICTOR_LENGTH
        }
        adamw = []
        for mode in args.adamw_compare:
            if mode in main_rows:
                print(f"bench: AdamW implementations on {mode} ...", file=sys.stderr, flush=True)
                adamw.append(compare_adamw(main_rows[mode], rounds=max(3, args.steps)))
        del works, main_rows  # free the models before the compile check builds its own
        compiled = None
        if args.compile_check and timed_cfgs:
            print(f"bench: torch.compile check ({timed_cfgs[0]['mode']}) ...", file=sys.stderr, flush=True)
            try:
                compiled = measure_compile(timed_cfgs[0], Path(workdir), args.steps, args.epoch_steps)
            except Exception as error:  # a compiler failure is a result to report, not a crash of the bench
                compiled = {"mode": timed_cfgs[0]["mode"], "error": f"{type(error).__name__}: {error}"}
    good = [r for r in rows if "error" not in r]
    encoders = common.encoder_preset(args.encoders)
    document = {
        "format_version": 1,
        "header": header,
        "settings": {
            "image_backbone": encoders["image_backbone"],
            "text_arch": encoders["text_backbone"],
            "encoders": args.encoders,
            "pretrained": args.encoders == "demo" and not args.random_init,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "text_len": args.text_len,
            "warmup": args.warmup,
            "steps": args.steps,
            "infer_steps": args.infer_steps,
            "device_type": device.type,
            "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
            "isolation": isolation,
            "threads": args.threads or torch.get_num_threads(),
            "predictor_length": DEFAULT_PREDICTOR_LENGTH,
            "readonly_grad": grad,
            "strategy": "predict",
            "adamw": args.adamw,
        },
        "matmul_flops_per_s": common.median([r["matmul_flops_per_s"] for r in good]) if good else None,
        "rows": rows,
        "summary": summarise(good, grad),
        "adamw": adamw,
        "compile": compiled,
        "wall_s": time.perf_counter() - started,
    }
    out = (
        Path(args.out)
        if args.out
        else common.ROOT
        / "runs"
        / "bench"
        / ("bench.json" if args.encoders == "demo" else f"bench_{args.encoders}.json")
    )
    common.write_json(out, document)
    table = markdown(document)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(f"bench: wrote {out} ({document['wall_s']:.0f} s)", file=sys.stderr)
    if failed:
        raise SystemExit(1)
    return document


if __name__ == "__main__":
    main()
