"""The training loop: one plain PyTorch loop for LoRA and full fine-tuning alike.

It knows nothing of MLflow (it talks to a :class:`~lora_sweep.tracking.Tracker`) nor of Optuna (a sweep
passes ``on_evaluation``, which may answer "stop" after any validation pass).

Resume is exact: given the last checkpoint (``resume_from``), the loop restores the weights, optimizer,
scheduler, every RNG and its position in the data, and goes on as if it had never stopped; on CPU the
final metrics equal those of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_sweep.checkpoint import (
    load_training_state,
    restore_weights,
    run_tokenizer_dir,
    save_checkpoint,
    save_tokenizer,
    verify,
)
from lora_sweep.config import RunConfig
from lora_sweep.data import PACKED_TOKENS, TaskData, make_loader
from lora_sweep.errors import TrainingDiverged
from lora_sweep.evaluation import autocast, progress
from lora_sweep.methods import after_optimizer_step
from lora_sweep.oom import evaluation_pass
from lora_sweep.ranking import is_better as ranks_better
from lora_sweep.system import MemoryMeter
from lora_sweep.tasks import get_task, metric_direction
from lora_sweep.tracking import Tracker

log = logging.getLogger(__name__)

# Called after each validation pass with (step, metrics); returning True stops training (a pruned trial).
EvaluationHook = Callable[[int, dict[str, float]], bool]


@dataclass
class FitResult:
    status: str  # completed | pruned
    steps: int
    total_steps: int
    best_step: int | None
    best_metrics: dict[str, float]
    evaluations: list[dict[str, float]]
    train_seconds: float
    seconds_per_step: float
    tokens_per_second: float
    memory: dict[str, float]
    checkpoints: dict[str, str] = field(default_factory=dict)
    resumed_from_step: int | None = None
    # train.eval_subset: the rows the validation passes used (None: the whole split). best_metrics are
    # then the chosen checkpoint's on the whole split, and subset_metrics what chose it
    eval_subset: int | None = None
    subset_metrics: dict[str, float] = field(default_factory=dict)


def validation_subset(split, rows: int | None, seed: int):
    """The rows of the validation split that every pass of a run evaluates: ``rows`` of them, drawn once
    from ``seed`` (not from the global RNG, which an exact resume restores), kept in split order; the
    whole split when ``rows`` is None or not smaller than it."""
    if rows is None or rows >= len(split):
        return split
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:rows]
    return split.select(sorted(chosen.tolist()))


def plan_steps(train_size: int, cfg: RunConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    return cfg.train.plan_steps(train_size)


def build_optimizer(model, cfg: RunConfig, total_steps: int):
    from transformers import get_scheduler

    # No weight decay on biases and norms: decaying them only hurts (standard BERT/AdamW practice).
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, **optimizer_kernel([*decay, *no_decay]))
    scheduler = get_scheduler(
        cfg.train.scheduler,
        optimizer,
        num_warmup_steps=round(cfg.train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


# Devices whose fused AdamW kernel we use: one kernel for every parameter instead of a Python loop over
# them (a full-FT MiniLM step on CPU: see the README). torch has fused kernels on more devices (mps, xpu)
# that no test here runs on; they get torch's own default (foreach where it has it).
FUSED_DEVICES = ("cuda", "cpu")


def optimizer_kernel(parameters: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's implementation for these parameters: fused where the device has the kernel, else foreach.

    Both are the same update as the per-parameter loop (to float rounding), and a state dict saved by any
    of the three loads into the others, so a checkpoint resumes whichever kernel wrote it.
    """
    devices = {p.device.type for p in parameters}
    if len(devices) == 1 and devices <= set(FUSED_DEVICES) and all(p.is_floating_point() for p in parameters):
        return {"fused": True}
    return {"foreach": True} if devices <= {"cuda"} else {}


@dataclass
class Progress:
    """Where training stands: the start of a fresh run, or what the last checkpoint recorded."""

    step: int = 0
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0


