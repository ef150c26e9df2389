"""What the literature says to look for, on the sweep's own numbers (lora_sweep/report/literature.py):
metric vs rank per target set, LoRA's best learning rate against full fine-tuning's, forgetting over the
replicates; and a written report that names no path of the machine it was written on.

The sweep here is small and real: every trial is a real in-process run of the tiny BERT (records,
checkpoints), told to a real Optuna journal as the sweeper tells it (its user attributes); only the order of
launching is by hand, so the whole module costs a few short runs instead of a sweep in a subprocess."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO, trial_row, trials_frame

STUDY = "lit"
QUICK = [
    "train.batch_size=16",
    "train.eval_batch_size=32",
    "train.max_length=16",
    "train.log_every=2",
    "train.max_steps=6",
    "train.eval_every=0",
    "tracking=none",
    "tracking.system_metrics=false",
]
SEARCH = [(2, "all_linear", 1e-2), (16, "all_linear", 1e-2)]  # (rank, targets, lr): both sides of r = 8
FULL_LR = 1e-3
SEEDS = (1, 2)
# out-of-task text for the forgetting measure (the report's default, 256 NYT snippets, is for real models)
REFERENCE = ["the story is flat and the cast is dull", "a lovely warm film", "quite a boring movie"] * 4
LR_RANGE = {"low": 1e-3, "high": 1e-2, "centre": 1e-2 / 3**0.5, "baseline_lr": FULL_LR, "baseline_trial": 0}


def _compose(root: Path, tiny_bert_dir: Path, tiny_csv: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_sweep import cli

    cli.register_resolvers()

    def compose(name: str, *overrides: str):
        base = [
            f"output_dir={root / 'outputs' / 'sweeps' / STUDY / name}",
            f"data.cache_dir={root / 'cache'}",
            "model=local",
            f"model.name_or_path={tiny_bert_dir}",
            "data=local",
            f"data.path={tiny_csv}",
            *QUICK,
        ]
        with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
            return cli.to_run_config(hydra_compose(config_name="config", overrides=base + list(overrides)))

    return compose


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, tiny_bert_dir, tiny_csv):
    """A finished sweep: 2 LoRA trials, 1 full fine-tuning trial, the chosen LoRA and the full trial
    replicated with seeds 1 and 2; its journal, as the sweeper leaves it. Returns (root, Sweep)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from lora_sweep.report.collect import open_sweep
    from lora_sweep.run import run
    from lora_sweep.sweep.settings import JOURNAL_PREFIX
    from lora_sweep.sweep.study import open_storage
    from lora_sweep.sweep.trials import pick_best, trials_table

    root = tmp_path_factory.mktemp("literature")
    compose = _compose(root, tiny_bert_dir, tiny_csv)
    journal = JOURNAL_PREFIX + str(root / "outputs" / "sweeps" / STUDY / "optuna.journal")
    (root / "outputs" / "sweeps" / STUDY).mkdir(parents=True)
    storage = open_storage(journal)

    def tell(study, name, overrides, params, distributions, attrs=None):
        done = run(compose(name, *overrides))
        record = Path(done.output_dir) / "record.json"
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=done.metrics["objective"],
                user_attrs={"record": str(record), "output_dir": done.output_dir, **(attrs or {})},
            )
        )
        return overrides

    search = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    search.set_user_attr("lora_sweep", {"metric": "accuracy"})
    space = {
        "method.r": IntDistribution(1, 16),
        "method.targets": CategoricalDistribution(["attention_qv", "all_linear"]),
        "train.lr": FloatDistribution(1e-3, 1e-2, log=True),
    }
    launched = []
    for number, (r, targets, lr) in enumerate(SEARCH):
        overrides = [f"method.r={r}", f"method.targets={targets}", f"train.lr={lr}", "evaluate_test=false"]
        launched.append(
            tell(
                search,
                f"search-{number:03d}",
                overrides,
                {"method.r": r, "method.targets": targets, "train.lr": lr},
                space,
            )
        )
    baseline = optuna.create_study(study_name=f"{STUDY}-baseline", storage=storage, direction="maximize")
    full = ["method=full", f"train.lr={FULL_LR}", "evaluate_test=false"]
    tell(baseline, "baseline-000", full, {"train.lr": FULL_LR}, {"train.lr": FloatDistribution(1e-4, 1e-2)})

    # the sweep's last phase: the chosen LoRA configuration and the best full FT one with new seeds
    chosen = int(pick_best(trials_table(search, baseline), "accuracy", "maximize").row["trial"])
    replicates = optuna.create_study(study_name=f"{STUDY}-replicates", storage=storage, direction="maximize")
    number = 0
    for label, source, overrides in (("lora", chosen, launched[chosen]), ("full", 0, full)):
        for seed in SEEDS:
            again = [o for o in overrides if not o.startswith("evaluate_test=")]
            tell(
                replicates,
                f"replicate-{number:03d}",
                [*again, f"train.seed={seed}", "evaluate_test=true"],
                {"train.seed": seed},
                {"train.seed": IntDistribution(seed, seed)},
                {
                    "replicate_of": label,
                    "source_study": STUDY if label == "lora" else f"{STUDY}-baseline",
                    "source_trial": source,
                    "seed": seed,
                },
            )
            number += 1
    search.set_user_attr("lora_sweep_lr_range", LR_RANGE)
    return root, open_sweep(STUDY, journal, root / "outputs" / "sweeps" / STUDY)


