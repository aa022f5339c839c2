"""A single run that stops before writing anything of its own leaves no folder behind.

Hydra creates the run's folder, with .hydra/ and the job log, before the run starts, so every run
refused on bad input or offline used to leave one. :class:`RunFolderCallback` notes which folders
the run creates; the entry point calls :func:`remove_if_unused` on its way out.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cpds_exp.claims import CLAIM_FILE


@dataclass
class NewFolders:
    """The folders a single run creates (its run folder first, then those above it that did not exist)
    and what every run writes in its folder before it edits: Hydra's .hydra/ and job log, config.yaml
    and the edit's claim (a lock file)."""

    folders: list[Path]
    written_at_start: set[str]


#: the folders of the single run of this process, once it has started
_started: list[NewFolders] = []


class RunFolderCallback(Callback):
    """Notes the folders a single run is about to create (a sweep's job folders keep their FAILED files)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            run_folder = Path(config.hydra.run.dir).absolute()
        except OmegaConfBaseException:  # a bad name in the folder's interpolation: the run reports it itself
            return
        new = [folder for folder in (run_folder, *run_folder.parents) if not folder.exists()]
        _started[:] = [NewFolders(new, {".hydra", "config.yaml", f"{config.hydra.job.name}.log", CLAIM_FILE})]


def remove_if_unused() -> None:
    """Remove the run's new folders if it stopped (bad input, offline, Ctrl-C) before writing anything of
    its own; a folder holding anything else (an image, a record, W&B's files) stays, with those above it."""
    if not _started or not _started[0].folders:
        return
    run_folder, *parents = _started[0].folders
    try:
        if not {entry.name for entry in run_folder.iterdir()} <= _started[0].written_at_start:
            return
        shutil.rmtree(run_folder)
        for parent in parents:
            parent.rmdir()  # raises, and so stops, at the first one that is not empty
    except OSError:
        return
