"""A sweep's report on Weights & Biases: its tables and grids as a run, and a saved dashboard."""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from cpds_exp.loggers import resolve_wandb_mode
from cpds_exp.records import CUT_TOTAL, METRIC, SCORE_GRAD_NORM, SELECTOR_ROUND

TASKS = ("cat2dog", "cat2cow", "cat2pig")


def log_report(report: dict[str, Any], sweep_name: str, project: str = "cpds-exp", entity: str | None = None,
               mode: str = "auto", run_dir: str | None = None) -> str:
    """Log the table and the paired differences (wandb.Tables), the grids and the accuracy plot as one
    run in the sweep's group."""
    import wandb

    run = wandb.init(project=project, entity=entity, group=sweep_name, job_type="report", name=f"{sweep_name}-report",
                     mode=resolve_wandb_mode(mode), dir=run_dir, config={"sweep_name": sweep_name,
                                                                          "rows": report["rows"]},
                     reinit="finish_previous")
    for key in ("table", "differences"):
        if len(report[key]):
            run.log({key: wandb.Table(dataframe=report[key])})
    run.log({f"grid/{task}": wandb.Image(grid) for task, grid in report["grids"].items()})
    if report["accuracy_plot"] is not None:
        run.log({"selector_accuracy": wandb.Image(Image.open(report["accuracy_plot"]))})
    run.summary["counts"] = report["counts"]
    run.finish()
    return run.id


def build_dashboard(sweep_name: str, project: str = "cpds-exp", entity: str = "", tasks: Sequence[str] = TASKS,
                    by: str = "method"):
    """A W&B report for a sweep: per task, CLIP and LPIPS bars per ``by`` value (mean ± s.e.), the
    loss and selector-accuracy curves, and the edits' images. ``.save()`` publishes it (online)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    group_key = f"{by}.name" if by in ("method", "selector") else by
    blocks: list[Any] = [wr.H1(f"cpds-exp: {sweep_name}"),
                         wr.P(f"Edits of the sweep '{sweep_name}', grouped by {by}. CLIP ↑, LPIPS ↓ (mean ± s.e.).")]
    for task in tasks:
        runset = wr.Runset(entity=entity, project=project, name=task, groupby=[group_key],
                           filters=expr.And(expr.Config("sweep_name") == sweep_name,
                                                    expr.Config("task.name") == task))
        blocks += [wr.H2(task), wr.PanelGrid(runsets=[runset], panels=[
            wr.BarPlot(title=f"{task}: CLIP score", metrics=[METRIC.format("clip")], groupby=group_key,
                       groupby_aggfunc="mean", groupby_rangefunc="stderr"),
            wr.BarPlot(title=f"{task}: LPIPS", metrics=[METRIC.format("lpips")], groupby=group_key,
                       groupby_aggfunc="mean", groupby_rangefunc="stderr"),
            wr.LinePlot(title="CUT loss", x="Step", y=[CUT_TOTAL], groupby=group_key),
            wr.LinePlot(title="score gradient norm", x="Step", y=[SCORE_GRAD_NORM], groupby=group_key),
            wr.LinePlot(title="selector accuracy (unseen data)", x="Step",
                        y=[SELECTOR_ROUND.format("accuracy"), SELECTOR_ROUND.format("balanced_accuracy")],
                        groupby=group_key),
            wr.MediaBrowser(title="source | result", media_keys=["result"]),
        ])]
    report_runs = wr.Runset(entity=entity, project=project, name="report",
                            filters=expr.And(expr.Config("sweep_name") == sweep_name))
    blocks += [wr.H2("Tables and comparison grids"),
               wr.PanelGrid(runsets=[report_runs], panels=[
                   wr.MediaBrowser(title="grids", media_keys=[f"grid/{task}" for task in tasks]),
                   wr.MediaBrowser(title="selector accuracy", media_keys=["selector_accuracy"])])]
    return wr.Report(project=project, entity=entity, title=f"cpds-exp {sweep_name}", blocks=blocks)
