"""Where the CPU training step's time goes, and the speed-up of the encoders' token handling, side by side.

Part 1, profile (the demo configuration: emoji DataModule, dinov2-s14 + minilm-l6, prompt mode,
``predict``): per step, the seconds spent in

- data: producing one batch in the main process (decode, transform, collate; ``num_workers=0``,
  i.e. the work a loader worker does per batch);
- image encoder / text encoder / predictor heads / fusion head: their forward passes (timed by
  forward hooks inside the real ``UnipairSystem.compute_losses``); loss = the rest of the forward
  (missing-strategy selection, task loss, VICReg);
- backward (whole), and, measured in isolated passes, the backward of each encoder alone;
- optimizer step (AdamW).

A ``torch.profiler`` table of the operators with the most self CPU time is written next to the JSON.

Part 2, before/after: the same model twice, one with the encoders' former token handling (every
layer re-sliced and re-concatenated the whole sequence, also in the layers without fresh prompts,
which are then an identity copy, and its backward built zero-filled full-size gradients per
slice), one with the current code (``torch.slice_scatter`` for fresh prompts only); and the current
code with one torch thread instead of the default. On a shared, oversubscribed CPU each parallel
operator waits for its second thread to be scheduled (about 10 ms per operator, whatever its size,
seen in the operator table), so the thread count can matter more than the arithmetic. Same
weights, same batches, round-robin so all see the same load; the outputs are checked to be equal.

Usage::

    python benchmarks/profile_step.py                  # batch 8, 112 px, 6 timed steps
    python benchmarks/profile_step.py --batch-size 32  # the demo's batch
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402  (puts the project root on sys.path)
import torch  # noqa: E402

from lightning_modules.prompts import EncoderOutput, additive_mask, readonly_attention_mask  # noqa: E402

# --------------------------------------------------------------------- the former token handling


def legacy_image_forward(self, images: torch.Tensor) -> EncoderOutput:
    """``ImageEncoder.forward`` as it was before the speed-up (commit 1e4c2d4), for the comparison."""
    bb = self.backbone
    x = bb.patch_embed(images)
    x = bb._pos_embed(x)
    x = bb.patch_drop(x)
    x = bb.norm_pre(x)
    batch_size, num_original = x.shape[0], x.shape[1]
    num_prompts, num_readonly = self.num_prompt_tokens, self.num_readonly_tokens
    prompt_end = num_original + num_prompts
    attn_mask = None
    if num_readonly:
        readonly = torch.zeros(prompt_end + num_readonly, dtype=torch.bool, device=x.device)
        readonly[prompt_end:] = True
        attn_mask = readonly_attention_mask(readonly)
    for index, block in enumerate(bb.blocks):
        pieces = [x[:, :num_original]]
        if num_prompts:
            fresh = self.task_prompts.has_layer(index)
            pieces.append(
                self.task_prompts.layer_tokens(index, batch_size, x.dtype) if fresh else x[:, num_original:prompt_end]
            )
        if num_readonly:
            pieces.append(self.readonly_tokens.layer_tokens(0, batch_size, x.dtype) if index == 0 else x[:, prompt_end:])
        x = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        x = block(x, attn_mask=attn_mask) if attn_mask is not None else block(x)
    x = bb.norm(x)
    embedding = x[:, 0] if self.pooling == "cls" else x[:, bb.num_prefix_tokens:num_original].mean(dim=1)
    embedding = bb.fc_norm(embedding)
    readonly_features = x[:, prompt_end:].mean(dim=1) if num_readonly else None
    return EncoderOutput(embedding, readonly_features)


def legacy_text_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
    """``TextEncoder.forward`` as it was before the speed-up (commit 1e4c2d4), for the comparison."""
    hidden = self.backbone.embeddings(input_ids=input_ids)
    batch_size, length = input_ids.shape
    num_prompts, num_readonly = self.num_prompt_tokens, self.num_readonly_tokens
    words_start = 1 + num_prompts
    words_end = words_start + length - 1
    total = words_end + num_readonly
    valid = attention_mask.bool()
    key_valid = torch.ones(batch_size, total, dtype=torch.bool, device=hidden.device)
    key_valid[:, 0] = valid[:, 0]
    key_valid[:, words_start:words_end] = valid[:, 1:]
    readonly = torch.zeros(total, dtype=torch.bool, device=hidden.device)
    readonly[words_end:] = True
    mask = additive_mask(readonly_attention_mask(readonly, key_valid), hidden.dtype)
    x = hidden
    for index, layer in enumerate(self.backbone.encoder.layer):
        if index == 0:
            pieces = [x[:, :1]]
            if num_prompts:
                pieces.append(self.task_prompts.layer_tokens(0, batch_size, x.dtype))
            pieces.append(x[:, 1:])
            if num_readonly:
                pieces.append(self.readonly_tokens.layer_tokens(0, batch_size, x.dtype))
        else:
            pieces = [x[:, :1]]
            if num_prompts:
                fresh = self.task_prompts.has_layer(index)
                pieces.append(self.task_prompts.layer_tokens(index, batch_size, x.dtype) if fresh else x[:, 1:words_start])
            pieces.append(x[:, words_start:words_end])
            if num_readonly:
                pieces.append(x[:, words_end:])
        x = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        x = layer(x, attention_mask=mask)
        if isinstance(x, tuple):
            x = x[0]
    if self.pooling == "cls":
        embedding = x[:, 0]
    else:
        original = torch.cat([x[:, :1], x[:, words_start:words_end]], dim=1)
        weights = valid.to(original.dtype).unsqueeze(-1)
        embedding = (original * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    readonly_features = x[:, words_end:].mean(dim=1) if num_readonly else None
    return EncoderOutput(embedding, readonly_features)


def use_legacy_forward(system) -> None:
    system.image_encoder.forward = types.MethodType(legacy_image_forward, system.image_encoder)
    system.text_encoder.forward = types.MethodType(legacy_text_forward, system.text_encoder)


# ----------------------------------------------------------------------------------------- setup


def build(args: argparse.Namespace, seed: int = 0):
    from lightning_modules.system import UnipairSystem

    torch.manual_seed(seed)
    with benchutil.quiet_warnings():
        system = UnipairSystem(
            task="multiclass", num_classes=9, image_backbone=args.image_backbone, text_backbone=args.text_backbone,
            pretrained=not args.random_init, img_size=args.image_size, image_peft=args.peft, text_peft=args.peft,
            missing_strategy="predict", lr=1e-3,
        )
    optimizer = torch.optim.AdamW(system._parameter_groups(), lr=1e-3)
    return system.train(), optimizer


def data_loader(args: argparse.Namespace):
    if args.synthetic_data:
        import bench

        batch = bench.synthetic_batch(args.batch_size, args.image_size, 12, torch.device("cpu"))
        return None, lambda: batch
    from datamodules.emoji import EmojiDataModule

    dm = EmojiDataModule(
        root=args.root, image_size=args.image_size, batch_size=args.batch_size, num_workers=0,
        image_encoder=args.image_backbone, text_encoder=args.text_backbone,
        train_missing={"missing_rate": 0.7, "missing_type": "both"},
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    state: dict[str, Any] = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    return dm, next_batch


class ForwardTimer:
    """Seconds spent in the forward of named submodules (pre/post forward hooks)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._starts: dict[str, float] = {}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, inputs):
            self._starts[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(module, inputs, output):
            self.totals[name] += time.perf_counter() - self._starts.pop(name)
        return hook

    def reset(self) -> None:
        self.totals.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def profile_sections(args: argparse.Namespace, next_batch) -> dict[str, Any]:
    system, optimizer = build(args)
    parts = {"image_encoder": system.image_encoder, "text_encoder": system.text_encoder,
             "fusion_head": system.head}
    if system.has_predictor:
        parts["predictor_image_to_text"] = system.image_to_text
        parts["predictor_text_to_image"] = system.text_to_image
    timer = ForwardTimer(parts)
    sections: dict[str, list[float]] = defaultdict(list)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        timer.reset()
        losses, _ = system.compute_losses(batch)
        t2 = time.perf_counter()
        losses["loss"].backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step < args.warmup:
            continue
        forward = t2 - t1
        module_total = sum(timer.totals.values())
        sections["data"].append(t1 - t0)
        for name in parts:
            sections[f"forward: {name}"].append(timer.totals.get(name, 0.0))
        sections["forward: fill-in + task loss + VICReg (rest)"].append(forward - module_total)
        sections["backward (whole)"].append(t3 - t2)
        sections["optimizer step"].append(t4 - t3)
        sections["step total"].append(t4 - t0)
    timer.remove()

    # Backward of each encoder alone (isolated passes on the same batch).
    batch = next_batch()
    iso: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(2, args.steps // 2)):
        out = system.image_encoder(batch["image"])
        target = sum(t.sum() for t in out if t is not None)
        start = time.perf_counter()
        target.backward()
        iso["backward: image encoder alone"].append(time.perf_counter() - start)
        out = system.text_encoder(batch["input_ids"], batch["attention_mask"])
        target = sum(t.sum() for t in out if t is not None)
        start = time.perf_counter()
        target.backward()
        iso["backward: text encoder alone"].append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)

    table = ""
    if args.operators:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                _train_step(system, optimizer, batch)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.operators)
    result = {name: benchutil.median(values) for name, values in {**sections, **iso}.items()}
    return {"median_s": result, "all_s": {**sections, **iso}, "operator_table": table}