@pytest.fixture(scope="module")
def written(small_sweep, tmp_path_factory):
    """The report of the small sweep, with its checkpoint sections (test split, forgetting, export)."""
    from lora_sweep.report import build_report

    root, sweep = small_sweep
    out = root / "reports" / STUDY
    summary = build_report(sweep, out, checkpoints=True, reference=REFERENCE)
    return root, out, summary, json.loads((out / "report.json").read_text())


def _record(out: Path, row: dict) -> dict:
    return json.loads((out / row["record"]).read_text())


def test_the_rank_table_holds_the_best_metric_per_target_set_and_rank(written):
    _, out, _, report = written
    rank = report["rank"]
    trials = [r for r in report["trials"] if r["role"] == "search" and r["state"] == "complete"]
    expected = {}
    for row in trials:  # each trial's own record: its rank, its targets, its best validation metric
        record = _record(out, row)
        key = (record["config"]["method"]["targets"], record["config"]["method"]["r"])
        expected[key] = max(expected.get(key, -math.inf), record["metrics"]["objective"])
    assert {(row["targets"], row["r"]): row["best"] for row in rank["table"]} == expected
    markdown = (out / "report.md").read_text()
    assert "## Rank: is r > 8 flat?" in markdown

    verdicts = rank["verdicts"]
    assert set(verdicts) == {"all_linear"}
    low, high = expected[("all_linear", 2)], expected[("all_linear", 16)]
    noise = rank["noise"]
    # the replicates ran: the yardstick is the chosen LoRA's 95% interval over its seeds
    assert noise["value"] == pytest.approx(report["replicates"]["validation"]["lora"]["ci95"])
    assert "replicate" in noise["source"]
    points = 100 * (high - low)
    assert f"best at r > 8 vs best at r <= 8: {points:+.1f} points" in verdicts["all_linear"]
    word = "within" if abs(high - low) <= noise["value"] else "beyond"
    assert f"{word} {noise['source']}" in verdicts["all_linear"]
    assert verdicts["all_linear"] in markdown
    page = (out / "report.html").read_text()  # the same lines, as HTML
    assert "<h2>Rank: is r &gt; 8 flat?</h2>" in page and "<th>r=16</th>" in page


