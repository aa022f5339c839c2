"""The Hydra entry point behind `python run.py ...` and the `cpds-exp` console script.

Every fault a user can meet ends in one line on stderr: bad input and faults of the environment
(an unwritable folder, a full disk) exit 2, Ctrl-C exits 130. A sweep runs all its jobs, then
exits 2 if any of them failed. A single run that stops before writing anything of its own leaves
no folder behind (run_folder.py). ``--help`` lists the config groups and experiments (conf/hydra/help/cpds_exp.yaml).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import socket
import sys
import typing
import uuid
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from cpds_exp.errors import CpdsError
from cpds_exp.naming import check_folder_name, job_folder
from cpds_exp.parent_watch import end_with_parent
from cpds_exp.run_folder import remove_if_unused
from cpds_exp.schema import register_configs

log = logging.getLogger("cpds_exp")


# `${folder_name:${sweep_name},...}`: a named sweep gets a fixed folder, an unnamed one a timestamp
OmegaConf.register_new_resolver("folder_name", lambda value, default, key="sweep_name": check_folder_name(
    default if value is None else value, key), replace=True)
register_configs()
OmegaConf.register_new_resolver("job_folder", lambda overrides: job_folder(list(overrides)), replace=True)

FAILED_MARKER = "FAILED"
#: "<pid>:<host>:<token>" of the sweep's process, set for its jobs (inherited by launcher workers)
SWEEP_ENV = "CPDS_EXP_SWEEP"
#: launchers whose jobs run as children of the sweep's process on this machine (not SLURM's)
LOCAL_WORKER_LAUNCHERS = ("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher."
                          "submitit_launcher.LocalLauncher")

#: conf/ beside the package in a checkout (or an editable install), else the copy inside the wheel.
CONFIG_DIR = next(str(path) for path in (Path(__file__).resolve().parent.parent / "conf",
                                          Path(__file__).resolve().parent / "conf") if (path / "config.yaml").is_file())

README = Path(CONFIG_DIR).parent / "README.md"


def group_options(group: str) -> list[str]:
    """A config group's options, without the typed schemas that Hydra also offers as options."""
    return [option for option in GlobalHydra.instance().config_loader().get_group_options(group)
            if not option.endswith("_schema")]


def help_groups(choices: DictConfig) -> str:
    """--help's config groups, one a line (group: options, the current choice starred)."""
    groups = sorted(key for key in choices if "/" not in key and "@" not in key and key != "experiment")
    width = max(map(len, groups)) + 1
    return "\n".join(f"{group + ':':<{width}} " + ", ".join(f"{option}*" if option == choices[group] else option
                                                           for option in group_options(group)) for group in groups)


OmegaConf.register_new_resolver("cpds_exp.groups", help_groups, replace=True)
OmegaConf.register_new_resolver("cpds_exp.options", lambda group: ", ".join(group_options(group)), replace=True)
OmegaConf.register_new_resolver("cpds_exp.readme", lambda: str(README) if README.is_file()
                                else "README.md of the cpds-exp sources", replace=True)

#: failures of jobs that ran in this process (the record when a FAILED file cannot be written)
_failed_here: list[str] = []


#: What Optuna's study raises for its best trial when no trial completed (every objective was None).
OPTUNA_NOTHING_FINISHED = "No trials are completed yet."


def fault_message(err: BaseException) -> str | None:
    """The one line for a fault a user can act on, or None for a bug (which keeps its traceback)."""
    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        if isinstance(cause, CpdsError):
            return str(cause)
    if isinstance(err, (HydraException, OmegaConfBaseException)):  # before OSError: some are IOErrors
        return config_error(err)
    if isinstance(err, ValueError) and str(err) == OPTUNA_NOTHING_FINISHED:  # the sweeper asks for the best trial
        return ("no trial of the search has an objective value (each one failed, or all its edits diverged): see "
                "the trials' FAILED files and summary.json in the sweep folder, and narrow hydra.sweeper.params")
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        return (f"file system error{where}: {err.strerror or err}; check that the inputs are readable, the output "
                "folder (hydra.run.dir / hydra.sweep.dir) is writable and its disk has free space")
    return None


