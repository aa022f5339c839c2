"""A sweep's report on Weights & Biases: one run in the sweep's group with every edit as a table row,
the aggregated tables, the figures and an artifact of the results; and a saved dashboard."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from cpds_exp.evaluation.frame import display_name, present, varying
from cpds_exp.loggers import CODE_KEY, code_version, resolve_wandb_mode, wandb_settings
from cpds_exp.naming import safe_name
from cpds_exp.records import CUT_TOTAL, ITERATION, METRIC, SCORE_GRAD_NORM, SELECTOR_ROUND

TASKS = ("cat2dog", "cat2cow", "cat2pig")
#: the report run's per-edit table (the dashboard shows it by this name)
EDITS_TABLE = "edits"
#: what identifies an edit in the table, before any other swept key
EDIT_COLUMNS = ("image", "source_prompt", "target_prompt", "method", "selector", "lr", "task")
#: what came of it, after its images
OUTCOME_COLUMNS = ("clip", "lpips", "status")
#: the figures' kinds (the first part of their names) as captions say them
FIGURE_TITLES = {"grid": "Comparison grid", "tradeoff": "CLIP–LPIPS trade-off", "lr_ablation": "lr ablation",
                 "selector_accuracy": "Selector accuracy over training rounds"}


def figure_key(name: str) -> str:
    """The logged key of a report figure: ``grid/cat2dog`` → ``figures/grid/cat2dog``."""
    return f"figures/{name}"


def figure_caption(name: str) -> str:
    """"Comparison grid: cat → dog" for ``grid/cat2dog``; a sweep without tasks says "all edits"."""
    kind, _, task = name.partition("/")
    title = FIGURE_TITLES.get(kind, kind)
    if not task:
        return title
    return f"{title}: {'all edits' if task == 'all' else display_name('task', task)}"


def edits_table(frame: pd.DataFrame) -> Any:
    """One row per edit (``records_frame``): what it was, any other key the sweep varies, its source
    and result images, CLIP, LPIPS and status, to browse and filter thousands of edits in W&B."""
    import wandb

    identity = [*EDIT_COLUMNS, *(key for key in varying(frame) if key not in EDIT_COLUMNS)]
    table = wandb.Table(columns=[*identity, "source", "result", *OUTCOME_COLUMNS])
    for row in frame.to_dict("records"):
        images = [wandb.Image(path) if present(path) else None
                  for path in (row.get("source_path"), row.get("result_path"))]
        table.add_data(*(present(row.get(key)) for key in identity), *images,
                       *(present(row.get(key)) for key in OUTCOME_COLUMNS))
    return table


def _in_artifact(path: Path, root: Path, folder: str) -> str:
    """A file's name in the results artifact: ``folder/`` plus its path under ``root``."""
    relative = Path(os.path.relpath(path, root))
    return (Path(folder) / (relative if ".." not in relative.parts else path.name)).as_posix()


def results_artifact(report: dict[str, Any], sweep_name: str) -> Any:
    """The sweep's results as one artifact: every edit's summary.json under ``records/`` (as laid out
    in the sweep), the report's tables and every figure (PNG and PDF) under ``report/``."""
    import wandb

    artifact = wandb.Artifact(safe_name(f"{sweep_name}-results"), type="sweep-results",
                              metadata={"sweep_name": sweep_name, "counts": report["counts"]})
    folders = [Path(record["_dir"]).resolve() for record in report["records"]]
    sweep_root = Path(os.path.commonpath(folders)) if folders else Path(".")
    for summary in (folder / "summary.json" for folder in folders):
        artifact.add_file(str(summary), name=_in_artifact(summary, sweep_root, "records"))
    out = Path(report["out"]).resolve()
    report_files = [*report.get("files", {}).values(), *(p for paths in report["figures"].values() for p in paths)]
    for path in sorted({Path(p).resolve() for p in report_files}):
        artifact.add_file(str(path), name=_in_artifact(path, out, "report"))
    return artifact


