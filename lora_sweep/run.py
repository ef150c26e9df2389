"""One fine-tune from a validated config to a complete record: check, set up, train, test, record.

Everything that can be wrong with the config is checked before a single weight is read
(:func:`lora_sweep.prepare.prepare`: the model's config and module names on the meta device, the target
preset, the data columns and splits).
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
import warnings
from pathlib import Path

from lora_sweep import reuse
from lora_sweep.checkpoint import (
    RESUME_FILES,
    drop_training_state,
    remove_stale_saves,
    restore_weights,
    resume_point,
    run_tokenizer_dir,
)
from lora_sweep.config import RunConfig
from lora_sweep.data import make_loader
from lora_sweep.errors import ConfigError
from lora_sweep.methods import apply_method, is_mergeable
from lora_sweep.methods import derived_params as method_params
from lora_sweep.methods import run_name as method_run_name
from lora_sweep.models import (
    BasePlan,
    count_parameters,
    dtypes_of,
    load_base_model,
    matmul_parameters,
    pick_device,
    pick_precision,
    plan_base,
    set_gradient_checkpointing,
    wants_gradient_checkpointing,
)
from lora_sweep.oom import evaluation_pass, guard_memory

# _PREPARED: tests clear the per-process caches through this module
from lora_sweep.prepare import _PREPARED, Prepared, cache_key, prepare  # noqa: F401
from lora_sweep.record import RECORD_FILE, RunRecord, load_run_record, read_record

# _MODELS: tests clear the per-process caches through this module
from lora_sweep.reuse import _MODELS  # noqa: F401
from lora_sweep.schema import flatten, to_dict
from lora_sweep.system import (
    device_description,
    directory_size,
    git_info,
    model_flops_utilization,
    package_versions,
    peak_flops,
    training_flops_per_token,
    weights_size,
)
from lora_sweep.tasks import get_task
from lora_sweep.tracking import Tracker, make_tracker
from lora_sweep.train import EvaluationHook, FitResult, fit, plan_steps

log = logging.getLogger(__name__)
# PEFT still calls a transformers property deprecated for v6; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def model_key(cfg: RunConfig, prepared: Prepared, plan: BasePlan | None = None) -> str:
    """What makes two trials' base models the same: source, revision, labels, seed, and how it is loaded
    (dtype, quantization, compute dtype, device, attention)."""
    return cache_key(
        prepared.spec.source,
        cfg.model.revision,
        prepared.data.label_names,
        cfg.train.seed,
        plan.key() if plan is not None else None,
    )


def base_model(cfg: RunConfig, prepared: Prepared, plan: BasePlan | None = None) -> tuple[object, bool]:
    """The pretrained model with a fresh head, exactly as loading it from disk under this seed gives.

    The first call loads it; a sweep's later trials take the same object back, as the trial before gave
    it back (:mod:`lora_sweep.reuse`: adapters unloaded, whatever the trial changed restored). The caller
    owns the model until it gives it back. Returns (model, whether it was reused).
    """
    from transformers import set_seed

    model = reuse.take(model_key(cfg, prepared, plan))
    if model is not None:
        return model, True
    reuse.drop_all()  # one base model per process: the old one's memory is free before the new one loads
    set_seed(cfg.train.seed)
    model = load_base_model(
        prepared.spec, cfg.model, prepared.data.label_names, prepared.tokenizer.pad_token_id, plan
    )
    return model, False


def run_name(cfg: RunConfig) -> str:
    return cfg.tracking.run_name or method_run_name(cfg.method, cfg.train.lr)


def derived_params(
    cfg: RunConfig, prepared: Prepared, device: str, precision: str, plan: BasePlan | None = None
) -> dict[str, object]:
    params: dict[str, object] = {
        "run.device": device,
        "run.precision": precision,
        **({f"run.{k}": v for k, v in dtype_params(plan).items()} if plan is not None else {}),
        "model.model_type": prepared.spec.model_type,
        "data.num_labels": len(prepared.data.label_names),
    }
    params.update({f"data.size.{name}": size for name, size in prepared.data.sizes.items()})
    params.update(method_params(cfg.method, prepared.targets))
    return params


def dtype_params(plan: BasePlan) -> dict[str, object]:
    """The frozen and trainable weights' dtypes (record params; MLflow params under run.)."""
    return {
        "base_dtype": plan.base_dtype,
        "trainable_dtype": plan.trainable_dtype,
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
    }