def config_error(err: Exception) -> str:
    """Hydra's multi-line message about a bad override or group option, as one line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return f"invalid config: {type(err).__name__}"
    if "Available options" in str(err):  # an unknown group option: list the choices
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [line for line in lines[start + 1:] if "=" not in line and not line.endswith(":")]
        return f"invalid config: {lines[0]}; available: {', '.join(options)}"
    if isinstance(err.__cause__, ValidationError) and typed_field(err.__cause__):
        return f"invalid config: {wrong_type(err.__cause__)}"
    details = [line for line in lines[1:] if line.startswith(("Key ", "To append"))]
    cause = str(err.__cause__ or "").strip().splitlines()
    if cause and cause[0] not in lines:  # the schema's reason: wrong type, unknown key, bad enum value
        details.insert(0, cause[0].rstrip("."))
    return "; ".join([f"invalid config: {lines[0].rstrip('.')}", *details])


def typed_field(err: ValidationError) -> dataclasses.Field | None:
    """The schema field a value was refused for (None when the error is not about a typed key)."""
    schema = err.object_type
    if not dataclasses.is_dataclass(schema) or not isinstance(err.key, str):
        return None
    return next((f for f in dataclasses.fields(schema) if f.name == err.key), None)


def wrong_type(err: ValidationError) -> str:
    """A value the schema refuses: the override, the reason, and what the key takes (its type, its default)."""
    field = typed_field(err)
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    default_text = "" if default is dataclasses.MISSING else f", default {as_override(default)}"
    reason = str(err.msg).strip().splitlines()[0].rstrip(".")
    expected = type_name(typing.get_type_hints(err.object_type)[field.name])
    return f"{err.full_key}={as_override(err.value)}: {reason}; {err.full_key} takes {expected}{default_text}"


def as_override(value) -> str:
    """A value as it is written on the command line: abc, 200, null, true, [1, 2], resize."""
    if isinstance(value, enum.Enum):
        return value.name
    return value if isinstance(value, str) else json.dumps(value)


SCALAR_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def type_name(hint) -> str:
    """A schema type in words: an integer, a list of int, a number or null, one of resize, center_crop."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return " or ".join([type_name(a) for a in args] + ["null"])
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {getattr(args[0], '__name__', args[0])}" if args else "a list"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(member.name for member in hint)
    return SCALAR_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def main() -> None:
    """Run Hydra; faults become one line (exit 2, Ctrl-C 130). HYDRA_FULL_ERROR=1 keeps tracebacks."""
    keep_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach us instead of printing them
    try:
        hydra_main()
    except KeyboardInterrupt:
        print("error: interrupted; finished edits are kept: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        message = None if keep_tracebacks else fault_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        remove_if_unused()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """One run or one job of a sweep; returns the job's ``objective`` (what Optuna's sweeper
    optimises). A failed job of a sweep leaves a FAILED file and the others go on."""
    from cpds_exp.evaluation.objective import job_objective

    hydra_cfg = HydraConfig.get()
    objective = job_objective(cfg, hydra_cfg.sweeper.get("_target_"))  # checked before torch and models load
    from cpds_exp.app import run
    sweep_job = hydra_cfg.mode == RunMode.MULTIRUN
    if sweep_job:
        follow_sweep_process(hydra_cfg.launcher.get("_target_", ""))
    marker = Path(hydra_cfg.runtime.output_dir) / FAILED_MARKER
    try:
        records = run(cfg, hydra_cfg.runtime.output_dir)
    except Exception as err:
        message = fault_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        if not sweep_job:
            sys.exit(2)
        log.error("job %s failed: %s", hydra_cfg.job.num, message)
        _failed_here.append(f"{Path(hydra_cfg.runtime.output_dir).name}: {message}")
        write_failed_marker(marker, message)
        return
    if sweep_job:
        marker.unlink(missing_ok=True)
    return objective(records)


def write_failed_marker(marker: Path, message: str) -> None:
    """The FAILED file of a job, tagged with the sweep that ran it (best effort: the disk may be full)."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"sweep": os.environ.get(SWEEP_ENV, ""), "error": message}) + "\n")
    except OSError as err:
        log.error("cannot write %s: %s", marker, err)


def follow_sweep_process(launcher_target: str) -> None:
    """In a worker of a local launcher: end this job when the sweep's process dies (kill -9)."""
    pid, host, _ = (os.environ.get(SWEEP_ENV) or "::").split(":", 2)
    if pid and int(pid) != os.getpid() and host == socket.gethostname() and \
            launcher_target.startswith(LOCAL_WORKER_LAUNCHERS):
        end_with_parent(int(pid))


class FailedJobsCallback(Callback):
    """Tags the jobs of this sweep; at its end, one line naming the failed jobs and exit status 2.

    Only this sweep's FAILED files count (at any depth below the sweep folder), so an old
    marker of a job that is not part of this sweep cannot fail it.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        os.environ[SWEEP_ENV] = f"{os.getpid()}:{socket.gethostname()}:{uuid.uuid4().hex}"
        _failed_here.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = dict.fromkeys(_failed_here)
        for path in sorted(Path(config.hydra.sweep.dir).rglob(FAILED_MARKER)):
            mine = read_failed_marker(path)
            if mine is not None:
                failed.setdefault(f"{path.parent.name}: {mine}")
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep failed, e.g. {next(iter(failed))}", file=sys.stderr)
            sys.exit(2)


def read_failed_marker(path: Path) -> str | None:
    """The error of a FAILED file written by a job of the running sweep, else None."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("sweep") == os.environ.get(SWEEP_ENV):
        return str(marker.get("error"))
    return None