def log_report(report: dict[str, Any], sweep_name: str, project: str = "cpds-exp", entity: str | None = None,
               mode: str = "auto", run_dir: str | None = None) -> str:
    """Log the report as one run (job type ``report``) in the sweep's group: the per-edit table, the
    aggregated table and the paired differences, each figure (PNG) with its caption, and the
    sweep's records and report files as a ``sweep-results`` artifact. Returns the run's id."""
    import wandb

    run = wandb.init(project=project, entity=entity, group=sweep_name, job_type="report", name=f"{sweep_name}-report",
                     mode=resolve_wandb_mode(mode), dir=run_dir, settings=wandb_settings(),
                     config={"sweep_name": sweep_name, "rows": report.get("rows"), CODE_KEY: code_version()},
                     reinit="finish_previous")
    logged = {EDITS_TABLE: edits_table(report["frame"])}
    logged.update({key: wandb.Table(dataframe=report[key]) for key in ("table", "differences") if len(report[key])})
    logged.update({figure_key(name): wandb.Image(str(path), caption=figure_caption(name))
                   for name, paths in report["figures"].items() for path in paths if Path(path).suffix == ".png"})
    run.log(logged)
    run.log_artifact(results_artifact(report, sweep_name))
    run.summary["counts"] = report["counts"]
    run.finish()
    return run.id


def sweep_tasks(frame: pd.DataFrame) -> list[str | None]:
    """The tasks a sweep's edits ran, in order; [None] when they ran none (one section for all edits)."""
    tasks = sorted(frame["task"].dropna().unique()) if "task" in frame else []
    return list(tasks) or [None]


def build_dashboard(sweep_name: str, project: str = "cpds-exp", entity: str = "",
                    tasks: Sequence[str | None] = TASKS, by: str = "method"):
    """A W&B report for a sweep (its W&B group): per task (None: all the sweep's edits), CLIP and
    LPIPS bars per ``by`` value (mean ± s.e.), the CLIP–LPIPS trade-off, the loss and
    selector-accuracy curves and the edits' images; then the report run's per-edit table,
    aggregated table and figures. ``.save()`` publishes it (online)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    group_key = f"{by}.name" if by in ("method", "selector") else by
    in_sweep = expr.Metric("Group") == sweep_name
    blocks: list[Any] = [wr.H1(f"cpds-exp: {sweep_name}"),
                         wr.P(f"Edits of the sweep '{sweep_name}', grouped by {by}. CLIP ↑, LPIPS ↓ (mean ± s.e.).")]
    for task in tasks:
        filters = expr.And(in_sweep) if task is None else expr.And(in_sweep, expr.Config("task.name") == task)
        task = task or "all edits"
        runset = wr.Runset(entity=entity, project=project, name=task, groupby=[group_key], filters=filters)
        blocks += [wr.H2(task), wr.PanelGrid(runsets=[runset], panels=[
            wr.BarPlot(title=f"{task}: CLIP score", metrics=[METRIC.format("clip")], groupby=group_key,
                       groupby_aggfunc="mean", groupby_rangefunc="stderr"),
            wr.BarPlot(title=f"{task}: LPIPS", metrics=[METRIC.format("lpips")], groupby=group_key,
                       groupby_aggfunc="mean", groupby_rangefunc="stderr"),
            wr.ScatterPlot(title=f"{task}: CLIP–LPIPS trade-off", x=wr.SummaryMetric(METRIC.format("clip")),
                           y=wr.SummaryMetric(METRIC.format("lpips"))),
            wr.LinePlot(title="CUT loss", x=ITERATION, y=[CUT_TOTAL], groupby=group_key),
            wr.LinePlot(title="score gradient norm", x=ITERATION, y=[SCORE_GRAD_NORM], groupby=group_key),
            wr.LinePlot(title="selector accuracy (unseen data)", x=ITERATION,
                        y=[SELECTOR_ROUND.format("accuracy"), SELECTOR_ROUND.format("balanced_accuracy")],
                        groupby=group_key),
            wr.MediaBrowser(title="source | result", media_keys=["result"]),
        ])]
    report_run = wr.Runset(entity=entity, project=project, name="report",
                           filters=expr.And(in_sweep, expr.Metric("JobType") == "report"))
    figures = [figure_key(f"{kind}/{task}") for task in tasks for kind in ("grid", "tradeoff", "lr_ablation")]
    blocks += [wr.H2("Every edit, the tables and the figures"),
               wr.PanelGrid(runsets=[report_run], panels=[
                   wr.WeavePanelSummaryTable(table_name=EDITS_TABLE),
                   wr.WeavePanelSummaryTable(table_name="table"),
                   wr.MediaBrowser(title="figures", media_keys=[*figures, figure_key("selector_accuracy")])])]
    return wr.Report(project=project, entity=entity, title=f"cpds-exp {sweep_name}", blocks=blocks)