def test_the_learning_rate_ratio_of_the_best_lora_trial_to_the_best_full_ft_trial(written):
    _, out, _, report = written
    lr = report["learning_rate"]
    search = [r for r in report["trials"] if r["role"] == "search" and r["state"] == "complete"]
    best = sorted(search, key=lambda r: (-r["val_metric"], r["trial"]))[0]
    assert lr["lora"] == {"trial": best["trial"], "lr": pytest.approx(1e-2)}
    assert lr["full"] == {"trial": 0, "lr": pytest.approx(FULL_LR)}
    assert lr["ratio"] == pytest.approx(10.0)
    assert lr["range"] == pytest.approx(LR_RANGE)
    markdown = (out / "report.md").read_text()
    assert "LoRA's best learning rate is 10x full fine-tuning's" in markdown
    assert "the literature expects about 10x" in markdown
    assert "full fine-tuning trial #0's lr 1.00e-03" in markdown
    assert "searched 1.00e-03 to 1.00e-02" in markdown
    # one full-FT learning rate: the ratio is against that one value, and the report says so
    assert "only one full fine-tuning learning rate was tried" in markdown
    # 1e-2 is the top of the derived range: the report says the best may lie beyond it
    assert lr["at_edge"] == "high" and "sits at the high end of that range" in markdown


def test_forgetting_over_the_replicates_has_intervals_and_the_paired_difference(written, small_sweep):
    from lora_sweep.report import checkpoints as ck
    from lora_sweep.report.replicates import interval, paired, replicate_records

    root, out, _, report = written
    forgetting = report["forgetting_replicates"]
    assert forgetting["measure"] == "representation_similarity" and forgetting["seeds"] == list(SEEDS)
    found = replicate_records(small_sweep[1].replicates)
    chosen = report["chosen"]["trial"]
    lora = [found[("lora", chosen)][s] for s in SEEDS]
    full = [found[("full", 0)][s] for s in SEEDS]
    by_hand = ck.representation_similarity(
        {"a": lora[0], "b": full[1]}, REFERENCE
    )  # two of them, measured anew
    assert forgetting["lora"]["values"][0] == pytest.approx(by_hand["a"], abs=1e-6)
    assert forgetting["full"]["values"][1] == pytest.approx(by_hand["b"], abs=1e-6)
    a, b = forgetting["lora"]["values"], forgetting["full"]["values"]
    assert {k: forgetting["lora"][k] for k in ("mean", "ci95", "n")} == pytest.approx(interval(a))
    assert forgetting["paired"]["difference"] == pytest.approx(paired(a, b)["difference"])
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Forgetting", 1)[1].split("\n## ", 1)[0]
    assert f"over the replicate seeds {list(SEEDS)}" in section
    d = forgetting["paired"]["difference"]
    assert f"{d['mean']:+.4f} ± {d['ci95']:.4f}" in section


def test_without_replicates_the_report_says_the_forgetting_interval_needs_them(small_sweep, tmp_path):
    from lora_sweep.report import build_report
    from lora_sweep.report.literature import replicate_forgetting
    from lora_sweep.report.render import checkpoint_lines

    note = replicate_forgetting(None, 0, 0, None, "representation_similarity", ["a dull film"])
    assert note == "the interval needs replicates: run the sweep with hydra.sweeper.report.replicates=N"
    section = "\n".join(
        checkpoint_lines(
            {
                "metric": "accuracy",
                "forgetting": {"reference_texts": 1, "cosine_similarity_to_base": {"lora #0": 0.9}},
                "forgetting_replicates_note": note,
            }
        )
    )
    assert note in section.split("## Forgetting", 1)[1]
    # left out: the rank question is judged against the report's tolerance
    _, sweep = small_sweep
    summary = build_report(sweep, tmp_path / "none", checkpoints=False, replicates=0)
    assert "replicates" not in summary and "forgetting_replicates" not in summary
    assert summary["rank"]["noise"] == {"value": 0.005, "source": "the report's tolerance"}


def _machine_paths(root: Path) -> set[str]:
    paths = {str(root), str(root.resolve()), str(Path.home()), str(REPO), os.getcwd()}
    return {p for p in paths if len(p) > 1}


