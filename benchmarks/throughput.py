"""Training throughput of lora_sweep's loop against HF Trainer + PEFT and a bare PEFT + torch loop.

    python benchmarks/throughput.py                          # MiniLM / rotten_tomatoes, LoRA r=8, CPU or GPU
    python benchmarks/throughput.py --model smollm2 --steps 10 --repeats 3
    python benchmarks/throughput.py --model smollm2 --packing --others padded

Three sides train the same model, data, method, batch, sequence length and steps:

- ``lora_sweep``: the run path a user gets (``lora_sweep.run.Recipe``: prepare, set up, ``train.fit``);
- ``trainer``: ``transformers.Trainer`` on the same PEFT model, with Trainer's default optimizer (AdamW;
  fused on torch >= 2.8) and the same learning rate, weight decay, scheduler, warm-up and clipping;
- ``bare``: a plain loop (autocast, backward, clip, ``torch.optim.AdamW`` with its defaults, scheduler).

The PEFT model of every side is built by lora_sweep's building blocks (``models.load_base_model`` and
``methods.apply_method``: the same weights, adapters, head and dtype), so what differs is the loop alone.
The batches are identical: every side draws them from the loader ``train.fit`` uses (same seed, order and
padding), collating them inside its own loop as ``train.fit`` does; each worker checks the shapes of
every batch its model sees, and the bytes of the warm-up ones, against that list. The timed window runs
from the end of optimizer step ``--warmup`` to the end of step ``--warmup + --steps`` (a global optimizer
step hook, identical for all sides, synchronises CUDA only at these two points); lora_sweep's validation
and checkpoint after its last step fall outside it.

Each measurement runs in a fresh subprocess, in the order a, b, c, a, b, c, ...: peak memory is then a
process's own (ru_maxrss, CUDA's max allocated), no side inherits another's warm allocator, caches or
thread pools, and a slow spell of a shared machine hits the sides of one round alike. Ratios are taken per
round (lora_sweep / trainer, lora_sweep / bare), then min / median / max over the rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = {"a": "lora_sweep", "b": "trainer", "c": "bare"}
MODELS = {
    "minilm": ["model=minilm", "data=rotten_tomatoes", "method=lora", "method.r=8"],
    # forgetting (reference perplexity) and generations happen outside the window: skip their cost
    "smollm2": [
        "model=smollm2_135m",
        "data=chatterbot",
        "method=lora",
        "method.r=8",
        "lm_eval.reference_texts=0",
    ],
}


# ---------------------------------------------------------------------------------------------- worker


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_sweep import cli

    cli.register_resolvers()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return cli.to_run_config(cfg)


def draw_batches(cfg, prepared, device, count: int):
    """The first ``count`` training batches exactly as ``train.fit`` draws them (epoch after epoch), collated
    as they are drawn: each loop pays for its own collation inside the window, as lora_sweep's does."""
    from lora_sweep.data import make_loader
    from lora_sweep.tasks import get_task

    collator = get_task(cfg).collator(
        prepared.tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None
    )
    drawn, epoch = 0, 0
    while drawn < count:
        loader = make_loader(
            prepared.data.splits["train"],
            collator,
            cfg.train.batch_size,
            shuffle=True,
            seed=cfg.train.seed,
            epoch=epoch,
            pin_memory=device.type == "cuda",
        )
        for batch in loader:
            yield dict(batch)
            drawn += 1
            if drawn == count:
                return
        epoch += 1


def digest(tensor) -> str:
    return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]


