"""Efficiency per PEFT mode: parameters, training-step and inference throughput, memory, FLOPs (``make bench``).

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
  VICReg) against the default.

On a GPU everything runs under bf16 autocast. Writes ``<out>/bench.json`` (``bench_paper.json``
with ``--paper``) with a header (date, machine, command) and prints a Markdown table (also written
next to the JSON as ``.md``).

Encoders: the demo's (``dinov2-s14`` + ``minilm-l6``, pretrained from the offline cache;
``--random-init`` builds the same architectures without weights, e.g. on a machine without the
cache), or with ``--paper`` timm ``vit_base_patch16_224`` + BERT-base built from a ``BertConfig``,
both random-initialised (speed does not depend on the weights).

Usage::

    python benchmarks/bench.py                      # demo encoders, CPU: batch 8, 112 px, 16 tokens
    python benchmarks/bench.py --paper
    python benchmarks/bench.py --random-init --device cuda --batch-size 64 --text-len 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as common  # noqa: E402  (puts the project root on sys.path)
import torch  # noqa: E402

PEFT_MODES = ("prompt", "bitfit", "lora", "full", "frozen")
DEFAULT_PREDICTOR_LENGTH = 8
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0  # BERT-family special ids (MiniLM's and BERT-base's tokenizers)
WORD_IDS = (1996, 29000)  # range of ordinary word-piece ids in the BERT uncased vocabulary

ENCODER_SETS: dict[str, dict[str, Any]] = {
    "demo": {
        "image_backbone": "dinov2-s14", "text_backbone": "minilm-l6", "text_arch": "minilm-l6",
        "text_pooling": "mean", "hidden_dim": 256,
    },
    "paper": {
        "image_backbone": "vit_base_patch16_224", "text_backbone": None, "text_arch": "bert-base",
        "text_pooling": "cls", "hidden_dim": 768,
    },
    # For the smoke tests: timm's tiny test ViT and the 2-layer tiny-bert, random.
    "tiny": {
        "image_backbone": "test_vit", "text_backbone": "tiny-bert", "text_arch": "tiny-bert",
        "text_pooling": "cls", "hidden_dim": 16,
    },
}


# ------------------------------------------------------------------------------ one configuration


def synthetic_batch(batch_size: int, image_size: int, text_len: int, device: torch.device, seed: int = 0) -> dict:
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
    from lightning_modules.system import UnipairSystem

    encoders = ENCODER_SETS[cfg["encoders"]]
    text_backbone = encoders["text_backbone"]
    if (not cfg["pretrained"] or text_backbone is None) and encoders["text_arch"] in common.TEXT_CONFIGS:
        text_backbone = common.text_config_folder(encoders["text_arch"], workdir / encoders["text_arch"])
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
        missing_strategy=cfg["strategy"],
        text_pooling=encoders["text_pooling"],
        predictor_hidden_dim=encoders["hidden_dim"],
        head_hidden_dim=encoders["hidden_dim"],
        lr=1e-3,
    )


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
        self.optimizer = torch.optim.AdamW(self.system._parameter_groups(), lr=1e-3)

    def train_step(self) -> None:
        self.system.train()
        with self.autocast():
            losses, _ = self.system.compute_losses(self.batch)
        losses["loss"].backward()
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
        "strategy": cfg["strategy"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "image_tokens": _image_tokens(work.system, cfg["image_size"]),
        "text_tokens": cfg["text_len"] + work.system.text_encoder.num_prompt_tokens
        + work.system.text_encoder.num_readonly_tokens,
        "train_flops_per_sample": train_flops / b,
        "infer_flops_per_sample": infer_flops / b,
    }
    if device.type == "cuda":
        row.update(memory_kind="cuda_max_allocated", peak_memory_mb=train_peak)
        del work
        torch.cuda.empty_cache()
    else:
        row.update(memory_kind="process_peak_rss", rss_after_build_mb=rss_after_build, peak_memory_mb=_peak_rss_mb())
    return row


def measure_times(cfgs: list[dict], warmup: int, steps: int, infer_steps: int) -> list[dict]:
    """Training-step and inference times of all configurations, interleaved in one process.

    Round-robin (one step of each configuration per round) so that every configuration sees the
    same machine load, which matters on a shared CPU. Wall time and process CPU time are recorded;
    the dense matmul rate is measured between rounds and its median reported.
    """
    device = common.resolve_device(cfgs[0]["device"])
    with tempfile.TemporaryDirectory(prefix="unipair-bench-") as workdir:
        works = [Workload(cfg, Path(workdir)) for cfg in cfgs]
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
        out.append({
            "train_step_s": step_s,
            "train_step_s_min": min(train[i]),
            "train_step_s_all": train[i],
            "train_step_cpu_s": common.median(train_cpu[i]),
            "train_samples_per_s": b / step_s,
            "infer_batch_s": infer_s,
            "infer_batch_s_all": infer[i],
            "infer_samples_per_s": b / infer_s,
        })
    rate = common.median(rates)
    for row in out:
        row["matmul_flops_per_s"] = rate
    return out


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
        patches + backbone.num_prefix_tokens + system.image_encoder.num_prompt_tokens
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
    }
    configs = [
        {**common_cfg, "mode": mode, "predictor_length": DEFAULT_PREDICTOR_LENGTH, "strategy": "predict"}
        for mode in args.modes
    ]
    if not args.no_predictor_overhead and "prompt" in args.modes:
        configs.append({**common_cfg, "mode": "prompt", "predictor_length": 0, "strategy": "zero"})
    return configs


def run_isolated(cfg: dict) -> dict:
    """Measure ``cfg`` in a fresh Python process (its peak RSS is then its own)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=common.ROOT)
    if result.returncode != 0:
        raise RuntimeError(
            f"bench worker for mode {cfg['mode']!r} (predictor_length={cfg['predictor_length']}) failed with exit "
            f"code {result.returncode}:\n{result.stderr[-3000:]}"
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench worker for mode {cfg['mode']!r} printed no result:\n{result.stdout[-2000:]}")
    return json.loads(lines[-1])


def summarise(rows: list[dict]) -> dict:
    by_key = {(r["mode"], r["predictor_length"]): r for r in rows}
    summary: dict[str, Any] = {}
    prompt = by_key.get(("prompt", DEFAULT_PREDICTOR_LENGTH))
    full = by_key.get(("full", DEFAULT_PREDICTOR_LENGTH))
    if prompt:
        summary["prompt_trainable_fraction"] = prompt["trainable_fraction"]
    if prompt and full:
        summary["prompt_vs_full_train_step_time_ratio"] = prompt["train_step_s"] / full["train_step_s"]
        summary["prompt_vs_full_train_step_cpu_time_ratio"] = prompt["train_step_cpu_s"] / full["train_step_cpu_s"]
        # The fastest of the repeated steps is the least disturbed by other load on a shared machine.
        summary["prompt_vs_full_train_step_min_time_ratio"] = prompt["train_step_s_min"] / full["train_step_s_min"]
        summary["prompt_vs_full_train_flops_ratio"] = prompt["train_flops_per_sample"] / full["train_flops_per_sample"]
    without = by_key.get(("prompt", 0))
    if prompt and without:
        summary["predictor_overhead"] = {
            "train_step_time_ratio": prompt["train_step_s"] / without["train_step_s"],
            "train_step_min_time_ratio": prompt["train_step_s_min"] / without["train_step_s_min"],
            "infer_time_ratio": prompt["infer_batch_s"] / without["infer_batch_s"],
            "train_flops_ratio": prompt["train_flops_per_sample"] / without["train_flops_per_sample"],
            "extra_image_tokens": prompt["image_tokens"] - without["image_tokens"],
            "extra_text_tokens": prompt["text_tokens"] - without["text_tokens"],
            "extra_trainable_params": prompt["trainable_params"] - without["trainable_params"],
        }
    return summary


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def markdown(document: dict) -> str:
    s = document["settings"]
    header = document["header"]
    machine = header["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} cores, {s.get('threads', machine['torch_threads'])} torch threads)"
    memory_column = "train peak alloc (MiB)" if s["device_type"] == "cuda" else "peak RSS (MiB)"
    load = machine.get("load_average")
    lines = [
        f"Bench: {s['image_backbone']} + {s['text_arch']} ({'pretrained' if s['pretrained'] else 'random init'}), "
        f"batch {s['batch_size']}, {s['image_size']} px, {s['text_len']} text tokens, "
        f"{'bf16 autocast' if s['device_type'] == 'cuda' else 'fp32'}; {where}; {header['date']}; "
        f"median of {s['steps']} steps after {s['warmup']} warm-up, modes interleaved. Matmul rate measured in the run: "
        f"{_si(document['matmul_flops_per_s'])}FLOP/s" + (f"; load average at the start {load[0]:.1f}." if load else "."),
        "",
        "| mode | pred. tokens | trainable / total params | trainable % | train step (s) | train step CPU (s) | "
        f"train samples/s | infer samples/s | {memory_column} | train GFLOP/sample | achieved FLOP/s | % of matmul rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in document["rows"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['predictor_length']} | failed: {r['error'][:80]} |")
            continue
        memory = r["peak_memory_mb"]
        lines.append(
            f"| {r['mode']} | {r['predictor_length']} | {_si(r['trainable_params'])} / {_si(r['total_params'])} | "
            f"{100 * r['trainable_fraction']:.2f} | {r['train_step_s']:.3f} | {r['train_step_cpu_s']:.3f} | "
            f"{r['train_samples_per_s']:.1f} | "
            f"{r['infer_samples_per_s']:.1f} | {memory:.0f} | {r['train_flops_per_sample'] / 1e9:.2f} | "
            f"{_si(r['train_achieved_flops_per_s'])} | {100 * r['train_fraction_of_matmul_rate']:.1f} |"
        )
    summary = document["summary"]
    lines.append("")
    if "prompt_vs_full_train_step_time_ratio" in summary:
        lines.append(
            f"prompt / full training-step time: {summary['prompt_vs_full_train_step_time_ratio']:.2f} (medians), "
            f"{summary['prompt_vs_full_train_step_min_time_ratio']:.2f} (fastest steps), "
            f"{summary['prompt_vs_full_train_step_cpu_time_ratio']:.2f} (process CPU time) "
            f"(FLOPs ratio {summary['prompt_vs_full_train_flops_ratio']:.2f}); prompt trains "
            f"{100 * summary['prompt_trainable_fraction']:.2f} % of the parameters."
        )
    if "predictor_overhead" in summary:
        p = summary["predictor_overhead"]
        lines.append(
            f"Read-only predictor (+{p['extra_image_tokens']} image / +{p['extra_text_tokens']} text tokens, "
            f"+{p['extra_trainable_params']:,} trainable params) costs x{p['train_step_time_ratio']:.2f} training-step "
            f"time (x{p['train_step_min_time_ratio']:.2f} fastest steps), x{p['infer_time_ratio']:.2f} inference time, "
            f"x{p['train_flops_ratio']:.2f} training FLOPs "
            "(prompt mode, predict vs zero strategy without predictor)."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="ViT-B/16 + BERT-base (random init): same as --encoders paper")
    parser.add_argument("--encoders", choices=sorted(ENCODER_SETS), default="demo",
                        help="demo: dinov2-s14 + minilm-l6; paper: ViT-B/16 + BERT-base; tiny: test_vit + tiny-bert (tests)")
    parser.add_argument("--random-init", action="store_true", help="demo encoder architectures without their weights")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--modes", nargs="+", default=list(PEFT_MODES), choices=PEFT_MODES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112, help="image side in pixels (emoji PNGs are 64 px)")
    parser.add_argument("--text-len", type=int, default=16, help="text tokens per sample, [CLS] and [SEP] included")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (the median is reported)")
    parser.add_argument("--infer-steps", type=int, default=5, help="timed inference batches")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default); on a busy shared CPU one thread avoids waiting for a "
                             "descheduled second one at every operator")
    parser.add_argument("--no-predictor-overhead", action="store_true", help="skip the predictor_length=0 run")
    parser.add_argument("--isolation", choices=("auto", "subprocess", "inprocess"), default="auto",
                        help="one fresh process per mode (auto: on CPU, where peak RSS needs it) or all in this one")
    parser.add_argument("--out", default=None, help="output JSON (default runs/bench/bench.json, bench_paper.json with --paper)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paper:
        args.encoders = "paper"
    for name in ("batch_size", "image_size", "text_len", "steps", "infer_steps"):
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
    isolation = args.isolation if args.isolation != "auto" else ("subprocess" if device.type == "cpu" else "inprocess")
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
            statics.append({"mode": cfg["mode"], "predictor_length": cfg["predictor_length"], "error": str(error)})
    timed_cfgs = [cfg for cfg, st in zip(cfgs, statics, strict=True) if "error" not in st]
    print(f"bench: timing {len(timed_cfgs)} configurations interleaved ({args.warmup} warm-up + {args.steps} rounds) ...",
          file=sys.stderr, flush=True)
    times = iter(measure_times(timed_cfgs, args.warmup, args.steps, args.infer_steps) if timed_cfgs else [])
    rows = [st if "error" in st else finish_row(st, next(times)) for st in statics]
    good = [r for r in rows if "error" not in r]
    encoders = ENCODER_SETS[args.encoders]
    document = {
        "format_version": 1,
        "header": header,
        "settings": {
            "image_backbone": encoders["image_backbone"],
            "text_arch": encoders["text_arch"],
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
            "strategy": "predict",
        },
        "matmul_flops_per_s": common.median([r["matmul_flops_per_s"] for r in good]) if good else None,
        "rows": rows,
        "summary": summarise(good),
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out) if args.out else common.ROOT / "runs" / "bench" / ("bench.json" if args.encoders == "demo" else f"bench_{args.encoders}.json")
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
