"""Experiment loggers: a thin interface in front of Weights & Biases, and a no-op for ``logger=none``."""
from __future__ import annotations

import functools
import logging
import netrc
import os
import subprocess
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from PIL import Image

from cpds_exp import __version__
from cpds_exp.errors import CpdsError
from cpds_exp.records import ITERATION, ITERATION_TIME, SELECTOR_ROUND, TIMESTEP, cut_layer

log = logging.getLogger(__name__)

#: the run config's key for :func:`code_version`
CODE_KEY = "code_version"

#: How the run page summarises each logged key (first matching pattern; unlisted keys keep their
#: last value): losses by their best and last value, accuracies by their best and mean round,
#: times by their mean; the timestep is a random draw, so no summary of it means anything.
SUMMARIES = (
    (TIMESTEP, "none"),
    (ITERATION_TIME, "mean"),
    (cut_layer("*"), "min,last"),           # the CUT loss: cut/total and per layer
    (SELECTOR_ROUND.format("round"), "max"),
    (SELECTOR_ROUND.format("loss"), "min,last"),
    (SELECTOR_ROUND.format("accuracy"), "max,mean"),
    (SELECTOR_ROUND.format("balanced_accuracy"), "max,mean"),
    (SELECTOR_ROUND.format("*"), "mean"),
)


def summary_of(key: str) -> str | None:
    """The W&B summary of a logged key (``define_metric(summary=...)``), None for the last value."""
    return next((summary for pattern, summary in SUMMARIES if fnmatchcase(key, pattern)), None)


def snapshot_caption(iteration: int, source_prompt: str, target_prompt: str) -> str:
    """"iteration 50: a cat → a dog"."""
    return f"iteration {iteration}: {source_prompt} → {target_prompt}"


def result_caption(scores: Mapping[str, float | None]) -> str:
    """"source | result, CLIP 0.2512, LPIPS 0.1034" (a score that was not measured is left out)."""
    measured = [f"{name.upper()} {value:.4f}" for name, value in scores.items() if value is not None]
    return ", ".join(["source | result", *measured])


def git_commit(folder: str | Path) -> str | None:
    """The short commit of the checkout holding ``folder``, with "+dirty" when tracked files have
    changes since it; None outside a checkout or without git (an installed package)."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--abbrev=7", "--dirty=+dirty", "--exclude=*"],
                                   cwd=folder, capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() or None


@functools.cache
def code_version() -> dict[str, str | None]:
    """What code made a run (in its W&B config): the package version and, from a checkout, its commit."""
    return {"version": __version__, "commit": git_commit(Path(__file__).parent)}


def sweep_folder_name() -> str | None:
    """The folder name of the Hydra multirun this process runs (None outside one): the W&B group of
    a sweep run without ``sweep_name``, the same name its report uses."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).resolve().name


@functools.cache
def warn_once(message: str) -> None:
    """A warning that would repeat for every edit of a sweep, printed once per process."""
    log.warning(message)


def wandb_settings(verbose: bool = False) -> Any:
    """W&B prints a banner and a run summary for every run, which would bury a sweep's log under
    thousands of them: runs are silent unless ``verbose`` (then W&B's own defaults and WANDB_SILENT apply)."""
    import wandb

    return wandb.Settings() if verbose else wandb.Settings(silent=True)


class RunLogger:
    """What the app reports during a run; the default implementation drops everything."""

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Values of one iteration; ``metrics[ITERATION]`` says which."""

    def log_image(self, key: str, image: Image.Image, iteration: int, caption: str) -> None:
        pass

    def set_summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class NullLogger(RunLogger):
    """``logger=none``: nothing leaves the run directory."""

    def __init__(self, run_config: Mapping[str, Any] | None = None, run_dir: str | None = None,
                 run_name: str | None = None):
        pass


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in netrc for the W&B host (never prompts)."""
    if os.getenv("WANDB_API_KEY"):
        return True
    host = urlparse(os.getenv("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.getenv("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto``: WANDB_MODE if set, else online with credentials, else offline with a notice."""
    if mode != "auto":
        if mode not in ("online", "offline", "disabled"):
            raise CpdsError(f"logger.mode={mode!r} is unknown: use auto, online, offline or disabled")
        return mode
    if os.getenv("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if has_wandb_credentials():
        return "online"
    warn_once("W&B: not logged in, logging offline into each run's wandb/ folder (run `wandb login`, "
              "then `wandb sync` those folders)")
    return "offline"


class WandbLogger(RunLogger):
    """Logs to a W&B run whose config is the resolved Hydra config plus the code version (and the
    dataset artifact, when the dataset has one); everything is plotted against the iteration."""

    def __init__(self, project: str = "cpds-exp", entity: str | None = None, mode: str = "auto",
                 group: str | None = None, tags: list[str] | None = None, job_type: str | None = None,
                 verbose: bool = False, run_config: Mapping[str, Any] | None = None, run_dir: str | None = None,
                 run_name: str | None = None):
        import wandb

        from cpds_exp.wandb_artifacts import DATASET_KEY, dataset_artifact, declare_dataset

        self._wandb = wandb
        config = {**(run_config or {}), CODE_KEY: code_version()}
        dataset = dataset_artifact(config)
        if dataset:
            config[DATASET_KEY] = dataset
        try:
            self.run = wandb.init(project=project, entity=entity, mode=resolve_wandb_mode(mode),
                                  group=group or sweep_folder_name(), tags=list(tags or []), job_type=job_type,
                                  config=config, dir=run_dir, name=run_name, settings=wandb_settings(verbose),
                                  reinit="create_new")
        except wandb.errors.UsageError as err:
            raise CpdsError(f"W&B refused to start ({str(err).splitlines()[0]}): run `wandb login`, "
                            "or use logger.mode=offline or logger=none") from err
        # the iteration is the x-axis of every key, so values may arrive in any order
        self.run.define_metric(ITERATION)
        self.run.define_metric("*", step_metric=ITERATION)
        self._seen: set[str] = {ITERATION}
        if dataset:
            declare_dataset(self.run, dataset)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        for key in sorted(set(metrics) - self._seen):
            summary = summary_of(key)
            if summary:
                self.run.define_metric(key, step_metric=ITERATION, summary=summary)
        self._seen.update(metrics)
        self.run.log(dict(metrics))

    def log_image(self, key: str, image: Image.Image, iteration: int, caption: str) -> None:
        self.run.log({ITERATION: iteration, key: self._wandb.Image(image, caption=caption)})

    def set_summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