def _train_step(system, optimizer, batch) -> None:
    losses, _ = system.compute_losses(batch)
    losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _encoders_step(system, optimizer, batch) -> None:
    """Forward + backward of the two encoders alone (where the token handling acts)."""
    image = system.image_encoder(batch["image"])
    text = system.text_encoder(batch["input_ids"], batch["attention_mask"])
    sum(t.sum() for t in (*image, *text) if t is not None).backward()
    optimizer.zero_grad(set_to_none=True)


def before_after(args: argparse.Namespace, next_batch) -> dict[str, Any]:
    """Former vs current token handling, and torch's default thread count vs one thread, side by side.

    Variants (same weights, same batches): ``former`` (the former token handling) and ``current``,
    each with torch's default thread count and with one thread. They run round-robin, one step each
    per round with the order rotating, so all see nearly the same machine load; the reported
    speed-up of a variant is the median over rounds of (``former`` time / its time), next to plain
    medians.
    """
    default_threads = torch.get_num_threads()
    former, opt_former = build(args, seed=0)
    current, opt_current = build(args, seed=0)
    current.load_state_dict(former.state_dict())
    use_legacy_forward(former)
    variants = [("former", former, opt_former, default_threads), ("current", current, opt_current, default_threads)]
    if default_threads > 1:
        # One thread: timings that do not depend on when the second thread gets scheduled (the code
        # change is read off this pair on a busy machine).
        variants += [("former_1_thread", former, opt_former, 1), ("current_1_thread", current, opt_current, 1)]
    batches = [next_batch() for _ in range(args.warmup + args.steps)]
    # Equality check (eval mode: no dropout; same weights, same batch).
    former.eval(), current.eval()
    with torch.no_grad():
        out_former = former.compute_losses(batches[0])
        out_current = current.compute_losses(batches[0])
    former.train(), current.train()
    result: dict[str, Any] = {
        "default_threads": default_threads,
        "loss_former": float(out_former[0]["loss"]), "loss_current": float(out_current[0]["loss"]),
        "max_abs_logit_difference": float((out_former[1] - out_current[1]).abs().max()),
    }
    for what, fn in (("train_step", _train_step), ("encoders_forward_backward", _encoders_step)):
        times: dict[str, list[float]] = {name: [] for name, *_ in variants}
        ratios: dict[str, list[float]] = {name: [] for name, *_ in variants}
        for step, batch in enumerate(batches):
            shift = step % len(variants)
            measured = {}
            for name, system, optimizer, threads in variants[shift:] + variants[:shift]:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                fn(system, optimizer, batch)
                measured[name] = time.perf_counter() - start
            torch.set_num_threads(default_threads)
            if step >= args.warmup:
                for name, value in measured.items():
                    times[name].append(value)
                    ratios[name].append(measured["former"] / value)
        med = {k: benchutil.median(v) for k, v in times.items()}
        result[what] = {
            "median_s": med,
            "samples_per_s": {k: args.batch_size / v for k, v in med.items()},
            "speedup_vs_former": {k: benchutil.median(v) for k, v in ratios.items()},
            "ratios_vs_former": ratios,
            "all_s": times,
        }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peft", default="prompt", choices=("prompt", "bitfit", "lora", "full", "frozen"))
    parser.add_argument("--image-backbone", default="dinov2-s14")
    parser.add_argument("--text-backbone", default="minilm-l6")
    parser.add_argument("--random-init", action="store_true", help="build the backbones without weights")
    parser.add_argument("--synthetic-data", action="store_true", help="a fixed synthetic batch instead of emoji")
    parser.add_argument("--root", default=None, help="unipair cache folder (default $UNIPAIR_CACHE)")
    parser.add_argument("--operators", type=int, default=25,
                        help="rows of the torch.profiler operator table (0: no table)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("profile", "before_after"))
    parser.add_argument("--out", default=str(benchutil.ROOT / "runs" / "bench" / "profile_step.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu")
    header = benchutil.run_header(device)
    started = time.perf_counter()
    _, next_batch = data_loader(args)
    document: dict[str, Any] = {"format_version": 1, "header": header, "settings": vars(args)}
    out = Path(args.out)
    lines = [f"Training step on CPU ({header['machine']['cpu']}, {header['machine']['torch_threads']} threads), "
             f"{args.image_backbone} + {args.text_backbone}, {args.peft}, batch {args.batch_size}, {args.image_size} px, "
             f"{'synthetic batch' if args.synthetic_data else 'emoji train batches (num_workers=0)'}; {header['date']}.", ""]
    if "profile" not in args.skip:
        profile = profile_sections(args, next_batch)
        document["profile"] = {k: v for k, v in profile.items() if k != "operator_table"}
        out.parent.mkdir(parents=True, exist_ok=True)
        if profile["operator_table"]:
            out.with_name(out.stem + "_operators.txt").write_text(profile["operator_table"], encoding="utf-8")
        total = profile["median_s"]["step total"]
        lines += ["| section | median s | % of step |", "|---|---:|---:|"]
        for name, value in profile["median_s"].items():
            share = f"{100 * value / total:.1f}" if "alone" not in name else "(isolated)"
            lines.append(f"| {name} | {value:.3f} | {share} |")
        lines.append("")
    if "before_after" not in args.skip:
        comparison = before_after(args, next_batch)
        document["before_after"] = comparison
        lines += [
            "| variant | measured | median s | samples/s | speed-up vs former (median of per-round ratios) |",
            "|---|---|---:|---:|---:|",
        ]
        for what in ("train_step", "encoders_forward_backward"):
            c = comparison[what]
            for name in c["median_s"]:
                lines.append(f"| {name} | {what} | {c['median_s'][name]:.3f} | {c['samples_per_s'][name]:.2f} | "
                             f"x{c['speedup_vs_former'][name]:.3f} |")
        lines += [
            "",
            f"{args.steps} rounds after {args.warmup} warm-up, round-robin; default threads = "
            f"{comparison['default_threads']}; same weights and batches; loss on the first batch former "
            f"{comparison['loss_former']:.6f}, current {comparison['loss_current']:.6f}, max |logit difference| "
            f"{comparison['max_abs_logit_difference']:.2e}; load average at the start "
            f"{header['machine'].get('load_average')}.",
        ]
    document["wall_s"] = time.perf_counter() - started
    document["markdown"] = "\n".join(lines) + "\n"
    benchutil.write_json(out, document)
    out.with_suffix(".md").write_text(document["markdown"], encoding="utf-8")
    print(document["markdown"])
    print(f"profile_step: wrote {out} ({document['wall_s']:.0f} s)", file=sys.stderr)
    return document


if __name__ == "__main__":
    main()