def test_no_file_the_report_writes_names_a_path_of_this_machine(written, tmp_path_factory):
    root, out, _, report = written
    base = tmp_path_factory.getbasetemp()  # the tiny model and data live here too
    forbidden = _machine_paths(root) | {str(base), str(base.resolve())}
    written_files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in written_files}
    assert {
        "report.md",
        "report.html",
        "report.json",
        "metric_vs_rank.svg",
        "best/merged/config.json",
    } <= set(names)
    assert "best/adapter/adapter_config.json" in names
    for path in written_files:  # every byte of every file: text, SVG, PNG metadata, safetensors headers
        data = path.read_bytes()
        for bad in forbidden:
            assert bad.encode() not in data, f"{path.relative_to(out)} holds {bad}"
    # and the paths it does hold, relative to the report folder, lead to the files they name
    chosen = report["chosen"]
    assert (out / chosen["checkpoint"]).is_dir() and (out / chosen["record"]).is_file()
    assert (out / report["export"]["adapter"] / "adapter_config.json").is_file()
    adapter = json.loads((out / "best" / "adapter" / "adapter_config.json").read_text())
    assert (out / adapter["base_model_name_or_path"] / "config.json").is_file()


def test_relative_paths_covers_storage_urls_tracking_uris_and_paths_inside_text(tmp_path):
    from lora_sweep.report import relative_paths

    out = tmp_path / "reports" / "s"
    value = {
        "storage": f"journal:{tmp_path}/outputs/sweeps/s/optuna.journal",
        "tracking": f"sqlite:///{tmp_path}/mlflow.db",
        "file": f"file://{tmp_path}/mlruns",
        "reason": f"FileNotFoundError: {tmp_path}/outputs/x/record.json is missing",
        "list": [str(tmp_path / "a"), "all_linear", "http://mlflow:5000", "1/2 of the rows"],
    }
    assert relative_paths(value, out) == {
        "storage": "journal:../../outputs/sweeps/s/optuna.journal",
        "tracking": "sqlite:///../../mlflow.db",
        "file": "file://../../mlruns",
        "reason": "FileNotFoundError: ../../outputs/x/record.json is missing",
        "list": ["../../a", "all_linear", "http://mlflow:5000", "1/2 of the rows"],
    }


# --- the parts computed from the trials table alone: hand-made tables -------------------------------------


def test_rank_verdicts_on_a_hand_made_table():
    from lora_sweep.report.literature import rank_summary

    table = trials_frame(
        trial_row(0, 0.80, 1, r=4.0, targets="mlp"),
        trial_row(1, 0.81, 1, r=8.0, targets="mlp"),
        trial_row(2, 0.90, 1, r=32.0, targets="mlp"),
        trial_row(3, 0.95, 1, r=64.0, targets="mlp", state="pruned"),  # did not finish: not counted
        trial_row(4, 0.84, 1, r=2.0, targets="qkv"),
        trial_row(5, 0.842, 1, r=16.0, targets="qkv"),
        trial_row(0, 0.92, 100, role="baseline"),
    )
    summary = rank_summary(table, "accuracy", "maximize", {"value": 0.005, "source": "the tolerance"})
    assert summary["verdicts"]["mlp"] == (
        "mlp: best at r > 8 vs best at r <= 8: +9.0 points (0.9000 at r=32 vs 0.8100 at r=8), beyond the "
        "tolerance (±0.5 points): higher rank helps"
    )
    assert summary["verdicts"]["qkv"] == (
        "qkv: best at r > 8 vs best at r <= 8: +0.2 points (0.8420 at r=16 vs 0.8400 at r=2), within the "
        "tolerance (±0.5 points): flat above r = 8, as in the LoRA paper"
    )
    assert [(row["targets"], row["r"]) for row in summary["table"]] == [
        ("mlp", 4),
        ("mlp", 8),
        ("mlp", 32),
        ("qkv", 2),
        ("qkv", 16),
    ]
    loss = table.assign(val_metric=1 - table["val_metric"])
    verdict = rank_summary(loss, "loss", "minimize", {"value": 0.005, "source": "the tolerance"})["verdicts"]
    assert verdict["mlp"].startswith("mlp: best at r > 8 vs best at r <= 8: -0.0900 (0.1000 at r=32 vs 0.19")
    assert verdict["mlp"].endswith("higher rank helps")