FINAL_STATES = ("completed", "pruned")
RUN_UID_TAG = "lora_sweep.run_uid"


def earlier_attempt(cfg: RunConfig, config_tree: dict) -> dict | None:
    """The record an earlier, interrupted attempt of this very run left in its output folder, if any.

    A sweep relaunches a killed trial into the same folder; a single run resumes when pointed at its old
    folder (``hydra.run.dir=...``). A folder holding a *different* config is refused, never overwritten.
    """
    path = Path(cfg.output_dir) / RECORD_FILE
    if not cfg.train.resume or not path.is_file():
        return None
    previous = read_record(path)
    mine = {k: v for k, v in config_tree.items() if k != "output_dir"}
    theirs = {k: v for k, v in previous.get("config", {}).items() if k != "output_dir"}
    if mine != theirs:
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ConfigError(
            "output_dir",
            str(cfg.output_dir),
            f"holds a run of another config (differs in {', '.join(changed)}); "
            "pick another folder, or set train.resume=false to overwrite it",
        )
    return previous


def run(
    cfg: RunConfig,
    *,
    tracker: Tracker | None = None,
    on_evaluation: EvaluationHook | None = None,
    extra_tags: dict[str, str] | None = None,
    run_name_prefix: str = "",
) -> RunRecord:
    """Train one configuration end to end. Raises on failure, after recording it as failed."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-file load/save bars; the run shows its own
    started = time.perf_counter()
    prepared = prepare(cfg)
    device = pick_device(cfg.train.device)
    plan = plan_base(cfg.model, cfg.method.adapter, device)
    precision = pick_precision(cfg.train.precision, device, plan)
    previous = earlier_attempt(cfg, to_dict(cfg))
    remove_stale_saves(Path(cfg.output_dir) / "checkpoints")  # a folder of this config: ours to tidy
    remove_stale_saves(Path(cfg.output_dir))  # a killed save of the run's tokenizer
    if previous is not None and previous.get("status") in FINAL_STATES:
        return _nothing_to_do(cfg, previous)
    recipe = Recipe(cfg, prepared, device, precision, previous, plan)
    recipe.start_record()
    recipe.start_tracking(tracker, extra_tags or {}, run_name_prefix)
    try:
        recipe.setup_model(started)
        result = recipe.train(on_evaluation)
        recipe.evaluate_best(result)
        recipe.record_results(result)
        recipe.save_and_finish(result)
        return recipe.record
    except BaseException as err:
        recipe.record_failure(err)
        # the finished frames of the traceback hold the trial's optimizer, activations and adapter: let
        # them go now, not when the caller drops the exception (the OOM-across-trials of other tools)
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        recipe.release_model()


def _nothing_to_do(cfg: RunConfig, previous: dict) -> RunRecord:
    log.info("%s already holds a %s run of this config: nothing to do", cfg.output_dir, previous["status"])
    make_tracker(cfg.tracking).close_run(previous.get("mlflow", {}).get("run_id"), previous["status"])
    return load_run_record(previous)


class Recipe:
    """One run's steps, in the order :func:`run` calls them; the state they share lives here."""

    def __init__(
        self,
        cfg: RunConfig,
        prepared: Prepared,
        device,
        precision: str,
        previous: dict | None,
        plan: BasePlan | None = None,
    ):
        self.cfg, self.prepared, self.device, self.precision = cfg, prepared, device, precision
        self.plan = plan or plan_base(cfg.model, cfg.method.adapter, device)
        self.task = get_task(cfg)
        self.output_dir = Path(cfg.output_dir)
        self.previous = previous
        self.resume_from = resume_point(self.output_dir / "checkpoints") if previous is not None else None
        self.record: RunRecord | None = None
        self.tracker: Tracker | None = None
        self.model = None
        self.base: reuse.TrialBase | None = None
        self.forgetting: dict[str, float] = {}
        self.test: dict[str, float] = {}

    def start_record(self) -> None:
        """record.json says what this run is before anything can fail half way."""
        cfg, prepared, previous = self.cfg, self.prepared, self.previous
        record = RunRecord(
            output_dir=str(self.output_dir),
            config=to_dict(cfg),
            versions=package_versions(),
            git=git_info(),
            device=device_description(self.device),
            precision=self.precision,
        )
        if previous is not None:
            record.started_at = previous.get("started_at", record.started_at)
            resume = {
                "at": time.time(),
                "checkpoint": str(self.resume_from) if self.resume_from else None,
                "previous_status": previous.get("status"),
            }
            record.resumes = [*previous.get("resumes", []), resume]
        record.data = {
            "sizes": prepared.data.sizes,
            "label_names": prepared.data.label_names,
            "cache": str(prepared.data.cache_path),
            "from_cache": prepared.data.from_cache,
            # what train.max_length cut: {split: {rows, of, share, median_tokens}}; rows dropped for length
            "max_length": cfg.train.max_length,
            "truncated": prepared.data.lengths.get("truncated", {}),
            "dropped": prepared.data.lengths.get("dropped", {}),
        }
        record.params = {"target_modules": prepared.targets, **dtype_params(self.plan)}
        # the MLflow run's identity, on disk before the run exists: an attempt killed between creating the
        # run and writing its id is continued by the next one (found by this tag), never doubled
        earlier_uid = (previous or {}).get("mlflow", {}).get("run_uid")
        record.mlflow = {"run_uid": earlier_uid or uuid.uuid4().hex}
        record.write()
        self.record = record

    def start_tracking(
        self, tracker: Tracker | None, extra_tags: dict[str, str], run_name_prefix: str
    ) -> None:
        """The MLflow run (or the one a killed attempt began), its params and tags."""
        cfg, record = self.cfg, self.record
        tags = {
            "lora_sweep.method": cfg.method.name,
            "lora_sweep.model": cfg.model.name,
            "lora_sweep.data": cfg.data.name,
            "lora_sweep.output_dir": str(self.output_dir.resolve()),
            "mlflow.source.git.commit": record.git.get("commit") or "unknown",
            **{f"version.{k}": v for k, v in record.versions.items()},
            **cfg.tags,
            **extra_tags,
            RUN_UID_TAG: record.mlflow["run_uid"],
        }
        params = {
            **flatten(record.config),
            **derived_params(cfg, self.prepared, str(self.device), self.precision, self.plan),
        }
        earlier_run = (self.previous or {}).get("mlflow", {})
        try:
            tracker = tracker if tracker is not None else make_tracker(cfg.tracking)
            same_store = earlier_run.get("tracking_uri") == tracker.location
            tracker.start(
                run_name_prefix + run_name(cfg),
                params,
                tags,
                resume_run_id=earlier_run.get("run_id") if same_store else None,
                identity=(RUN_UID_TAG,),
            )
        except BaseException as err:  # an unusable tracking store: the record must not stay "running"
            record.finish("failed", error=_one_line(err))
            raise
        self.tracker = tracker
        record.mlflow = {**record.mlflow, "run_id": tracker.run_id, "tracking_uri": tracker.location}
        record.write()  # the run id on disk at once: a killed attempt is continued in the same MLflow run
        tracker.log_dict(record.config, "config.yaml")

    def setup_model(self, started: float) -> None:
        """The base model (reused in a sweep), what the task measures before training, then the method."""
        from transformers import set_seed

        cfg, prepared = self.cfg, self.prepared
        model, reused_model = base_model(cfg, prepared, self.plan)
        self.model = model
        in_sweep = cfg.sweep.study_name is not None  # a single run keeps no copy of anything
        self.base = reuse.TrialBase(
            model_key(cfg, prepared, self.plan), model, cfg.method, in_sweep, self.device
        )
        checkpointing = wants_gradient_checkpointing(cfg.train.gradient_checkpointing, self.plan, model)
        set_gradient_checkpointing(model, checkpointing)
        self.forgetting = self.task.before_training(
            model, prepared.tokenizer, cfg, prepared.spec.source, self.device, self.precision
        )
        set_seed(
            cfg.train.seed
        )  # LoRA's A matrices come from the RNG: same state whether the base was reused or not
        total_steps = plan_steps(len(prepared.data.splits["train"]), cfg)[1]
        self.model = model = apply_method(model, cfg.method, prepared.spec, prepared.targets, total_steps)
        setup_seconds = time.perf_counter() - started
        reused = prepared.reused and reused_model
        log.info(
            "setup %.1f s (%s)",
            setup_seconds,
            "reused the loaded model and tokenized data" if reused else "loaded model and data",
        )
        counts = count_parameters(model)
        flops_per_token = training_flops_per_token(matmul_parameters(model), counts["trainable_params"])
        self.record.params.update(
            counts,
            parameter_dtypes=dtypes_of(model),  # as loaded: what plan_base asked for, checked
            model_flops_per_token=flops_per_token,
            setup_seconds=setup_seconds,
            setup_reused=reused,
            mergeable=is_mergeable(model) if cfg.method.adapter else None,
        )
        self.tracker.log_metrics({**counts, "setup_seconds": setup_seconds}, step=0)

    def train(self, on_evaluation: EvaluationHook | None) -> FitResult:
        if self.resume_from is not None:
            log.info("resuming from %s", self.resume_from)

        def fit_here() -> FitResult:
            return fit(
                self.model,
                self.prepared.tokenizer,
                self.prepared.data,
                self.cfg,
                self.tracker,
                device=self.device,
                precision=self.precision,
                checkpoint_dir=self.output_dir / "checkpoints",
                on_evaluation=on_evaluation,
                resume_from=self.resume_from,
            )

        result = guard_memory(self.cfg, self.device, fit_here, self.model)
        if self.record.resumes:
            self.record.resumes[-1]["from_step"] = result.resumed_from_step
        return result

    def evaluate_best(self, result: FitResult) -> None:
        """With the checkpoint validation chose: the held-out test split (touched once, here), and what the
        task measures after training (causal LMs: forgetting, what the model now says)."""
        cfg, task, prepared = self.cfg, self.task, self.prepared
        if result.status != "completed":
            return
        if cfg.evaluate_test or task.after_training_needs_best:
            restore_weights(self.model, Path(result.checkpoints["best"]))
        if cfg.evaluate_test:
            loader = make_loader(
                prepared.data.splits["test"],
                task.collator(prepared.tokenizer),
                cfg.train.eval_batch_size,
                shuffle=False,
                sort_by_length=True,
            )

            def test_pass() -> dict[str, float]:
                with evaluation_pass("the test split evaluation"):
                    return task.evaluate(
                        self.model,
                        loader,
                        self.device,
                        self.precision,
                        len(prepared.data.label_names),
                        desc="test (best checkpoint)",
                    )

            self.test = guard_memory(cfg, self.device, test_pass, self.model)
        after, self.record.generations = task.after_training(
            self.model,
            prepared.tokenizer,
            cfg,
            prepared.data.prompts,
            self.device,
            self.precision,
            self.output_dir,
        )
        self.forgetting.update(after)
        if self.record.generations:
            self.tracker.log_table(self.record.generations, "generations.json")

    def record_results(self, result: FitResult) -> None:
        """Metrics and checkpoint sizes into the record and MLflow (sizes of what stays on disk: the resume
        state is dropped when the run ends)."""
        cfg, record = self.cfg, self.record
        sizes = {
            name: directory_size(Path(path), skip=RESUME_FILES) for name, path in result.checkpoints.items()
        }
        weights = {name: weights_size(Path(path)) for name, path in result.checkpoints.items()}
        record.evaluations = result.evaluations
        tokenizer_dir = run_tokenizer_dir(self.output_dir / "checkpoints")
        record.checkpoints = {
            **result.checkpoints,
            "tokenizer": str(tokenizer_dir),  # saved once per run; each checkpoint's manifest names it
            "tokenizer_bytes": directory_size(tokenizer_dir),
            "best_step": result.best_step,
            "size_bytes": sizes,
            "weights_bytes": weights,
            "best_size_mb": sizes["best"] / 2**20,
            "best_weights_mb": weights["best"] / 2**20,
        }
        record.metrics = {
            "objective": result.best_metrics[cfg.objective.metric],
            "objective_metric": cfg.objective.metric,
            # which rows the objective was measured on: with train.eval_subset the passes that chose the
            # checkpoint saw a subset; a completed run then scores that checkpoint on the whole split
            "objective_rows": result.best_metrics.get("samples"),
            "objective_split": (
                "validation"
                if result.eval_subset is None or result.subset_metrics
                else f"validation subset ({result.eval_subset} rows; pruned before the whole-split pass)"
            ),
            **{f"subset_val_{k}": v for k, v in result.subset_metrics.items() if k != "samples"},
            **{f"best_val_{k}": v for k, v in result.best_metrics.items() if k != "samples"},
            **{f"test_{k}": v for k, v in self.test.items() if k != "samples"},
            "steps": result.steps,
            "total_steps": result.total_steps,
            "train_seconds": result.train_seconds,
            "seconds_per_step": result.seconds_per_step,
            "tokens_per_second": result.tokens_per_second,
            **self.utilization(result.tokens_per_second),
            **result.memory,
            **self.forgetting,
        }
        numbers = {k: v for k, v in record.metrics.items() if isinstance(v, (int, float))}
        self.tracker.set_tags({"lora_sweep.mfu_peak": record.metrics["mfu_peak_source"]})
        self.tracker.log_metrics(
            numbers
            | {"checkpoint_best_mb": sizes["best"] / 2**20, "checkpoint_weights_mb": weights["best"] / 2**20}
        )

    def utilization(self, tokens_per_second: float) -> dict[str, object]:
        """MFU: the model's training FLOPs per token times tokens/s, over the device's peak for the
        precision trained in (None where no peak is known, with the reason in ``mfu_peak_source``)."""
        peak = peak_flops(self.record.device or "", self.precision)
        flops_per_token = self.record.params["model_flops_per_token"]
        return {
            "mfu": model_flops_utilization(flops_per_token, tokens_per_second, peak["flops"]),
            "model_flops_per_token": flops_per_token,
            "mfu_peak_tflops": peak["flops"] / 1e12 if peak["flops"] else None,
            "mfu_peak_source": peak["source"],
        }

    def save_and_finish(self, result: FitResult) -> None:
        if self.cfg.tracking.log_checkpoints:
            # where the checkpoints' manifests expect it (../../tokenizer): a downloaded artifact tree
            # loads as the run folder does
            self.tracker.log_artifacts(run_tokenizer_dir(self.output_dir / "checkpoints"), "tokenizer")
            self.tracker.log_artifacts(Path(result.checkpoints["best"]), "checkpoints/best")
            # the resume state (optimizer moments, RNG) is only useful next to the run; keep it local
            self.tracker.log_artifacts(
                Path(result.checkpoints["last"]), "checkpoints/last", skip=RESUME_FILES
            )
        self.record.finish(result.status)
        drop_training_state(self.output_dir / "checkpoints")  # finished: only a resume needed it
        self.tracker.log_dict(self.record.__dict__, "record.json")
        self.tracker.end(result.status)

    def record_failure(self, err: BaseException) -> None:
        status = "killed" if isinstance(err, KeyboardInterrupt) else "failed"
        message = _one_line(err)
        self.record.finish(status, error=message)
        self.tracker.set_tags(
            {"lora_sweep.error": message[:5000], "lora_sweep.traceback": traceback.format_exc()[-4000:]}
        )
        self.tracker.log_dict(self.record.__dict__, "record.json")
        self.tracker.end(status)

    def release_model(self) -> None:
        """The base back to the cache for the next trial (or dropped), and the trial's memory freed."""
        model, self.model = self.model, None
        if self.base is not None:
            self.base.give_back(model)
            self.base = None
        del model
        reuse.free_memory()


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
