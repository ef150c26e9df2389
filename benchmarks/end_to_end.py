"""End-to-end wall clock of a default run and of one quick-sweep trial: this checkout against a baseline.

    python benchmarks/end_to_end.py                              # against 8440ff5, the code before issue 13
    python benchmarks/end_to_end.py --max-steps 40 --repeats 2   # a reduced budget: 40 optimizer steps
    python benchmarks/end_to_end.py --cases default --baseline-ref HEAD~3

Cases, each the command a user types, in a fresh working folder (so MLflow's default ./mlflow.db and the
outputs start empty), with tracking on:

- ``default``: ``python -m lora_sweep`` (README line 1) with the targets it had before issue 14
  (``method.targets=attention_qv``), ``train.max_steps`` cut with ``--max-steps``;
- ``quick``: ``python -m lora_sweep --multirun sweeps=quick`` reduced to its first trial (the enqueued
  r=8 attention_qv lr 2e-3 LoRA trial): ``hydra.sweeper.n_trials=1``, no baseline, no report.

The baseline is the tree of ``--baseline-ref`` (``git archive`` into a temp folder, so nothing is added to
the repository's worktree list), run with PYTHONPATH pointing at it; this checkout runs with PYTHONPATH
at its root. Rounds run both sides of every case in turn (baseline, current, baseline, current, ...).
Each side has its own data and model cache (LORA_SWEEP_CACHE), filled by a first, cold round that is
shown but left out of the ratios (``--no-cold-round`` skips it: then the first round tokenizes).
Ratios are current / baseline per round (below 1: faster now); the metrics of both sides must match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REF = "8440ff5"
QUICK_ONE_TRIAL = [
    "--multirun",
    "sweeps=quick",
    "hydra.sweeper.n_trials=1",
    "hydra.sweeper.baseline.n_trials=0",
    "hydra.sweeper.report.enabled=false",
]
# the default run as the baseline's defaults had it: since issue 14 method=lora targets all_linear by default,
# and a like-for-like comparison of the code needs one config on both sides
DEFAULT_AS_BEFORE = ["method.targets=attention_qv"]
METRICS = ("objective", "best_val_accuracy", "best_val_loss", "test_accuracy", "test_loss", "steps")


def baseline_tree(ref: str, root: Path) -> Path:
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = root / f"baseline-{sha[:10]}"
    if not (tree / "lora_sweep").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "-C", str(REPO), "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {sha} failed")
    return tree


def command_for(case: str, max_steps: int | None, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "lora_sweep"]
    command += QUICK_ONE_TRIAL if case == "quick" else DEFAULT_AS_BEFORE
    if max_steps is not None:
        command.append(f"train.max_steps={max_steps}")
    return command + extra


def measure(tree: Path, case: str, args, workdir: Path, cache: Path) -> dict:
    workdir.mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
        "LORA_SWEEP_CACHE": str(cache),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = command_for(case, args.max_steps, args.overrides)
    with (workdir / "log.txt").open("w") as log:
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
        )
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {workdir} (exit {done.returncode}): see log.txt")
    records = sorted((workdir / "outputs").rglob("record.json"))  # mlruns/ holds a copy as an artifact
    if len(records) != 1:
        raise RuntimeError(f"{workdir}: expected one run record, found {len(records)}")
    record = json.loads(records[0].read_text())
    metrics = record.get("metrics", {})
    return {
        "seconds": seconds,
        "status": record.get("status"),
        "metrics": {k: metrics[k] for k in METRICS if k in metrics},
        "train_seconds": metrics.get("train_seconds"),
        "setup_seconds": record.get("params", {}).get("setup_seconds"),
    }


def same_metrics(a: dict, b: dict) -> bool:
    """Equal keys and values; a loss may differ in its last digits when batches sum in another order."""
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6) for k in a)


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline-ref", default=BASELINE_REF, help=f"git ref of the baseline ({BASELINE_REF})"
    )
    parser.add_argument("--cases", default="default,quick", help="comma-separated: default, quick")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (after the cold one)")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="train.max_steps for every run (default: none)"
    )
    parser.add_argument("--no-cold-round", action="store_true", help="measure from the first round on")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp folder (kept)")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, both sides")
    args = parser.parse_args(argv)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in ("default", "quick")]
    if unknown:
        print(f"error: --cases={','.join(unknown)}: no such case (cases: default, quick)", file=sys.stderr)
        return 2
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="lora_sweep-e2e-"))).resolve()
    trees = {"baseline": baseline_tree(args.baseline_ref, root), "current": REPO}
    print(f"workdir {root}\nbaseline {args.baseline_ref} at {trees['baseline']}\ncurrent {REPO}", flush=True)
    rounds = range(0 if args.no_cold_round else -1, args.repeats)
    rows: list[dict] = []
    for number in rounds:
        for case in cases:
            for side, tree in trees.items():
                workdir = root / f"round{number + 1}-{case}-{side}"
                row = {"round": number, "case": case, "side": side}
                row.update(measure(tree, case, args, workdir, root / f"cache-{side}"))
                rows.append(row)
                label = "cold" if number < 0 else f"round {number + 1}"
                print(
                    f"{label:>8} {case:>8} {side:>9}: {row['seconds']:7.1f} s "
                    f"(training {row['train_seconds'] or 0:.1f} s) {row['status']} {row['metrics']}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return report(rows, cases)


def report(rows: list[dict], cases: list[str]) -> int:
    mismatched = 0
    print()
    for case in cases:
        measured = [r for r in rows if r["case"] == case and r["round"] >= 0]
        base = {r["round"]: r for r in measured if r["side"] == "baseline"}
        ours = {r["round"]: r for r in measured if r["side"] == "current"}
        pairs = [(ours[n], base[n]) for n in sorted(base) if n in ours]
        wall = [a["seconds"] / b["seconds"] for a, b in pairs]
        train = [
            a["train_seconds"] / b["train_seconds"]
            for a, b in pairs
            if a["train_seconds"] and b["train_seconds"]
        ]
        print(
            f"{case}: current / baseline wall clock (min / median / max over {len(pairs)} rounds) "
            f"{spread(wall)}"
            f" (speed-up {spread([1 / w for w in wall])}); training time {spread(train)}"
        )
        for side in ("baseline", "current"):
            seen = {
                json.dumps(r["metrics"], sort_keys=True)
                for r in rows
                if r["case"] == case and r["side"] == side
            }
            print(f"  {side} metrics: {'; '.join(sorted(seen))}")
        everything = [r["metrics"] for r in rows if r["case"] == case]
        if not all(same_metrics(everything[0], m) for m in everything[1:]):
            mismatched += 1
            print(f"  MISMATCH: the {case} runs do not all give the same metrics")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