class Window:
    """Times optimizer steps warmup+1 .. warmup+steps of whichever optimizer runs, and checks the batches."""

    def __init__(self, device, warmup: int, steps: int, expected: list[dict]):
        import torch

        self.torch, self.device, self.warmup, self.steps = torch, device, warmup, steps
        self.expected_shapes = [tuple(b["input_ids"].shape) for b in expected]
        self.expected_digests = [digest(b["input_ids"]) for b in expected[:warmup]]
        self.shapes: list[tuple] = []
        self.digests: list[str] = []
        self.count, self.started, self.ended = 0, None, None
        self.memory: dict[str, float] = {}
        self.parameters = self.trainable = 0
        self.setup: dict[str, object] = {}  # what a side's model trains with, seen at its first forward
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._after_step)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.count += 1
        if self.count == self.warmup:
            self._sync()
            self.started = time.perf_counter()
        elif self.count == self.warmup + self.steps:
            self._sync()
            self.ended = time.perf_counter()
            self.memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            if self.device.type == "cuda":
                self.memory["peak_cuda_allocated_mb"] = (
                    self.torch.cuda.max_memory_allocated(self.device) / 2**20
                )
                self.memory["peak_cuda_reserved_mb"] = (
                    self.torch.cuda.max_memory_reserved(self.device) / 2**20
                )

    def watch(self, model) -> None:
        """Record what each training forward pass receives (shapes always; bytes in the warm-up only)."""

        def pre_hook(module, args, kwargs):
            if not module.training or len(self.shapes) >= len(self.expected_shapes):
                return
            if not self.setup:  # Trainer switches checkpointing on inside train(): look at the first step
                self.setup = {
                    "gradient_checkpointing": bool(getattr(module, "is_gradient_checkpointing", False)),
                    "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()}),
                }
            ids = kwargs.get("input_ids", args[0] if args else None)
            if len(self.shapes) < self.warmup:
                self.digests.append(digest(ids))
            self.shapes.append(tuple(ids.shape))

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def reset_memory(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def result(self) -> dict:
        if self.ended is None:
            raise RuntimeError(
                f"only {self.count} optimizer steps ran, {self.warmup + self.steps} were asked"
            )
        if self.shapes != self.expected_shapes or self.digests != self.expected_digests:
            raise RuntimeError("the batches this side trained on are not the ones the others got")
        return {
            "seconds": self.ended - self.started,
            "optimizer_steps": self.count,
            "parameters": self.parameters,
            "trainable": self.trainable,
            **self.setup,
            **self.memory,
        }


def fresh_peft_model(cfg, prepared, device, total_steps: int):
    """The model lora_sweep trains, built from its building blocks (no run-level caching or copies): the
    same base dtype and quantization (plan_base) and the same resolved gradient checkpointing."""
    from transformers import set_seed

    from lora_sweep.methods import apply_method
    from lora_sweep.models import load_base_model, plan_base, set_gradient_checkpointing

    plan = plan_base(cfg.model, cfg.method.adapter, device)
    set_seed(cfg.train.seed)
    model = load_base_model(
        prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id, plan
    )
    set_gradient_checkpointing(model, checkpointing(cfg, device))
    set_seed(cfg.train.seed)
    return apply_method(model, cfg.method, prepared.spec, prepared.targets, total_steps)


def checkpointing(cfg, device) -> bool:
    """train.gradient_checkpointing resolved as the run resolves it ("auto" is a truthy string: passed on
    as is, it once switched checkpointing on for Trainer and the bare loop alone, 1.7x their step time)."""
    from lora_sweep.models import plan_base, wants_gradient_checkpointing

    return wants_gradient_checkpointing(
        cfg.train.gradient_checkpointing, plan_base(cfg.model, cfg.method.adapter, device)
    )


def run_lora_sweep(cfg, prepared, device, precision, window: Window) -> None:
    from lora_sweep.run import Recipe

    recipe = Recipe(cfg, prepared, device, precision, None)
    recipe.start_record()
    recipe.start_tracking(None, {}, "")
    recipe.setup_model(time.perf_counter())
    window.watch(recipe.model)
    window.reset_memory()
    try:
        recipe.train(None)
    finally:
        recipe.release_model()


def run_bare(cfg, prepared, device, precision, window: Window, total: int) -> None:
    import torch
    from transformers import get_scheduler

    model = fresh_peft_model(cfg, prepared, device, total).to(device).train()
    window.watch(model)
    window.reset_memory()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr)
    scheduler = get_scheduler(
        cfg.train.scheduler, optimizer, round(cfg.train.warmup_ratio * total), num_training_steps=total
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    for batch in draw_batches(cfg, prepared, device, total):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        if cfg.train.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def run_trainer(cfg, prepared, device, precision, window: Window, total: int, workdir: Path) -> None:
    from torch.utils.data import DataLoader, IterableDataset
    from transformers import Trainer, TrainingArguments

    class SameOrder(IterableDataset):
        def __iter__(self):
            return draw_batches(cfg, prepared, device, total)

    model = fresh_peft_model(cfg, prepared, device, total)
    window.watch(model)

    class SameBatches(Trainer):
        # Trainer's own sampler would shuffle with its own RNG: hand it the very batches the others get
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(SameOrder(), batch_size=None))

    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        max_steps=total,
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        lr_scheduler_type=cfg.train.scheduler,
        warmup_steps=round(cfg.train.warmup_ratio * total),
        max_grad_norm=cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else 0.0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.train.seed,
        remove_unused_columns=False,
        dataloader_pin_memory=device.type == "cuda",
        gradient_checkpointing=checkpointing(cfg, device),
    )
    trainer = SameBatches(model=model, args=args)
    window.reset_memory()
    trainer.train()