def resume(
    model,
    tokenizer,  # the run's tokenizer folder (or a tokenizer): what a rewritten best checkpoint names
    optimizer,
    scheduler,
    resume_from: Path,
    checkpoint_dir: Path,
    total_steps: int,
    batches_per_epoch: int,
    meta: dict,
) -> Progress:
    """Weights, optimizer, scheduler and every RNG as they were at the checkpoint's step, and where it was."""
    restore_weights(model, resume_from)
    state = load_training_state(resume_from, optimizer, scheduler)  # also every RNG, as it was at that step
    if state["total_steps"] != total_steps:
        raise RuntimeError(
            f"checkpoint {resume_from} plans {state['total_steps']} steps, this run {total_steps}: "
            "not the same run"
        )
    where = Progress(
        state["step"],
        state["best_step"],
        state["best_metrics"],
        state["evaluations"],
        state["epoch"],
        state["batch_in_epoch"],
        state.get("train_seconds", 0.0),
    )
    if where.batch_in_epoch >= batches_per_epoch:
        where.epoch, where.batch_in_epoch = where.epoch + 1, 0
    problem = verify(checkpoint_dir / "best") if where.best_step is not None else None
    if (
        problem and where.best_step == where.step
    ):  # the weights just restored are the best ones: write them again
        log.warning(
            "checkpoint %s is unusable (%s); rewritten from %s", checkpoint_dir / "best", problem, resume_from
        )
        save_checkpoint(
            checkpoint_dir / "best", model, tokenizer, dict(meta, step=where.step, metrics=where.best_metrics)
        )
    elif problem:
        log.warning(
            "checkpoint %s is unusable (%s); the best is chosen again from the evaluations still to come",
            checkpoint_dir / "best",
            problem,
        )
        where.best_step, where.best_metrics = None, {}
    return where


