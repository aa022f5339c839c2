"""The Hydra entry point behind `python run.py ...` and the `cpds-exp` console script."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cpds_exp.errors import CpdsError

log = logging.getLogger("cpds_exp")

# `${or_default:${sweep_name},...}`: a named sweep gets a fixed folder, an unnamed one a timestamp
OmegaConf.register_new_resolver("or_default", lambda value, default: default if value is None else value,
                                replace=True)

FAILED_MARKER = "FAILED"

#: conf/ beside the package (an editable install or a checkout); Hydra takes an absolute path.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the configured edits; a CpdsError is one line on stderr (exit 2 for a single run)."""
    from cpds_exp.app import run

    hydra_cfg = HydraConfig.get()
    marker = Path(hydra_cfg.runtime.output_dir) / FAILED_MARKER
    try:
        run(cfg, hydra_cfg.runtime.output_dir)
        marker.unlink(missing_ok=True)
    except CpdsError as err:
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.RUN:
            sys.exit(2)
        log.error("job %s failed: %s", hydra_cfg.job.num, err)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{err}\n")  # the other jobs go on; the sweep's exit status reports it


class FailedJobsCallback(Callback):
    """At the end of a multirun: one line naming the failed jobs, and exit status 2."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).glob(f"*/{FAILED_MARKER}"))
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep failed, e.g. {failed[0].parent.name}: "
                  f"{failed[0].read_text().strip()}", file=sys.stderr)
            sys.exit(2)