def test_learning_rate_summary_without_a_range_or_a_full_ft_trial():
    from lora_sweep.report.literature import learning_rate_summary

    table = trials_frame(
        trial_row(0, 0.80, 1, lr=2e-3),
        trial_row(1, 0.85, 1, lr=1e-3),
        trial_row(0, 0.90, 100, role="baseline", lr=2e-4),
        trial_row(1, 0.88, 100, role="baseline", lr=5e-5),
    )
    lr = learning_rate_summary(table, "maximize", None)
    assert lr["ratio"] == pytest.approx(5.0) and "range" not in lr
    assert lr["lora"]["trial"] == 1 and lr["full"]["trial"] == 0
    assert learning_rate_summary(table[table["role"] == "search"], "maximize", None) is None
    assert learning_rate_summary(pd.DataFrame(table.iloc[2:]), "maximize", None) is None


def test_the_intruder_counts_are_rendered_when_the_summary_has_them():
    from lora_sweep.report.render import checkpoint_lines

    intruders = {
        "lora": {"trial": "lora #3", "total": 3, "matrices": 4, "by_module": {"query": 2, "value": 1}},
        "full": {"trial": "full #0", "total": 1, "matrices": 4, "by_module": {"query": 0, "value": 1}},
        "k": 10,
        "eps": 0.5,
        "note": "counted on the matrices the LoRA trial adapted, the same ones for full fine-tuning",
    }
    text = "\n".join(checkpoint_lines({"metric": "accuracy", "intruders": intruders}))
    assert "## Intruder dimensions" in text
    assert (
        "An intruder dimension is one of the top 10 singular vectors of a fine-tuned weight matrix whose "
        "cosine similarity to every singular vector of the pre-trained matrix is below 0.5" in text
    )
    assert "| query | 2 | 0 |" in text and "| value | 1 | 1 |" in text
    assert "| all 4 matrices (top 10 of each: 40) | 3 | 1 |" in text
    assert intruders["note"] in text
    assert "## Intruder dimensions" not in "\n".join(checkpoint_lines({"metric": "accuracy"}))


def test_forgetting_over_replicates_of_causal_lms_reads_each_runs_perplexity_ratio(tmp_path):
    """A causal LM's forgetting is its own before/after perplexity on reference text, in its record: the
    report reads it for each replicate (nothing loaded), pairs the seeds and says which side forgets less."""
    import optuna

    from lora_sweep.report.literature import replicate_forgetting
    from lora_sweep.report.render import replicate_forgetting_lines

    study = optuna.create_study(study_name="lm-replicates")
    after = {("lora", 1): 11.0, ("lora", 2): 11.5, ("lora", 3): 11.2, ("full", 1): 15.0, ("full", 2): 16.0}
    for (side, seed), perplexity in after.items():
        path = tmp_path / f"{side}-{seed}.json"
        metrics = {"reference_perplexity_before": 10.0, "reference_perplexity_after": perplexity}
        record = {"status": "completed", "config": {"model": {"task": "causal_lm"}}, "metrics": metrics}
        path.write_text(json.dumps({**record, "checkpoints": {}}))
        attrs = {"replicate_of": side, "source_trial": 4 if side == "lora" else 0, "seed": seed}
        study.add_trial(optuna.trial.create_trial(value=0.0, user_attrs={"record": str(path), **attrs}))
    found = replicate_forgetting(study, 4, 0, None, "perplexity", None)
    assert found["seeds"] == [1, 2]  # seed 3 has no full fine-tuning twin
    assert found["lora"]["values"] == [1.1, 1.15] and found["full"]["values"] == [1.5, 1.6]
    assert found["paired"]["difference"]["mean"] == pytest.approx(-0.425)
    (line, _) = replicate_forgetting_lines({"forgetting_replicates": found})
    assert line.startswith("Perplexity after / before over the replicate seeds [1, 2] (paired by seed)")
    assert line.endswith("LoRA forgets less than full FT on out-of-task text.")
    assert replicate_forgetting(study, 9, 0, None, "perplexity", None).startswith(
        "no replicates of LoRA trial #9"
    )