def fit(
    model,
    tokenizer,
    data: TaskData,
    cfg: RunConfig,
    tracker: Tracker,
    *,
    device: torch.device,
    precision: str,
    checkpoint_dir: Path,
    on_evaluation: EvaluationHook | None = None,
    resume_from: Path | None = None,
) -> FitResult:
    train_cfg, objective = cfg.train, cfg.objective
    num_labels = len(data.label_names)
    torch.manual_seed(train_cfg.seed)
    model.to(device).train()
    task = get_task(cfg)
    multiple = 8 if device.type == "cuda" else None
    collator = task.collator(tokenizer, pad_to_multiple_of=multiple)
    train_collator = task.train_collator(tokenizer, cfg, model, pad_to_multiple_of=multiple)
    pin = device.type == "cuda"
    full_validation = data.splits["validation"]
    validation = validation_subset(full_validation, train_cfg.eval_subset, train_cfg.seed)
    subset = len(validation) if len(validation) < len(full_validation) else None
    val_loader = make_loader(
        validation, collator, train_cfg.eval_batch_size, shuffle=False, pin_memory=pin, sort_by_length=True
    )
    steps_per_epoch, total_steps = plan_steps(len(data.splits["train"]), cfg)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    meter = MemoryMeter(device)
    meta = {"method": cfg.method.name, "base_model": cfg.model.name_or_path, "label_names": data.label_names}
    # once per run; every checkpoint below names this folder instead of holding a copy
    tokenizer_dir = save_tokenizer(run_tokenizer_dir(checkpoint_dir), tokenizer)

    status = "completed"
    where = Progress()
    if resume_from is not None:
        where = resume(
            model,
            tokenizer_dir,
            optimizer,
            scheduler,
            resume_from,
            checkpoint_dir,
            total_steps,
            math.ceil(len(data.splits["train"]) / train_cfg.batch_size),
            meta,
        )
    step, best_step, best_metrics, evaluations = (
        where.step,
        where.best_step,
        where.best_metrics,
        where.evaluations,
    )
    start_epoch, skip_batches, seconds_before = where.epoch, where.batch_in_epoch, where.train_seconds
    resumed_from_step = step if resume_from is not None else None
    loss_since_log = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device, dtype=torch.int64)
    steps_since_log, tokens_logged, overhead = 0, 0, 0.0
    started = last_log = time.perf_counter()
    bar = progress(total_steps, f"{cfg.method.name} training", initial=step)

    def is_better(metrics: dict[str, float]) -> bool:
        if best_step is None:
            return True
        return ranks_better(
            metrics[objective.metric], best_metrics[objective.metric], metric_direction(objective.metric)
        )

    if (
        resume_from is not None
        and on_evaluation is not None
        and evaluations
        and evaluations[-1]["step"] == step
    ):
        # the kill may have come between this evaluation's checkpoint and the pruner's answer: ask again
        stop = on_evaluation(step, {k: v for k, v in evaluations[-1].items() if k != "step"})
        if stop and step < total_steps:  # a run that reached its last step is complete
            status = "pruned"
    batches_per_epoch = math.ceil(len(data.splits["train"]) / train_cfg.batch_size)
    epochs = (
        range(start_epoch, math.ceil(total_steps / steps_per_epoch))
        if status == "completed" and step < total_steps
        else ()
    )
    for epoch in epochs:
        skip = skip_batches if epoch == start_epoch else 0
        loader = make_loader(
            data.splits["train"],
            train_collator,
            train_cfg.batch_size,
            shuffle=True,
            seed=train_cfg.seed,
            epoch=epoch,
            pin_memory=pin,
            num_workers=train_cfg.num_workers,
            skip_batches=skip,
            group_by_length=train_cfg.group_by_length,
        )
        for batch_index, batch in enumerate(loader, start=skip):
            # forward/backward on one micro-batch; the loss is averaged over the accumulation window
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            packed_tokens = batch.pop(PACKED_TOKENS, None)  # a packed batch has no attention mask
            with autocast(device, precision):
                loss = model(**batch).loss / train_cfg.grad_accum
            scaler.scale(loss).backward()
            loss_since_log += loss.detach().float()
            tokens += batch["attention_mask"].sum() if packed_tokens is None else packed_tokens
            end_of_epoch = batch_index + 1 == batches_per_epoch
            if (batch_index + 1) % train_cfg.grad_accum and not end_of_epoch:
                continue

            # optimizer step
            if train_cfg.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            after_optimizer_step(
                model, step
            )  # AdaLoRA re-allocates ranks from the gradients: before zero_grad
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since_log += 1
            bar.update()

            # logging: the only host sync of the hot loop
            if step % train_cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                train_loss = loss_since_log.item() / steps_since_log
                if not math.isfinite(train_loss):
                    raise TrainingDiverged(
                        f"train.lr={train_cfg.lr:g}: training diverged, loss is {train_loss} at step {step}"
                    )
                token_count = int(tokens.item())
                elapsed = now - last_log
                meter.sample()
                tracker.log_metrics(
                    {
                        "train_loss": train_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "step_time_s": elapsed / steps_since_log,
                        "tokens_per_s": (token_count - tokens_logged) / elapsed,
                        "epoch": epoch + batch_index / batches_per_epoch,
                    },
                    step,
                )
                bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
                loss_since_log.zero_()
                steps_since_log, tokens_logged, last_log = 0, token_count, time.perf_counter()

            # validation, checkpoints, and the sweep's chance to stop a hopeless trial
            if (train_cfg.eval_every and step % train_cfg.eval_every == 0) or step == total_steps:
                pause = time.perf_counter()
                with evaluation_pass():  # an out-of-memory error here names train.eval_batch_size
                    metrics = task.evaluate(
                        model, val_loader, device, precision, num_labels, desc=f"validation @ {step}"
                    )
                evaluations.append({"step": step, **metrics})
                tracker.log_metrics({f"val_{k}": v for k, v in metrics.items() if k != "samples"}, step)
                if is_better(metrics):
                    best_step, best_metrics = step, metrics
                    save_checkpoint(
                        checkpoint_dir / "best", model, tokenizer_dir, dict(meta, step=step, metrics=metrics)
                    )
                trainer_state = {
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_index + 1,
                    "total_steps": total_steps,
                    "best_step": best_step,
                    "best_metrics": best_metrics,
                    "evaluations": evaluations,
                    "train_seconds": seconds_before + pause - started - overhead,
                }
                save_checkpoint(
                    checkpoint_dir / "last",
                    model,
                    tokenizer_dir,
                    dict(meta, step=step, metrics=metrics),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    trainer_state=trainer_state,
                    keep_previous=checkpoint_dir / "previous",
                )
                stop = on_evaluation is not None and on_evaluation(step, metrics)
                stop = stop and step < total_steps  # the last step's evaluation is reported, never pruned
                overhead += time.perf_counter() - pause
                last_log += time.perf_counter() - pause  # keep eval time out of the step-time figures
                if stop:
                    status = "pruned"
                    break
            if step >= total_steps:
                break
        if status == "pruned" or step >= total_steps:
            break
    bar.close()
    train_seconds = seconds_before + time.perf_counter() - started - overhead

    subset_metrics = {}
    if subset is not None and status == "completed":
        # the checkpoint the subset chose, scored on the whole split: the objective a trial reports is
        # always a whole-split figure, comparable with any other trial's whatever its subset
        subset_metrics = best_metrics
        if best_step != step:
            restore_weights(model, checkpoint_dir / "best")
        full_loader = make_loader(
            full_validation,
            collator,
            train_cfg.eval_batch_size,
            shuffle=False,
            pin_memory=pin,
            sort_by_length=True,
        )
        with evaluation_pass():
            best_metrics = task.evaluate(
                model, full_loader, device, precision, num_labels, desc=f"validation (all) @ {best_step}"
            )
        full = {f"val_full_{k}": v for k, v in best_metrics.items() if k != "samples"}
        tracker.log_metrics(full, best_step)

    steps_here = step - (resumed_from_step or 0)
    return FitResult(
        status=status,
        steps=step,
        total_steps=total_steps,
        best_step=best_step,
        best_metrics=best_metrics,
        evaluations=evaluations,
        train_seconds=train_seconds,
        seconds_per_step=(train_seconds - seconds_before) / max(steps_here, 1),
        tokens_per_second=int(tokens.item()) / max(train_seconds - seconds_before, 1e-9),
        memory=meter.figures(),
        checkpoints={"best": str(checkpoint_dir / "best"), "last": str(checkpoint_dir / "last")},
        resumed_from_step=resumed_from_step,
        eval_subset=subset,
        subset_metrics=subset_metrics,
    )
