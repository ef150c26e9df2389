"""``python -m lora_sweep.report <study name | MLflow parent run id> [--out reports] [--tolerance 0.005]``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_sweep.errors import LoraSweepError
from lora_sweep.sweep.settings import ReportConf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep.report", description=__doc__)
    parser.add_argument("sweep", help="study name (its folder under --sweeps-dir) or MLflow parent run id")
    parser.add_argument("--sweeps-dir", default="outputs/sweeps", type=Path)
    parser.add_argument("--out", default=ReportConf.dir, type=Path, help="the report goes to OUT/<study>/")
    parser.add_argument(
        "--tolerance", default=None, type=float, help="metric tolerance of the best-pick rule"
    )
    parser.add_argument(
        "--replicates",
        default=None,
        type=int,
        help="use the first N seeds of the replicates the sweep ran (default: all; 0: leave "
        "them out); the sweep trains them, with hydra.sweeper.report.replicates=N",
    )
    parser.add_argument(
        "--no-register", action="store_true", help="do not register the exported model in MLflow"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store holding the parent run (default: MLflow's)"
    )
    args = parser.parse_args(argv)
    from lora_sweep.report import build_report
    from lora_sweep.report.collect import locate
    from lora_sweep.report.select import DEFAULT_TOLERANCE

    try:
        sweep = locate(args.sweep, args.sweeps_dir, args.tracking_uri)
        out = args.out / sweep.study_name
        from lora_sweep.tracking import use_tracking_uri

        use_tracking_uri(args.tracking_uri)
        summary = build_report(
            sweep,
            out,
            DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
            replicates=args.replicates,
            register_as=None if args.no_register else sweep.study_name,
            tracking_uri=args.tracking_uri,
        )
    except LoraSweepError as err:
        from lora_sweep.secrets import redact

        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    print(summary["headline"])
    if summary["chosen"]:
        print(f"chosen: trial {summary['chosen']['trial']} ({summary['chosen']['checkpoint']})")
    print(f"report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