def worker(spec: dict) -> dict:
    import torch

    from lora_sweep.models import pick_device, pick_precision
    from lora_sweep.prepare import prepare

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    side, workdir = spec["side"], Path(spec["workdir"])
    cfg = compose(spec["overrides"] + [f"output_dir={workdir / 'run'}"])
    prepared = prepare(cfg)
    if side != "a" and spec.get("others_overrides") is not None:  # --others padded: the same rows unpacked
        cfg = compose(spec["others_overrides"] + [f"output_dir={workdir / 'run'}"])
        prepared = prepare(cfg)
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    total = spec["warmup"] + spec["steps"]
    batches = list(draw_batches(cfg, prepared, device, total))  # what every side must train on
    window = Window(device, spec["warmup"], spec["steps"], batches)
    timed = batches[spec["warmup"] :]
    real = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in timed
    )
    positions = sum(b["input_ids"].numel() for b in timed)
    try:
        if side == "a":
            run_lora_sweep(cfg, prepared, device, precision, window)
        elif side == "b":
            run_trainer(cfg, prepared, device, precision, window, total, workdir)
        else:
            run_bare(cfg, prepared, device, precision, window, total)
    finally:
        window.handle.remove()  # the hook is global: an in-process caller (the smoke test) runs on
    result = window.result()
    seconds = result["seconds"]
    return {
        "side": SIDES[side],
        "device": str(device),
        "precision": precision,
        "tokens": real,
        "positions": positions,
        "tokens_per_s": real / seconds,
        "step_s": seconds / spec["steps"],
        "threads": torch.get_num_threads(),
        **result,
    }


