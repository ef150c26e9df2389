"""From a composed Hydra config to a run, its summary, and the objective a sweeper optimises.

Function-local imports in this package keep the fast error path fast: a bad config fails (config.py,
schema.py) before torch, transformers, peft or mlflow are imported. They never hide an upward call: which
layer may import which is checked by tests/test_layers.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lora_sweep.config import RunConfig
from lora_sweep.errors import LoraSweepError
from lora_sweep.offline import package_dir
from lora_sweep.tasks import check as check_task

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def register_resolvers() -> None:
    """``${pkg_dir:module,sub,folder}``: a folder inside an installed package, found without importing it;
    ``${task_metric:kind}``: the default validation metric of a data kind."""
    if not OmegaConf.has_resolver("pkg_dir"):
        OmegaConf.register_new_resolver("pkg_dir", lambda module, *parts: package_dir(module, *parts))
    if not OmegaConf.has_resolver("task_metric"):  # objective.metric's default follows data.kind
        from lora_sweep.tasks import default_metric

        OmegaConf.register_new_resolver("task_metric", default_metric)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and validate; any problem becomes one ConfigError naming its key."""
    return check_task(RunConfig.from_hydra(cfg))


def summary(record) -> str:
    m, p = record.metrics, record.params
    lines = [
        f"lora_sweep: {record.status} {record.config['method']['name']} on {record.config['model']['name']} "
        f"/ {record.config['data']['name']}",
        f"  validation {m['objective_metric']}: {m['objective']:.4f} (best at step "
        f"{record.checkpoints['best_step']}/{m['total_steps']})"
        + (
            f"   test {m['objective_metric']}: {m['test_' + m['objective_metric']]:.4f}"
            if "test_" + m["objective_metric"] in m
            else ""
        ),
        *(
            [
                f"  perplexity: validation {m['best_val_perplexity']:.2f}"
                + (f", test {m['test_perplexity']:.2f}" if "test_perplexity" in m else "")
            ]
            if "best_val_perplexity" in m
            else []
        ),
        *length_lines(record.data),
        f"  trainable: {p['trainable_params']:,} of {p['total_params']:,} parameters "
        f"({100 * p['trainable_ratio']:.2f}%)",
        f"  time: {m['train_seconds']:.0f} s training, {m['seconds_per_step']:.2f} s/step, "
        f"{m['tokens_per_second']:.0f} tokens/s;"
        f" peak memory {m['peak_memory_mb']:.0f} MB"
        + (f"; MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""),
        f"  best checkpoint: {record.checkpoints['best']} ({record.checkpoints['best_size_mb']:.1f} MB)",
        *(
            [
                f"  forgetting: perplexity on out-of-task text {m['reference_perplexity_before']:.2f} "
                "before, "
                f"{m['reference_perplexity_after']:.2f} after"
            ]
            if "reference_perplexity_after" in m
            else []
        ),
        *[f"  generated: {g['prompt']!r} -> {g['response'][:100]!r}" for g in record.generations[:2]],
        f"  record: {Path(record.output_dir) / 'record.json'}",
    ]
    if record.mlflow.get("run_id"):
        lines.append(
            f"  mlflow: run {record.mlflow['run_id']} in {record.mlflow['tracking_uri']} (see it: mlflow ui)"
        )
    from lora_sweep.secrets import redact

    return redact("\n".join(lines))  # the tracking URI may carry a password


def length_lines(data: dict) -> list[str]:
    """What train.max_length cut, for the summary: only when it cut or dropped anything."""
    truncated = {n: c for n, c in data.get("truncated", {}).items() if c["rows"]}
    dropped = {n: c for n, c in data.get("dropped", {}).items() if c["rows"]}
    if not truncated and not dropped:
        return []
    parts = [f"{c['rows']:,} of {c['of']:,} {n} rows ({100 * c['share']:.0f}%)" for n, c in truncated.items()]
    text = f"  train.max_length={data.get('max_length')} truncated " + (", ".join(parts) or "no row")
    if dropped:
        gone = [
            f"{c['rows']:,} of {c['of']:,} {'rows' if n == 'all' else n + ' rows'} ({100 * c['share']:.0f}%)"
            for n, c in dropped.items()
        ]
        text += "; dropped (nothing left to learn) " + ", ".join(gone)
    return [text]


def main(cfg: DictConfig) -> float:
    """The Hydra task: one fine-tune. Returns the validation objective for sweepers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    single_run = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    command = " ".join(["python -m lora_sweep", *overrides])
    try:
        run_cfg = to_run_config(cfg)
        from lora_sweep.run import run

        # the run's description in the MLflow UI: how to run it again
        tags = {"mlflow.note.content": f"Reproduce with:\n\n    {command}", "lora_sweep.command": command}
        if (
            run_cfg.sweep.active
        ):  # a trial of the Optuna sweeper: report to its study, nest under its parent run
            from lora_sweep.sweep.trial import TrialBridge

            bridge = TrialBridge(run_cfg)
            with bridge.heartbeat():
                record = run(
                    run_cfg,
                    on_evaluation=bridge.on_evaluation,
                    extra_tags={**tags, **bridge.tags()},
                    run_name_prefix=f"{run_cfg.sweep.role}-{run_cfg.sweep.trial_number:03d} ",
                )
        else:
            record = run(run_cfg, extra_tags=tags)
    except LoraSweepError as err:
        if not single_run:
            raise  # a sweep records the trial as failed and goes on
        from tqdm import tqdm

        from lora_sweep.secrets import redact

        for bar in list(
            getattr(tqdm, "_instances", ())
        ):  # a bar left open by the failure: end its line first
            bar.close()
        print(f"error: {redact(str(err))}", file=sys.stderr)
        sys.exit(2)
    print(summary(record))
    return float(record.metrics["objective"])
