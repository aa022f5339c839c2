"""Tables, grids and plots of a sweep, optionally on W&B: records.csv/.parquet (one line per edit),
table.md, table.csv and table.tex (mean ± 95% CI per method and task), differences.csv, figures.

    python scripts/report.py outputs/sweeps/table1 --paper            # report/ beside the jobs
    python scripts/report.py outputs/sweeps/table2 --rows selector --wandb
    python scripts/report.py outputs/sweeps/table1 --dashboard --entity me   # needs `wandb login`
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpds_exp.errors import CpdsError
from cpds_exp.loggers import has_wandb_credentials
from cpds_exp.evaluation.report import build_report, summary_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--rows", help="record field for the rows (default: method, selector or lr, whichever varies)")
    parser.add_argument("--columns", default="task", help="record field for the columns (default: task)")
    parser.add_argument("--paper", action="store_true", help="put the paper's numbers beside ours")
    parser.add_argument("--baseline", help="row value the others are compared with, image by image "
                        "(default: dds for methods, random for selectors)")
    parser.add_argument("--out", type=Path, help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument("--wandb", action="store_true", help="log the tables and grids to W&B, in the sweep's group")
    parser.add_argument("--dashboard", action="store_true", help="save a W&B report for the sweep (online)")
    parser.add_argument("--project", default="cpds-exp")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--mode", default="auto", help="W&B mode: auto, online, offline, disabled")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.sweep_dir, args.rows, args.columns, args.paper, args.out, args.baseline)
    except CpdsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report["markdown"])
    print(summary_line(report))
    if report["unreadable"]:
        print(f"{len(report['unreadable'])} unreadable record(s), left out (re-run the sweep to recompute them):",
              *report["unreadable"], sep="\n  ", file=sys.stderr)
    sweep_name = report["sweep_name"]
    if args.wandb:
        from cpds_exp.evaluation.wandb_report import log_report

        print(f"W&B run {log_report(report, sweep_name, args.project, args.entity, args.mode, str(report['out']))}")
    if args.dashboard:
        if not has_wandb_credentials():
            print("error: --dashboard needs W&B credentials: run `wandb login` first", file=sys.stderr)
            return 2
        from cpds_exp.evaluation.wandb_report import build_dashboard, sweep_tasks

        dashboard = build_dashboard(sweep_name, args.project, args.entity or "", sweep_tasks(report["frame"]),
                                    by=report["rows"])
        dashboard.save()
        print(f"dashboard: {dashboard.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