# ---------------------------------------------------------------------------------------------- driver


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def overrides_for(args, packing: bool) -> list[str]:
    total = args.warmup + args.steps
    preset = MODELS[args.model]
    if args.model_path:  # the preset's data and method on another model folder (a random-init one, say)
        preset = ["model=local", f"model.name_or_path={args.model_path}"] + [
            o for o in preset if not o.startswith("model=")
        ]
    overrides = [
        *preset,
        "tracking=none",
        f"train.max_steps={total}",
        "train.eval_every=0",  # one validation pass, after the last step (outside the window)
        f"train.log_every={total}",  # lora_sweep's one host sync per log: here after the window
        f"train.device={args.device}",
        "train.eval_batch_size=8",
        "data.max_eval_samples=8",  # keeps that pass short; the training data are untouched
    ]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.max_length:
        overrides.append(f"train.max_length={args.max_length}")
    if packing:
        overrides.append("data.packing=true")
    return overrides + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm")
    parser.add_argument(
        "--model-path", default=None, help="a model folder to use instead of the preset's model (model=local)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before the timed window")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of a, b, c")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size (32)")
    parser.add_argument("--max-length", type=int, default=None, help="default: train.max_length (64)")
    parser.add_argument("--packing", action="store_true", help="data.packing=true for lora_sweep")
    parser.add_argument(
        "--others",
        choices=["same", "padded"],
        default="same",
        help="with --packing: Trainer and the bare loop get the same packed batches, or padded ones",
    )
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda")
    parser.add_argument(
        "--sides", default="abc", help="which sides, in round order (a lora_sweep, b trainer, c bare)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak for the run's dtype: prints model FLOP utilisation (6N FLOPs/token for "
        "full fine-tuning, 4N for adapters: no weight gradients of the frozen base)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every side")
    args = parser.parse_args(argv)

    if args.worker:  # one measurement, in this (fresh) process
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0

    spec_base = {
        "overrides": overrides_for(args, args.packing),
        "others_overrides": overrides_for(args, False) if args.packing and args.others == "padded" else None,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": args.threads,
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lora_sweep-throughput-") as tmp:
        for round_number in range(args.repeats):
            for side in args.sides:
                workdir = Path(tmp) / f"{round_number}-{side}"
                workdir.mkdir()
                spec = {
                    **spec_base,
                    "side": side,
                    "workdir": str(workdir),
                    "result": str(workdir / "result.json"),
                }
                (workdir / "spec.json").write_text(json.dumps(spec))
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    str(workdir / "spec.json"),
                ]
                done = subprocess.run(
                    command, cwd=workdir, env=env, capture_output=True, text=True, timeout=args.timeout
                )
                if done.returncode != 0:
                    print(
                        f"{SIDES[side]} failed (round {round_number + 1}):\n{done.stderr[-4000:]}",
                        file=sys.stderr,
                    )
                    return 1
                row = {"round": round_number, **json.loads((workdir / "result.json").read_text())}
                rows.append(row)
                print(
                    f"round {round_number + 1} {row['side']:>10}: {row['tokens_per_s']:8.1f} tokens/s, "
                    f"{row['step_s'] * 1000:8.1f} ms/step, peak RSS {row['peak_rss_mb']:.0f} MB"
                    + (
                        f", CUDA {row['peak_cuda_allocated_mb']:.0f} MB"
                        if "peak_cuda_allocated_mb" in row
                        else ""
                    ),
                    flush=True,
                )
    report(args, rows)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
        )
    return 0


def report(args, rows: list[dict]) -> None:
    first = rows[0]
    print(
        f"\n{args.model}: {args.steps} timed steps after {args.warmup} warm-up, "
        f"batch {args.batch_size or 'default'}, "
        f"max length {args.max_length or 'default'}, packing {args.packing} (others: {args.others}), "
        f"{first['device']} {first['precision']}, {first['threads']} threads, {args.repeats} rounds"
    )
    by_side = {s: [r for r in rows if r["side"] == s] for s in dict.fromkeys(r["side"] for r in rows)}
    print(f"{'side':>10}  tokens/s min/med/max        ms/step min/med/max        real tokens / positions")
    for side, side_rows in by_side.items():
        print(
            f"{side:>10}  {spread([r['tokens_per_s'] for r in side_rows]):>26}  "
            f"{spread([r['step_s'] * 1000 for r in side_rows]):>26}  "
            f"{side_rows[0]['tokens']} / {side_rows[0]['positions']}"
        )
    if args.peak_tflops:
        for side, side_rows in by_side.items():
            row = side_rows[0]
            per_token = (6 if row["trainable"] > 0.5 * row["parameters"] else 4) * row["parameters"]
            mfu = [100 * r["tokens_per_s"] * per_token / (args.peak_tflops * 1e12) for r in side_rows]
            print(
                f"{side:>10}  MFU % {spread(mfu)} of {args.peak_tflops:g} TFLOP/s "
                f"({per_token / 1e9:.2f} GFLOP/token)"
            )
    memory_key = "peak_cuda_allocated_mb" if "peak_cuda_allocated_mb" in first else "peak_rss_mb"
    ours = by_side.get("lora_sweep", [])
    for other in ("trainer", "bare"):
        theirs = by_side.get(other, [])
        pairs = list(zip(ours, theirs))
        if not pairs:
            continue
        print(
            f"lora_sweep / {other} (min / median / max over {len(pairs)} rounds): "
            f"tokens/s {spread([a['tokens_per_s'] / b['tokens_per_s'] for a, b in pairs])}, "
            f"step time {spread([a['step_s'] / b['step_s'] for a, b in pairs])}, "
            f"{memory_key} {spread([a[memory_key] / b[memory_key] for a, b in pairs])}"
        )


if __name__ == "__main__":
    sys.exit(main())
