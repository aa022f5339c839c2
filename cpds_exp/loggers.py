"""Experiment loggers: a thin interface in front of Weights & Biases, and a no-op for ``logger=none``."""
from __future__ import annotations

import logging
import netrc
import os
from typing import Any, Mapping
from urllib.parse import urlparse

from PIL import Image

from cpds_exp.errors import CpdsError

log = logging.getLogger(__name__)


class RunLogger:
    """What the app reports during a run; the default implementation drops everything."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None:
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
    log.warning("W&B: not logged in, logging offline (sync later with `wandb sync`, or run `wandb login`)")
    return "offline"


class WandbLogger(RunLogger):
    """Logs to a W&B run whose config is the resolved Hydra config."""

    def __init__(self, project: str = "cpds-exp", entity: str | None = None, mode: str = "auto",
                 group: str | None = None, tags: list[str] | None = None, job_type: str | None = None,
                 run_config: Mapping[str, Any] | None = None, run_dir: str | None = None, run_name: str | None = None):
        import wandb

        self._wandb = wandb
        try:
            self.run = wandb.init(project=project, entity=entity, mode=resolve_wandb_mode(mode), group=group,
                                  tags=list(tags or []), job_type=job_type, config=dict(run_config or {}),
                                  dir=run_dir, name=run_name, reinit="create_new")
        except wandb.errors.UsageError as err:
            raise CpdsError(f"W&B refused to start ({str(err).splitlines()[0]}): run `wandb login`, "
                            "or use logger.mode=offline or logger=none") from err

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None:
        self.run.log({key: self._wandb.Image(img) for key, img in images.items()}, step=step)

    def set_summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
